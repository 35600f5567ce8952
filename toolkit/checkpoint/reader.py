"""Reading checkpoints on disk, tensor by tensor: (sharded) safetensors opened read-only.

A checkpoint is a Hugging Face model directory (config.json + model.safetensors, or shards
model-0000k-of-0000N.safetensors + model.safetensors.index.json), an index file, or one
.safetensors file. A safetensors file is: 8 bytes (little-endian u64) header length n, n bytes
of JSON {name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}, then the data.

`read` copies (part of) a tensor into memory with pread. `view` maps a chunk instead, zero-copy,
for the streaming merge: one small copy-on-write map per chunk, unmapped when its tensor is
freed, so no copy of the data is made, a write lands in private memory and never in the file,
and what is mapped stays bounded by the chunks in flight. Writing is `toolkit.checkpoint.writer`.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset of its data, dtype and shape."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'float32' / 'fp16' / 'F32' / torch.float16 -> torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "fp64": "float64", "double": "float64", "float": "float32"}
    s = str(name).strip().lower().removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name]
    dt = getattr(torch, aliases.get(s, s), None)
    if not isinstance(dt, torch.dtype) or dt not in DTYPE_NAMES:
        raise MergeError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or float64")
    return dt


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header: known dtypes, sizes that match the shapes,
    contiguous data that ends exactly at the end of the file (a truncated file fails here)."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"missing safetensors file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MergeError(f"{path} is not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise MergeError(f"{path} is truncated or not a safetensors file: header length {n}, "
                             f"file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path} is corrupt: its safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start, infos, spans = 8 + n, {}, []
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = DTYPES[h["dtype"]], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path} is corrupt: bad header entry for {name!r}: {h!r}") from None
        if any(s < 0 for s in shape) or e - b != math.prod(shape) * dtype.itemsize:
            raise MergeError(f"{path} is corrupt: {name!r} has shape {shape} {h['dtype']} but "
                             f"{e - b} bytes of data")
        infos[name] = TensorInfo(name, dtype, shape, path, start + b)
        spans.append((b, e, name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise MergeError(f"{path} is corrupt: data of {name!r} starts at {b}, expected {end}")
        end = e
    if start + end != size:
        raise MergeError(f"{path} is truncated or corrupt: the header promises {end} bytes of data, "
                         f"the file has {size - start}")
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset)), dict(meta)


class Checkpoint:
    """A safetensors checkpoint opened for reading (directory, index file or single file).

    `infos` maps every tensor name to its TensorInfo, in file order. `read` copies (part of) one
    tensor into a buffer (safe from several threads); files are opened read-only when the
    checkpoint is opened and closed by `close()` / the with-block.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.dir = self.path if self.path.is_dir() else None
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._fds: dict[Path, int] = {}
        for file, names in self._files().items():
            infos, meta = read_header(file)
            self.metadata = self.metadata or meta
            if names is None:
                names = list(infos)
            missing = [k for k in names if k not in infos]
            if missing:
                raise MergeError(f"{file} lacks tensors its index assigns to it, e.g. {missing[:3]}")
            for k in names:
                if k in self.infos:
                    raise MergeError(f"{self.path}: tensor {k!r} appears in two files")
                self.infos[k] = infos[k]
        for info in self.infos.values():  # opened up front: reads may come from several threads
            if info.file not in self._fds:
                self._fds[info.file] = os.open(info.file, os.O_RDONLY)

    def _files(self) -> dict[Path, list[str] | None]:
        """The safetensors files and, for an index, which names each holds."""
        p = self.path
        if not p.exists():
            raise MergeError(f"checkpoint {p} does not exist")
        if p.is_dir():
            if (p / INDEX).is_file():
                p = p / INDEX
            elif (p / "model.safetensors").is_file():
                return {p / "model.safetensors": None}
            else:
                found = sorted(p.glob("*.safetensors"))
                if len(found) == 1:
                    return {found[0]: None}
                bins = sorted(x.name for x in p.glob("*.bin"))
                raise MergeError(f"{self.path} has no model.safetensors or {INDEX}"
                                 + (f" (found {bins[:3]}: convert PyTorch .bin weights to safetensors, "
                                    "e.g. load and save_pretrained them once)" if bins else "")
                                 + (f" (found {len(found)} .safetensors files but no index)" if found else ""))
        if p.suffix == ".safetensors":
            return {p: None}
        if p.name.endswith(".json"):
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise MergeError(f"{p} is not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                           and Path(v).name == v for k, v in weight_map.items()):
                raise MergeError(f"{p}: its weight_map must map tensor names to shard file names in its "
                                 f"folder, got {str(weight_map)[:60]}")
            files: dict[Path, list[str]] = {}
            for name, fname in weight_map.items():
                files.setdefault(p.parent / fname, []).append(name)
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise MergeError(f"{p} names shard(s) that are missing: {absent}")
            return files
        raise MergeError(f"{p} is neither a model directory, a .safetensors file nor an index .json")

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def _span(self, name: str, start: int, count: int | None) -> tuple[TensorInfo, int, int]:
        """The tensor's info, the element count (checked to lie inside the tensor) and its file's
        descriptor (checked open)."""
        info = self.infos[name]
        count = info.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside {name!r}, which has {info.numel}")
        fd = self._fds.get(info.file)
        if fd is None:
            raise MergeError(f"{self.path} was closed before reading {name!r}")
        return info, count, fd

    def read(self, name: str, out: Tensor | None = None, start: int = 0, count: int | None = None) -> Tensor:
        """Elements [start, start + count) of tensor `name`, flattened, read into `out` (a 1-D
        buffer of the tensor's dtype with >= count elements) or into a new tensor."""
        info, count, fd = self._span(name, start, count)
        if out is None:
            out = torch.empty(count, dtype=info.dtype)
        elif out.dtype != info.dtype or out.dim() != 1 or out.numel() < count or not out.is_contiguous():
            raise ValueError(f"read: buffer {out.dtype}{tuple(out.shape)} cannot hold {count} {info.dtype}")
        out = out[:count]
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        pos, off = 0, info.offset + start * info.dtype.itemsize
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], off + pos)
            if got <= 0:
                raise MergeError(f"{info.file} ended early while reading {name!r} (changed or truncated "
                                 "while the merge ran?)")
            pos += got
        return out

    def view(self, name: str, start: int = 0, count: int | None = None) -> Tensor:
        """Elements [start, start + count) of tensor `name`, flattened, as a zero-copy tensor over a
        copy-on-write memory map of the file (writes to it stay private); a copy where the data
        is not aligned to its dtype. A file cut short before the map is made gives a MergeError; one cut
        short while the map is in use ends the process with SIGBUS, as for every memory-mapped reader
        (safetensors' own included): the output is renamed into place only at the end, so none is left."""
        info, count, fd = self._span(name, start, count)
        size = info.dtype.itemsize
        off = info.offset + start * size
        if count == 0 or off % size:
            return self.read(name, None, start, count)
        if os.fstat(fd).st_size < off + count * size:  # mapping past the end would crash on access
            raise MergeError(f"{info.file} ended early while reading {name!r} (changed or truncated "
                             "while the merge ran?)")
        page = off - off % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, off - page + count * size, access=mmap.ACCESS_COPY, offset=page)
        except (OSError, ValueError):  # a file system without memory maps: copy instead
            return self.read(name, None, start, count)
        return torch.frombuffer(mm, dtype=info.dtype, count=count, offset=off - page)

    def tensor(self, name: str) -> Tensor:
        """One whole tensor, in fresh memory, with its shape."""
        return self.read(name).reshape(self.infos[name].shape)

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor in memory (small checkpoints, tests)."""
        return {k: self.tensor(k) for k in self.infos}


def fingerprint(ckpt: Checkpoint | Mapping[str, Tensor], sample: int = 256) -> str:
    """A short hash identifying a model: names, dtypes, shapes and `sample` bytes at the start,
    middle and end of every tensor. Cheap (reads a few KB per tensor) yet differs between a base
    and any fine-tuned model that changed a tensor there; equal for a checkpoint and its state dict."""
    h = hashlib.blake2b(digest_size=16)
    names = sorted(ckpt.infos if isinstance(ckpt, Checkpoint) else ckpt)
    for name in names:
        if isinstance(ckpt, Checkpoint):
            info = ckpt.infos[name]
            dtype, shape, numel = info.dtype, info.shape, info.numel
        else:
            t = ckpt[name].detach().cpu().contiguous().reshape(-1)
            dtype, shape, numel = t.dtype, tuple(ckpt[name].shape), t.numel()
        h.update(f"{name}|{DTYPE_NAMES[dtype]}|{list(shape)}".encode())
        k = min(numel, max(1, sample // dtype.itemsize))
        for s in sorted({0, (numel - k) // 2, numel - k}) if numel else []:
            part = ckpt.read(name, None, s, k) if isinstance(ckpt, Checkpoint) else t[s:s + k]
            h.update(part.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
