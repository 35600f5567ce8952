"""Sharded safetensors on disk: reading by name and by chunk, planned shards + index, atomic output,
and a clear MergeError for every broken input."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from toolkit.atomic import atomic_dir, atomic_file
from toolkit.checkpoint import (INDEX, Checkpoint, ShardWriter, Spec, copy_side_files, fingerprint, parse_dtype,
                                parse_size, read_header, save_checkpoint)
from toolkit.errors import MergeError


def mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(13, 7, generator=g), "a.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "b.half": torch.randn(3, 5, generator=g).half(), "b.double": torch.randn(4, generator=g).double(),
            "ids": torch.arange(11), "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3)}


def test_save_and_read_back_sharded(tmp_path):
    sd = mixed_state_dict()
    out = save_checkpoint(sd, tmp_path / "ck", shard_size=100)
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    for f in files:  # safetensors' own reader agrees with the index, and shards respect the size
        loaded = load_file(out / f)
        assert set(loaded) == {k for k, v in index["weight_map"].items() if v == f}
        nbytes = sum(v.numel() * v.element_size() for v in loaded.values())
        assert nbytes <= 100 or len(loaded) == 1
        for k, v in loaded.items():
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k])
    with Checkpoint(out) as ck:
        assert set(ck.infos) == set(sd)
        for k, v in sd.items():
            assert torch.equal(ck.tensor(k), v)
        assert torch.equal(ck.read("a.weight", start=20, count=9), sd["a.weight"].flatten()[20:29])
        buf = torch.empty(50, dtype=torch.bfloat16)
        assert torch.equal(ck.read("a.bias", buf, 2, 3), sd["a.bias"][2:5])


def test_view_maps_chunks_that_equal_read_and_never_write_the_file(tmp_path):
    """Zero-copy chunks: equal to pread's, across dtypes and misaligned offsets (a bf16 tensor of odd
    length before a float32 one: copied, not mapped); a write lands in private memory; a file cut
    short after opening and a closed checkpoint are clear errors, not a crash."""
    sd = mixed_state_dict()
    save_file(sd, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    ck = Checkpoint(tmp_path / "m.safetensors")
    for k, v in sd.items():
        flat = v.flatten()
        for start, count in [(0, v.numel()), (1, v.numel() - 2), (v.numel() // 2, min(1, v.numel()))]:
            if count < 0:
                continue
            got = ck.view(k, start, count)
            assert got.dtype == v.dtype and torch.equal(got, flat[start:start + count]), (k, start)
    with pytest.raises(ValueError, match="outside"):
        ck.view("a.bias", 5, 3)
    w = ck.view("a.weight", 3, 40)
    w += 1.0  # copy-on-write: the tensor changes, the file does not
    assert torch.equal(w, sd["a.weight"].flatten()[3:43] + 1.0)
    del w
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert torch.equal(ck.view("a.weight", 3, 40), sd["a.weight"].flatten()[3:43])
    last = max(ck.infos.values(), key=lambda i: i.offset + i.nbytes)
    with open(tmp_path / "m.safetensors", "r+b") as f:  # cut short while open
        f.truncate(len(before) - 2)
    with pytest.raises(MergeError, match="ended early"):
        ck.view(last.name)
    ck.close()
    with pytest.raises(MergeError, match="closed"):
        ck.view("a.weight", 0, 4)
    # a float32 tensor at an odd byte offset (after 3 bf16 values), written by hand
    h, x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), torch.arange(5.0)
    header = json.dumps({"h": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                         "x": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                               + h.view(torch.uint8).numpy().tobytes()
                                               + x.view(torch.uint8).numpy().tobytes())
    with Checkpoint(tmp_path / "odd.safetensors") as odd:
        assert odd.infos["x"].offset % 4 and torch.equal(odd.view("x", 1, 3), x[1:4])


def test_open_single_file_index_and_dir(tmp_path):
    sd = {"x": torch.randn(4, 4), "y": torch.randn(2)}
    save_file(sd, tmp_path / "m.safetensors")
    assert torch.equal(Checkpoint(tmp_path / "m.safetensors").tensor("x"), sd["x"])
    (tmp_path / "d").mkdir()
    save_file(sd, tmp_path / "d" / "model.safetensors")
    assert set(Checkpoint(tmp_path / "d").infos) == {"x", "y"}
    out = save_checkpoint(sd, tmp_path / "s", shard_size=10)
    assert torch.equal(Checkpoint(out / INDEX).tensor("y"), sd["y"])


def test_broken_inputs_raise_merge_error(tmp_path):
    out = save_checkpoint({"x": torch.randn(64), "y": torch.randn(64)}, tmp_path / "ck", shard_size=100)
    shards = sorted(out.glob("*.safetensors"))
    with pytest.raises(MergeError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    # truncated shard
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-10])
    with pytest.raises(MergeError, match="truncated"):
        Checkpoint(out)
    # corrupt header
    shards[1].write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + data[28:])
    with pytest.raises(MergeError, match="corrupt"):
        Checkpoint(out)
    # header promising more data than the file holds
    shards[1].write_bytes(struct.pack("<Q", 10**12) + b"x" * 30)
    with pytest.raises(MergeError, match="truncated or not a safetensors"):
        Checkpoint(out)
    # missing shard
    shards[1].unlink()
    with pytest.raises(MergeError, match="missing"):
        Checkpoint(out)
    # a directory with PyTorch .bin weights only
    (tmp_path / "bin").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(MergeError, match="convert"):
        Checkpoint(tmp_path / "bin")
    # an index whose weight_map is not {tensor name: shard file in its folder}
    save_checkpoint({"x": torch.randn(4)}, tmp_path / "ix", shard_size=100)
    for weight_map in ("[1, 2]", '{"x": 5}', '{"x": "../ck/model-00001-of-00002.safetensors"}', '"x"'):
        (tmp_path / "ix" / INDEX).write_text(f'{{"weight_map": {weight_map}}}')
        with pytest.raises(MergeError, match="weight_map"):
            Checkpoint(tmp_path / "ix")
    # shape and byte count disagree
    bad = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 8)
    with pytest.raises(MergeError, match="bytes of data"):
        read_header(tmp_path / "bad.safetensors")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(MergeError, match="already exists"):
        with atomic_dir(dest):
            pass
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fingerprint_and_side_files(tmp_path):
    sd = mixed_state_dict()
    out = save_checkpoint(sd, tmp_path / "ck", shard_size=100)
    assert fingerprint(Checkpoint(out)) == fingerprint(sd)
    other = dict(sd, **{"a.weight": sd["a.weight"] + 1e-3})
    assert fingerprint(other) != fingerprint(sd)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"dtype": "float32", "hidden_size": 4}))
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")
    (tmp_path / "dst").mkdir()
    assert copy_side_files(tmp_path / "src", tmp_path / "dst", torch.bfloat16) == ["config.json", "tokenizer.json"]
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"


def test_parse_size_and_dtype():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234 and parse_size("500MB") == 5 * 10**8
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("float16") == torch.float16
    assert parse_dtype("F32") == torch.float32 and parse_dtype(None) is None
    with pytest.raises(MergeError):
        parse_size("lots")
    with pytest.raises(MergeError):
        parse_dtype("float7")


def test_writes_refuse_folders_files_in_the_way_and_non_finite_data(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(MergeError, match="is a folder"):
        with atomic_file(tmp_path / "dir"):
            pass
    (tmp_path / "file").write_text("x")
    for make in (atomic_file, atomic_dir):
        with pytest.raises(MergeError, match="is a file, not a folder"):
            with make(tmp_path / "file" / "below"):
                pass
    w = ShardWriter(tmp_path, [Spec("w", torch.float16, (3,))], 100)
    with pytest.raises(MergeError, match="'w' has 1 non-finite"):  # 1e5 overflows float16
        w.write("w", torch.tensor([1.0, 1e5, 2.0]))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "model-00001-of-00001.safetensors"]


def test_all_finite_matches_isfinite():
    """The writer's and merge_tensor's one-pass check (aminmax) agrees with isfinite in every float dtype."""
    from toolkit.checkpoint.writer import all_finite

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e5m2):
        for bad in (None, float("nan"), float("inf"), -float("inf")):
            x = torch.linspace(-3, 3, 1000, dtype=torch.float32)
            if bad is not None:
                x[517] = bad
            x = x.to(dtype)
            assert all_finite(x) == bool(torch.isfinite(x).all()) == (bad is None), (dtype, bad)


def test_parse_size_rejects_non_finite_numbers():
    for bad in (float("nan"), float("inf"), -1, 0, "1.2.3GB", ".GB", "..5"):
        with pytest.raises(MergeError):
            parse_size(bad)
