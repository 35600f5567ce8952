"""Vision data loaders: the embedded arrays of data/vision/ (checksummed) and, at `full` scale,
real torchvision data sets read from a local root with download=False.

Both return torch Datasets of (image tensor [C, H, W] float, int label), so the rest of the
pipeline does not care which one it got. Nothing here downloads.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from .errors import MergeError

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "vision"

# sha256 of each embedded file, as printed by data/vision/make_data.py and stated in its data card.
EMBEDDED: dict[str, str] = {
    "mnist": "cd6b1c83b8adbab141871fbb5ef62168fe53e09e684ebe4ee8031d39d7aa719e",
    "fashion_mnist": "9065dbaf6ab5fd7a5841406d228b77f5ccaae2986b8dd7aa22d787bd6efc5512",
    "fashion_mnist_extra": "eefa3d0aacf38ad52bb9d08d16383898ca76e4dbcff120505d5d2d273e25d4a5",
    "digits": "58c23b254c8113151a2a1c8593bdc1bc4bf757fe175393ce74067cc36c75cca3",
}
KEYS = ("x_train", "y_train", "x_test", "y_test")
# sha256 of each embedded model (data/vision/<name>.pt: {"recipe": JSON text, "state_dict": ...}),
# as printed by data/vision/make_base.py and stated in its data card.
EMBEDDED_MODELS: dict[str, str] = {
    "vit_base_small": "e735cb72f9c6097ad9d90fca98d3edaf51f1ae9eb7d61059726ecd0585e21ac9",
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_dir(root: str | Path | None = None) -> Path:
    """Where the embedded arrays and models live: `root`, else $TOOLKIT_DATA_DIR, else the repo's data/vision."""
    return Path(root or os.environ.get("TOOLKIT_DATA_DIR") or DATA_DIR)


def load_arrays(name: str, root: str | Path | None = None) -> dict[str, np.ndarray]:
    """The uint8 images and int64 labels of an embedded data set, after checking its sha256."""
    if name not in EMBEDDED:
        raise MergeError(f"unknown embedded data set {name!r}; known: {', '.join(EMBEDDED)}")
    path = data_dir(root) / f"{name}.npz"
    _checked(path, EMBEDDED[name], f"{name}.md")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in KEYS}


def _checked(path: Path, want: str, card: str) -> None:
    if not path.is_file():
        raise MergeError(f"embedded file {path} is missing; restore it from git (see data/vision/{card})")
    got = sha256(path)
    if got != want:
        raise MergeError(f"embedded file {path} is corrupt: sha256 {got[:12]}... does not match the "
                         f"expected {want[:12]}... (see data/vision/{card}); restore it from git")


def load_model(name: str, root: str | Path | None = None) -> tuple[dict[str, Tensor], dict]:
    """An embedded model's state dict and the recipe (configuration) it was trained with, after
    checking its sha256; callers compare the recipe with theirs before using the weights."""
    import json
    if name not in EMBEDDED_MODELS:
        raise MergeError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    path = data_dir(root) / f"{name}.pt"
    _checked(path, EMBEDDED_MODELS[name], f"{name}.md")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], json.loads(blob["recipe"])


def to_tensor_dataset(x: np.ndarray, y: np.ndarray,
                      transform: Callable[[Tensor], Tensor] | None = None) -> TensorDataset:
    """uint8 [N, H, W] images -> float [N, 1, H, W] in [0, 1] (then `transform`), int64 labels."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255).unsqueeze(1)
    if transform is not None:
        xt = transform(xt)
    return TensorDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# full scale: torchvision data sets from a local root (the 8-task suite where torchvision has it)
# ---------------------------------------------------------------------------------------------

def _tv(name: str, root: str, train: bool, transform):
    import torchvision.datasets as D
    split = "train" if train else "test"
    make = {
        "MNIST": lambda: D.MNIST(root, train=train, transform=transform, download=False),
        "FashionMNIST": lambda: D.FashionMNIST(root, train=train, transform=transform, download=False),
        "SVHN": lambda: D.SVHN(root, split=split, transform=transform, download=False),
        "GTSRB": lambda: D.GTSRB(root, split=split, transform=transform, download=False),
        "DTD": lambda: D.DTD(root, split=split, transform=transform, download=False),
        "StanfordCars": lambda: D.StanfordCars(root, split=split, transform=transform, download=False),
        "EuroSAT": lambda: D.EuroSAT(root, transform=transform, download=False),
        "SUN397": lambda: D.SUN397(root, transform=transform, download=False),
    }
    if name not in make:
        raise MergeError(f"unknown torchvision data set {name!r}; known: {', '.join(make)}")
    try:
        return make[name]()
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise MergeError(f"torchvision data set {name} not found under {root!r} (download=False, nothing is "
                         f"downloaded at run time): put it there in torchvision's layout first ({e})") from None


NO_SPLIT = ("EuroSAT", "SUN397")  # one folder only: a fixed 80/20 split by index


def load_torchvision(name: str, root: str | Path, train: bool,
                     transform: Callable | None = None) -> Dataset:
    """A torchvision data set read from `root` without downloading; EuroSAT and SUN397 have no
    official split, so every 5th example (by index) is the test set."""
    ds = _tv(name, str(root), train, transform)
    if name in NO_SPLIT:
        idx = [i for i in range(len(ds)) if (i % 5 == 4) != train]
        ds = Subset(ds, idx)
    return ds


def vit_transform(image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Callable:
    """PIL image (grey or colour) -> normalised 3-channel tensor of image_size x image_size."""
    import torchvision.transforms as T
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(image_size),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def as_tensors(ds: Dataset) -> tuple[Tensor, Tensor] | None:
    """(inputs, labels) of an in-memory data set as two tensors: a TensorDataset of two tensors,
    or Subsets and concatenations of them (what the small scales build); None for anything else
    (torchvision sets read image by image), which callers then iterate with a DataLoader."""
    if isinstance(ds, TensorDataset):
        return tuple(ds.tensors) if len(ds.tensors) == 2 else None
    if isinstance(ds, Subset):
        inner = as_tensors(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return inner[0][idx], inner[1][idx]
    if isinstance(ds, ConcatDataset):
        parts = [as_tensors(d) for d in ds.datasets]
        if any(p is None for p in parts):
            return None
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return None


def cap(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """At most `n` examples of `ds`, a fixed random subset (all of it when n is None)."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.sort().values.tolist())
