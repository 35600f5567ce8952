"""Embedded vision data (checksums, corruption, missing files) and torchvision loading from a fake root."""
import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch

from toolkit import data as D
from toolkit import vision as V
from toolkit.errors import MergeError


@pytest.mark.parametrize("name", sorted(D.EMBEDDED))
def test_embedded_arrays_load_with_their_checksum(name):
    a = D.load_arrays(name)
    assert a["x_train"].dtype == np.uint8 and a["y_train"].dtype == np.int64
    assert a["x_train"].shape[0] == a["y_train"].shape[0] and a["x_test"].shape[0] == a["y_test"].shape[0]
    for split in ("y_train", "y_test") if len(a["y_test"]) else ("y_train",):  # extra: no test split
        counts = np.bincount(a[split])
        assert len(counts) == 10 and counts.min() > 0
    if len(a["y_test"]):
        counts = np.bincount(a["y_test"])
        assert counts.min() == counts.max()  # class-balanced test split
    card = (D.DATA_DIR / f"{name}.md").read_text()
    assert D.EMBEDDED[name] in card and "Licence" in card
    assert re.search(r"CC BY-SA 3.0|MIT|BSD-3", card)


def test_corrupt_file_is_a_clear_error(tmp_path):
    shutil.copy(D.DATA_DIR / "digits.npz", tmp_path / "digits.npz")
    raw = bytearray((tmp_path / "digits.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "digits.npz").write_bytes(bytes(raw))
    with pytest.raises(MergeError, match="corrupt"):
        D.load_arrays("digits", tmp_path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(MergeError, match="missing"):
        D.load_arrays("mnist", tmp_path)
    with pytest.raises(MergeError, match="unknown embedded"):
        D.load_arrays("cifar10")


def test_tasks_and_pretraining_own_disjoint_images_and_validation_is_carved_out():
    owners = {}
    for t in V.SMALL_TASKS:
        for i in V._owned(len(D.load_arrays(t.source)["y_train"]), t.pool, t.pools):
            assert (t.source, i) not in owners, f"{t.name} and {owners[(t.source, i)]} share an image"
            owners[(t.source, i)] = t.name
    for src, _, pool, pools, _ in V.PRETRAIN_SOURCES:
        for i in V._owned(len(D.load_arrays(src)["y_train"]), pool, pools):
            assert (src, i) not in owners, f"pretraining shares image {i} of {src} with {owners[(src, i)]}"
    a = D.load_arrays("mnist")
    rot = next(t for t in V.SMALL_TASKS if t.name == "rot_mnist")
    tr, va, te = V.task_splits(rot, "small")
    own = V._owned(len(a["y_train"]), rot.pool, rot.pools)
    assert len(tr) + len(va) == len(own) and len(va) == pytest.approx(0.2 * len(own), abs=1)
    x_src = torch.from_numpy(a["x_train"][own[1]]).float() / 255  # own[0] is the first validation image
    assert torch.allclose(tr.tensors[0][0, 0], torch.rot90(x_src, 1, (0, 1)))
    assert len(te) == len(a["y_test"])
    dig, _ = V.task_data(V.SMALL_TASKS[2], "small")
    assert dig.tensors[0].shape[1:] == (1, 28, 28)
    small, _ = V.task_data(V.SMALL_TASKS[1], "small", n_train=50)
    assert len(small) == 50
    fashion = next(t for t in V.SMALL_TASKS if t.name == "fashion")
    _, _, te = V.task_splits(fashion, "small")
    assert set(te.tensors[1].tolist()) == set(range(fashion.n_classes))
    with pytest.raises(MergeError, match="validation fraction"):
        V.task_splits(fashion, "small", val_fraction=1.0)


# --- full scale: torchvision layout, download=False ---------------------------------------------

def _idx(path, arr):
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def fake_root(root, n=12):
    """The files torchvision's MNIST, FashionMNIST and EuroSAT look for, with random content."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("MNIST", "FashionMNIST"):
        raw = root / name / "raw"
        raw.mkdir(parents=True)
        for split, m in (("train", n), ("t10k", n // 2)):
            _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (m, 28, 28)))
            _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, m))
    for c in ("AnnualCrop", "Forest"):
        d = root / "eurosat" / "2750" / c
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{c}_{i}.jpg")
    return root


def test_full_scale_reads_a_local_torchvision_root(tmp_path):
    root = fake_root(tmp_path)
    tr, te = V.task_data(V.Task("MNIST", "MNIST"), "full", root=str(root))
    assert (len(tr), len(te)) == (12, 6)
    x, y = tr[0]
    assert x.shape == (3, 224, 224) and 0 <= int(y) < 10
    tr, te = V.task_data(V.Task("EuroSAT", "EuroSAT"), "full", root=str(root))
    assert (len(tr), len(te)) == (8, 2)  # every 5th image is the test set
    assert te[0][0].shape == (3, 224, 224)
    assert len(D.load_torchvision("FashionMNIST", root, train=False)) == 6


def test_full_scale_without_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(MergeError, match="not found"):
        V.task_data(V.Task("SVHN", "SVHN"), "full", root=str(tmp_path))
    with pytest.raises(MergeError, match="root="):
        V.task_data(V.Task("MNIST", "MNIST"), "full")
    with pytest.raises(MergeError, match="unknown torchvision"):
        D.load_torchvision("ImageNet", tmp_path, train=True)


def test_embedded_base_model_is_checked_and_states_the_recipe_it_was_trained_with(tmp_path):
    from toolkit.experiments import vision as E
    state, recipe = D.load_model(E.EMBEDDED_BASE)
    assert recipe == json.loads(json.dumps(E.base_recipe(E.setup("small")))), \
        "the pretraining recipe changed: rerun data/vision/make_base.py and update its sha256"
    V.make_backbone(V.VIT["small"]).load_state_dict(state)  # every key and shape of the small ViT
    card = (D.DATA_DIR / f"{E.EMBEDDED_BASE}.md").read_text()
    assert D.EMBEDDED_MODELS[E.EMBEDDED_BASE] in card and "Licence" in card
    raw = bytearray((D.DATA_DIR / f"{E.EMBEDDED_BASE}.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / f"{E.EMBEDDED_BASE}.pt").write_bytes(bytes(raw))
    with pytest.raises(MergeError, match="corrupt"):
        D.load_model(E.EMBEDDED_BASE, tmp_path)
    with pytest.raises(MergeError, match="missing"):
        D.load_model(E.EMBEDDED_BASE, tmp_path / "nowhere")
    with pytest.raises(MergeError, match="unknown embedded model"):
        D.load_model("vit_huge")


def test_small_scale_starts_from_the_shipped_base_and_trains_when_the_recipe_differs(tmp_path, monkeypatch):
    from toolkit.experiments import vision as E
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    trained = []
    monkeypatch.setattr(E, "pretrain", lambda s, progress=True: trained.append(s) or {"w": torch.zeros(1)})
    state, _ = E.base_backbone(E.setup("small"))
    assert not trained and torch.equal(state["pos_embed"], D.load_model(E.EMBEDDED_BASE)[0]["pos_embed"])
    with pytest.warns(UserWarning, match="another recipe"):
        other, _ = E.base_backbone(E.setup("small", pretrain_steps=10))
    assert len(trained) == 1 and set(other) == {"w"}
