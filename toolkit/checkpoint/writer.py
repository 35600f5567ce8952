"""Writing checkpoints: planned safetensors shards streamed tensor by tensor, atomically.

The writer plans every shard's header up front, then appends tensor bytes as they are computed,
so no shard is ever held in memory. Output goes to a temporary directory next to the destination,
renamed into place only when complete (`toolkit.atomic.atomic_dir`). Reading is
`toolkit.checkpoint.reader`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..atomic import atomic_dir
from ..errors import MergeError
from .reader import DTYPE_NAMES, INDEX, WEIGHT_SUFFIXES


def parse_size(size: int | str) -> int:
    """Bytes from 123, '500MB', '2GB', '1.5GiB' (powers of 1000 for kB/MB/GB, 1024 for KiB/MiB/GiB)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if not math.isfinite(size):
            raise MergeError(f"size must be a finite number of bytes, got {size!r}")
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", str(size))
        if not m:
            raise MergeError(f"cannot read size {size!r}; write e.g. 2GB, 500MB or a number of bytes")
        unit = (m.group(2) or "").lower()
        base = 1024 if unit.endswith("i") else 1000
        n = int(float(m.group(1)) * base ** " kmgt".index(unit[:1] or " "))
    if n <= 0:
        raise MergeError(f"size must be positive, got {size!r}")
    return n


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in float tensor `t`. One aminmax pass (NaN propagates into both ends): about
    30x cheaper than isfinite(t).all(), which builds boolean temporaries; float8 has no aminmax."""
    if t.dtype.itemsize == 1:
        return bool(torch.isfinite(t).all())
    lo, hi = (x.item() for x in torch.aminmax(t))
    return -math.inf < lo and hi < math.inf


@dataclass(frozen=True)
class Spec:
    """A tensor to be written: name, dtype, shape."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[Spec], shard_size: int) -> list[list[Spec]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes (a larger tensor gets a
    shard of its own). Within a shard, wider dtypes come first so every tensor stays aligned."""
    shards: list[list[Spec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return [sorted(sh, key=lambda s: -s.dtype.itemsize) for sh in shards if sh] or [[]]


def _header(specs: Sequence[Spec], metadata: Mapping[str, str]) -> bytes:
    h: dict = {"__metadata__": dict(metadata)}
    pos = 0
    for s in specs:
        h[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes tensors into planned safetensors shards, streaming: `write(name, chunk)` appends
    bytes; tensors must arrive in `order` (chunks of a tensor in row-major order). `close()`
    checks every byte arrived and writes model.safetensors.index.json. With `finite` (the
    default), a float chunk with a NaN or inf (after the cast to its planned dtype) is refused."""

    def __init__(self, directory: str | os.PathLike, specs: Sequence[Spec], shard_size: int | str,
                 metadata: Mapping[str, str] | None = None, finite: bool = True):
        self.dir, self.finite = Path(directory), finite
        self.shards = plan_shards(specs, parse_size(shard_size))
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [s for sh in self.shards for s in sh]
        self._starts = {sum(map(len, self.shards[:i])): i for i in range(n)}  # order index -> shard
        self.metadata = {"format": "pt", **(metadata or {})}
        self.bytes_written = 0
        self._i = -1  # index into order of the tensor being written
        self._left = 0
        self._f = None

    def _next(self) -> Spec:
        if self._left:
            raise MergeError(f"internal: {self._left} bytes of {self.order[self._i].name!r} were not written")
        self._i += 1
        spec = self.order[self._i]
        if self._i in self._starts:
            self._open(self._starts[self._i])
        self._left = spec.nbytes
        return spec

    def write(self, name: str, data: Tensor) -> None:
        """Append `data` (the next elements of tensor `name`, cast to its planned dtype)."""
        spec = self.order[self._i] if self._left else self._next()
        if spec.name != name:
            raise MergeError(f"internal: wrote {name!r} where {spec.name!r} was due")
        data = data.detach().to(spec.dtype).contiguous().reshape(-1)
        if self.finite and data.is_floating_point() and data.numel() and not all_finite(data):
            raise MergeError(f"{name!r} has {int((~torch.isfinite(data)).sum())} non-finite values (NaN or inf) "
                             f"in {str(spec.dtype).removeprefix('torch.')}: an alpha or option too large for "
                             "the dtype, or non-finite inputs; refusing to write it")
        nbytes = data.numel() * spec.dtype.itemsize
        if nbytes > self._left:
            raise MergeError(f"internal: {name!r} got more data than its shape {spec.shape} holds")
        if nbytes:
            self._f.write(memoryview(data.view(torch.uint8).numpy()))
        self._left -= nbytes
        self.bytes_written += nbytes
        if spec.nbytes == 0:  # empty tensors have nothing to write
            self._left = 0

    def _open(self, shard: int) -> None:
        self._close_file()
        self._f = open(self.dir / self.files[shard], "wb")
        self._f.write(_header(self.shards[shard], self.metadata))

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> None:
        """Finish the last shard (tensors still due must be empty) and write the index."""
        while self._i + 1 < len(self.order):
            self._next()
            if self._left:
                raise MergeError(f"internal: tensor {self.order[self._i].name!r} was never written")
        if self._left:
            raise MergeError(f"internal: {self._left} bytes of {self.order[self._i].name!r} missing")
        if not self.order:  # an empty model still gets one (empty) shard
            self._open(0)
        self._close_file()
        weight_map = {s.name: f for f, sh in zip(self.files, self.shards) for s in sh}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.order)}, "weight_map": weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        self._close_file()


def copy_side_files(src: str | os.PathLike | None, dst: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> list[str]:
    """Copy a model directory's non-weight files (config, tokenizer, generation config, ...) to
    `dst`; with `dtype`, config.json's dtype entry is updated to match the merged weights."""
    if src is None:
        return []
    copied = []
    for p in sorted(Path(src).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(WEIGHT_SUFFIXES) \
                or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, Path(dst) / p.name)
        copied.append(p.name)
    cfg = Path(dst) / "config.json"
    if dtype is not None and cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MergeError(f"{src}/config.json is not valid JSON ({e})") from None
        for key in ("torch_dtype", "dtype"):
            if key in c:
                c[key] = str(dtype).removeprefix("torch.")
        cfg.write_text(json.dumps(c, indent=2) + "\n")
    return copied


def save_checkpoint(state_dict: Mapping[str, Tensor], dest: str | os.PathLike, *,
                    shard_size: int | str = "5GB", overwrite: bool = False,
                    metadata: Mapping[str, str] | None = None, side_files_from: str | None = None) -> Path:
    """Write an in-memory state dict as a sharded safetensors directory, atomically."""
    specs = [Spec(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
    with atomic_dir(dest, overwrite) as tmp:
        w = ShardWriter(tmp, specs, shard_size, metadata)
        try:
            for s in w.order:
                w.write(s.name, state_dict[s.name])
            w.close()
        finally:
            w.abort()
        copy_side_files(side_files_from, tmp)
    return Path(dest)
