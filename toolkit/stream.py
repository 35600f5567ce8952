"""Streaming merge of checkpoints on disk, driven by a YAML config: `python -m toolkit merge CONFIG.yaml`.

Every output tensor is `toolkit.merge.merge_tensor(method, name, base, thetas, alphas, fishers,
sizes, base_fisher, **options)`, the same code path as in-memory merges. Element-wise methods
(the registry's `elementwise` flag: averaging, task arithmetic, Fisher averaging, gradient
matching) are applied to chunks of `chunk` elements that worker threads map from the files
without copying them (`Checkpoint.view`) and merge in parallel, BLOCK elements per call so that
a call's working set stays in the CPU cache (reusing their scratch buffers, `merge.reuse_scratch`),
while the main thread appends the results to the output, so memory stays bounded whatever the model
size; methods that need a whole tensor (TIES, DARE, new ones) get one tensor at a time.

Config (YAML; relative paths are relative to the config file):

    base: checkpoints/base            # theta_0: HF model dir, index .json or .safetensors file
    models:                           # theta_t with alpha_t (default 1.0)
      - path: checkpoints/news
        alpha: 0.5
        fisher: fishers/news.safetensors  # F_t, Fisher methods only (`python -m toolkit fisher`)
        size: 120000                  # N_t; default: the Fisher file's dataset_size metadata
        stats: {grams: grams/news.safetensors}  # other statistics a method takes (RegMean's Grams)
      - path: checkpoints/code
        alpha: 0.5
        fisher: fishers/code.safetensors
    method: gradient_matching         # any name in toolkit.merge.METHODS
    options: {fisher_floor: 0.0}      # keyword options of the method
    delta: 1.0e-12                    # shorthand for options.delta (gradient matching's prior)
    base_fisher: fishers/base.safetensors  # F_0, optional (gradient matching)
    base_size: 25000                  # N_0; default: the base Fisher's dataset_size metadata
    dtype: bfloat16                   # output dtype of float tensors; default: as the base
    shard_size: 2GB                   # largest output shard (default 5GB)
    output: merged/news-code          # written to a temp dir next to it, renamed when complete
    overwrite: false                  # replace an existing output (never an input)

The output is sharded safetensors + model.safetensors.index.json + the base's config,
tokenizer and generation files: a directory `from_pretrained` loads.

Every value is type-checked before anything is opened (`toolkit.validate`): a string where a
number or a boolean belongs is an error naming the key, never a coercion. The output may not be,
contain or lie inside an input; every merged tensor is checked finite before it is written; a
killed merge's hidden temporary is removed by the next run (`toolkit.atomic`).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from . import validate
from .atomic import atomic_dir
from .checkpoint import Checkpoint, ShardWriter, Spec, copy_side_files, fingerprint, parse_size
from .errors import MergeError
from .merge import check_alphas, check_options, compute_dtype, get_method, prepare, reuse_scratch

CONFIG_KEYS = {"base", "models", "method", "options", "delta", "base_fisher", "base_size", "dtype",
               "shard_size", "output", "overwrite"}
MODEL_KEYS = {"path", "alpha", "fisher", "size", "stats"}
PathLike = str | os.PathLike
BLOCK = 1 << 17  # elements per call of an element-wise method (its ~13 buffers of them fit the cache)


@dataclass
class Summary:
    """What a merge did: tensors written, bytes read and written, wall-clock seconds."""
    output: Path
    method: str
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float

    def __str__(self) -> str:
        rate = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9)
        return (f"merged {self.tensors} tensors with {self.method} into {self.output} ({self.shards} shard(s)): "
                f"read {_human(self.bytes_read)}, wrote {_human(self.bytes_written)} in {self.seconds:.2f} s "
                f"({_human(rate)}/s)")


def _human(n: float) -> str:
    """Bytes as '812 kB', '2.20 GB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def check_checkpoints(base: Checkpoint, models: Sequence[Checkpoint]) -> None:
    """Every model has exactly the base's tensor names, shapes and dtypes (`validate.check_same`)."""
    labels = [f"model {i} ({ck.path})" for i, ck in enumerate(models)]
    validate.check_same(base.infos, [ck.infos for ck in models], labels)


def _meta_size(ck: Checkpoint, what: str) -> float:
    """A Fisher file's dataset_size metadata, checked: a positive finite number."""
    raw = ck.metadata["dataset_size"]
    try:
        value = float(raw)
    except ValueError:
        raise MergeError(f"{what} ({ck.path}): dataset_size metadata {raw!r} is not a number") from None
    return validate.number(value, f"{what} ({ck.path}) dataset_size", "(0, inf)")


def check_fisher_file(fisher: Checkpoint, model: Checkpoint, what: str, check_hash: bool = True) -> None:
    """A Fisher file must cover the model's float tensors with the same shapes, in a float dtype,
    and (when it records one) carry the model's fingerprint."""
    for k, info in model.infos.items():
        if not info.dtype.is_floating_point:
            continue
        f = fisher.infos.get(k)
        if f is None:
            raise MergeError(f"{what} ({fisher.path}) has no entry for {k!r}: is it a Fisher of another model?")
        if f.shape != info.shape or not f.dtype.is_floating_point:
            raise MergeError(f"{what} ({fisher.path}): {k!r} is {f.dtype}{list(f.shape)}, the model's "
                             f"parameter is {list(info.shape)}: is it a Fisher of another model?")
    want = fisher.metadata.get("model_hash")
    if check_hash and want and want != fingerprint(model):
        raise MergeError(f"{what} ({fisher.path}) was estimated for another model: its model_hash {want} "
                         f"differs from {model.path}'s {fingerprint(model)}")


def _open_fishers(m, open_, base_ck: Checkpoint, cks: list[Checkpoint], fishers, sizes, base_fisher,
                  options: dict, check_hash: bool):
    """Open and check the Fisher files; sizes N_t (and options' base_size N_0) default to the files'
    dataset_size metadata. Returns (Fisher checkpoints, base Fisher checkpoint or None, sizes or None)."""
    sizes = list(sizes) if sizes is not None else [None] * len(cks)
    fks, bfk = [], None
    if m.uses_fisher:
        if not fishers or len(fishers) != len(cks):
            raise MergeError(f"method {m.name!r} needs one Fisher file per model: got "
                             f"{len(fishers or [])} for {len(cks)} models")
        if len(sizes) != len(cks):
            raise MergeError(f"got {len(sizes)} sizes for {len(cks)} models")
        fks = [open_(p) for p in fishers]
        for i, (fk, ck) in enumerate(zip(fks, cks)):
            check_fisher_file(fk, ck, f"Fisher {i}", check_hash)
        sizes = [s if s is not None or "dataset_size" not in fk.metadata else _meta_size(fk, f"Fisher {i}")
                 for i, (s, fk) in enumerate(zip(sizes, fks))]
        if base_fisher is not None:
            bfk = open_(base_fisher)
            check_fisher_file(bfk, base_ck, "the base Fisher", check_hash)
            if "base_size" in m.options and "dataset_size" in bfk.metadata:
                options.setdefault("base_size", _meta_size(bfk, "the base Fisher"))
    if all(s is None for s in sizes):
        return fks, bfk, None
    if any(s is None for s in sizes):
        raise MergeError(f"data-set sizes N_t known for some models only ({sizes}): give a size "
                         "for every model (config `size:`) or Fisher files with dataset_size metadata")
    return fks, bfk, sizes


def merge_checkpoints(base: PathLike, models: Sequence[PathLike], output: PathLike, *,
                      method: str = "task_arithmetic", alphas: Sequence[float] | None = None,
                      fishers: Sequence[PathLike] | None = None, sizes: Sequence[float | None] | None = None,
                      base_fisher: PathLike | None = None, options: Mapping[str, Any] | None = None,
                      dtype: str | torch.dtype | None = None, shard_size: int | str = "5GB",
                      overwrite: bool = False, progress: bool = True, chunk: int = 1 << 20,
                      check_hash: bool = True, threads: int | None = None,
                      stats: Mapping[str, Sequence[PathLike]] | None = None) -> Summary:
    """Merge checkpoints on disk tensor by tensor into a new sharded safetensors directory.

    Each output tensor is merge_tensor(method, ...) of the inputs' tensors (e.g. task arithmetic
    theta_0 + sum_t alpha_t tau_t); fp16/bf16 are computed in fp32, then cast to `dtype`
    (default: the base's dtype). Inputs are only read; the output appears atomically.
    threads: worker threads that read and merge chunks in parallel (default: torch's thread count).
    stats: the method's other statistics, name -> one safetensors file per model (see `_open_stats`)."""
    t0 = time.perf_counter()
    m = get_method(validate.text(method, "method"))
    options = check_options(m, {} if options is None else options)
    base, output = validate.path(base, "base"), validate.path(output, "output")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence):
        raise MergeError(f"models must be a list of checkpoint paths, got {type(models).__name__}")
    models = [validate.path(p, f"models[{i}]") for i, p in enumerate(models)]
    alphas = check_alphas(alphas, len(models))
    fishers = None if fishers is None else [validate.path(p, f"fishers[{i}]") for i, p in enumerate(fishers)]
    base_fisher = None if base_fisher is None else validate.path(base_fisher, "base_fisher")
    if sizes is not None:
        sizes = [None if s is None else validate.number(s, f"sizes[{i}]", "(0, inf)") for i, s in enumerate(sizes)]
    out_dtype = validate.float_dtype(dtype)
    parse_size(shard_size)
    for flag, value in (("overwrite", overwrite), ("progress", progress), ("check_hash", check_hash)):
        validate.boolean(value, flag)
    chunk = validate.number(chunk, "chunk", "[1, inf)", integer=True)
    if not m.uses_fisher and (fishers or base_fisher):
        raise MergeError(f"method {m.name!r} does not use Fishers, but Fisher files were given")
    workers = (torch.get_num_threads() if threads is None
               else validate.number(threads, "threads", "[1, inf)", integer=True))
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)  # parallel over chunks, not inside each small op
        open_ = lambda p: stack.enter_context(Checkpoint(p))  # noqa: E731
        base_ck, cks = open_(base), [open_(p) for p in models]
        check_checkpoints(base_ck, cks)
        fks, bfk, sizes = _open_fishers(m, open_, base_ck, cks, fishers, sizes, base_fisher, options, check_hash)
        sks = _open_stats(m, open_, stats, len(cks))
        ins = [base_ck, *cks, *fks, *([bfk] if bfk else []), *(ck for v in sks.values() for ck in v)]
        validate.check_output(output, [p for ck in ins for p in (ck.path, *{i.file for i in ck.infos.values()})])
        specs = [Spec(k, out_dtype if out_dtype and i.dtype.is_floating_point else i.dtype, i.shape)
                 for k, i in base_ck.infos.items()]
        ctx = _Ctx(prepare(m, len(cks), alphas, sizes, **options), base_ck, cks, fks, bfk, out_dtype, chunk, sks)
        with warnings.catch_warnings():  # the probe's warnings would repeat the merge's
            warnings.simplefilter("ignore")
            ctx.task(next((k for k, i in base_ck.infos.items() if i.dtype.is_floating_point and i.numel),
                          next(iter(base_ck.infos), None)), 0, 1)
        pool = stack.enter_context(ThreadPoolExecutor(workers, initializer=reuse_scratch))
        # Chunks are read and merged by `workers` threads while this thread writes the results in
        # order; element-wise methods keep workers + 2 chunks in flight, whole-tensor methods one tensor.
        in_flight = workers + 2 if m.elementwise else 1
        bytes_read = 0
        with atomic_dir(output, overwrite) as tmp:
            meta = {"merge_method": m.name, "merge_alphas": ",".join(map(str, alphas))}
            # merge_tensor has checked every chunk finite in the base's dtype; the writer checks
            # again only where its cast to `dtype` could overflow (one pass less per chunk)
            writer = ShardWriter(tmp, specs, shard_size, meta, finite=out_dtype is not None)
            jobs = ((spec, s, n) for spec in writer.order for s, n in ctx.spans(spec.name, not m.elementwise))
            pending: deque = deque()
            try:
                with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc=f"merge ({m.name})",
                          disable=not progress) as bar, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")

                    def drain() -> None:
                        nonlocal bytes_read
                        spec, fut = pending.popleft()
                        out, nread = fut.result()
                        writer.write(spec.name, out)
                        bytes_read += nread
                        bar.update(out.numel() * spec.dtype.itemsize)

                    for spec, s, n in jobs:
                        while len(pending) >= in_flight:  # bounded memory: write before reading more
                            drain()
                        pending.append((spec, pool.submit(ctx.task, spec.name, s, n)))
                    while pending:
                        drain()
                writer.close()
            finally:
                for _, fut in pending:
                    fut.cancel()
                writer.abort()
            if caught:  # one line for the whole merge rather than one per chunk
                warnings.warn(f"{m.name} warned {len(caught)} time(s) while merging; the first: "
                              f"{caught[0].message}", caught[0].category, stacklevel=2)
            copy_side_files(base_ck.dir, tmp, out_dtype)
        return Summary(Path(output), m.name, len(specs), len(writer.shards), bytes_read,
                       writer.bytes_written, time.perf_counter() - t0)


@dataclass
class _Ctx:
    """The opened inputs of one merge, and how to merge one chunk (thread-safe)."""
    merge: Callable[..., Tensor]  # merge.prepare(method, ...): merge_tensor with the whole-merge checks done
    base: Checkpoint
    models: list[Checkpoint]
    fishers: list[Checkpoint]
    base_fisher: Checkpoint | None
    out_dtype: torch.dtype | None
    chunk: int
    stats: dict[str, list[Checkpoint]]

    def spans(self, name: str, whole: bool) -> list[tuple[int, int | None]]:
        """(start, count) chunks of the flattened tensor; (0, None) for the whole tensor."""
        info = self.base.infos[name]
        if info.numel == 0 or (whole and info.dtype.is_floating_point):
            return [(0, None)]
        return [(s, min(self.chunk, info.numel - s)) for s in range(0, info.numel, self.chunk)]

    @staticmethod
    def _read(ck: Checkpoint, name: str, start: int, n: int | None) -> Tensor:
        """A chunk mapped from the file (zero-copy), or the whole tensor in fresh memory (n None)."""
        return ck.tensor(name) if n is None else ck.view(name, start, n)

    def _stat(self, ck: Checkpoint, name: str, start: int, n: int | None) -> Tensor | None:
        """A statistic for tensor `name`: None if the file has none; chunks only of statistics shaped
        like the tensor (element-wise methods); others whole (the probe's one-element chunk: None)."""
        if name not in ck:
            return None
        if n is None:
            return ck.tensor(name)
        return self._read(ck, name, start, n) if ck.infos[name].shape == self.base.infos[name].shape else None

    def task(self, name: str | None, start: int, n: int | None) -> tuple[Tensor, int]:
        """Merged values of elements [start, start + n) of tensor `name` (all of it if n is None),
        and the number of bytes read. Integer tensors are copied from the base."""
        if name is None:
            return torch.empty(0), 0
        info = self.base.infos[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype), 0
        if not info.dtype.is_floating_point:
            out = self._read(self.base, name, start, n)
            return out, out.numel() * info.dtype.itemsize
        base = self._read(self.base, name, start, n)
        thetas = [self._read(ck, name, start, n) for ck in self.models]
        fishers = [self._read(ck, name, start, n) for ck in self.fishers] or None
        bf = self._read(self.base_fisher, name, start, n) if self.base_fisher else None
        nread = sum(t.numel() * t.element_size() for t in [base, *thetas, *(fishers or []), *([bf] if bf is not None else [])])
        if self.out_dtype is not None and self.out_dtype != info.dtype:  # no double rounding
            cd = compute_dtype(info.dtype)
            base, thetas = base.to(cd), [t.to(cd) for t in thetas]
        st = {k: [self._stat(ck, name, start, n) for ck in cks]
              for k, cks in self.stats.items()}
        if n is None or n <= BLOCK:
            return self.merge(name, base, thetas, fishers, bf, st), nread
        out = None
        for b in range(0, n, BLOCK):  # element-wise: block b of the output reads block b of each input
            cut = slice(b, b + BLOCK)
            part = self.merge(name, base[cut], [t[cut] for t in thetas], fishers and [f[cut] for f in fishers],
                              None if bf is None else bf[cut],
                              {k: [None if v is None else v[cut] for v in vs] for k, vs in st.items()})
            if out is None:
                out = torch.empty(n, dtype=part.dtype)
            out[cut] = part
        return out, nread


def _open_stats(m, open_, stats: Mapping[str, Sequence[PathLike]] | None, n: int) -> dict[str, list[Checkpoint]]:
    """Statistics files other than Fishers (RegMean's Grams, mask-node Fishers), one per model; a name
    missing from a file means no statistic for that tensor (None)."""
    stats = dict(stats or {})
    want = [s for s in m.stats if s != "fishers"]
    if sorted(stats) != sorted(want):
        raise MergeError(f"method {m.name!r} takes the statistics {want or 'none'} (besides Fishers), "
                         f"got files for {sorted(stats) or 'none'}")
    for k, paths in stats.items():
        if len(paths) != n or any(p is None for p in paths):
            raise MergeError(f"give a {k!r} file for every model: got {len(paths)} for {n} models")
    return {k: [open_(validate.path(p, f"stats.{k}[{i}]")) for i, p in enumerate(paths)] for k, paths in stats.items()}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def load_config(config: PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a merge config (YAML file or dict); returns merge_checkpoints' arguments.
    Every value is type-checked here, before any file is opened; errors name the key."""
    root, source = Path.cwd(), None
    if not isinstance(config, Mapping):
        path = validate.path(config, "config")
        if not path.is_file():
            raise MergeError(f"config file {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise MergeError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
        root, source = path.parent, path
        if not isinstance(config, Mapping):
            raise MergeError(f"config {path} must be a YAML mapping (base:, models:, method:, output:)")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise MergeError(f"unknown config field(s) {sorted(map(str, unknown))}; known: {sorted(CONFIG_KEYS)}")
    missing = [k for k in ("base", "models", "method", "output") if k not in config]
    if missing:
        raise MergeError(f"config is missing the field(s) {missing}")
    rel = lambda p, key: str(root / validate.path(p, key))  # noqa: E731
    models = config["models"]
    if not isinstance(models, list) or not models:
        raise MergeError(f"config field 'models' must be a non-empty list of {{path:, alpha:}} entries, "
                         f"got {type(models).__name__} {str(models)[:40]}")
    paths, alphas, fishers, sizes, stats = [], [], [], [], {}
    for i, e in enumerate(models):
        key = f"models[{i}]"
        e = {"path": e} if isinstance(e, (str, os.PathLike)) else e
        if not isinstance(e, Mapping) or "path" not in e:
            raise MergeError(f"{key} must have a 'path' (and optionally alpha, fisher, size)")
        if set(e) - MODEL_KEYS:
            raise MergeError(f"{key} has unknown field(s) {sorted(map(str, set(e) - MODEL_KEYS))}; "
                             f"known: {sorted(MODEL_KEYS)}")
        paths.append(rel(e["path"], f"{key}.path"))
        alphas.append(validate.number(e["alpha"], f"{key}.alpha") if "alpha" in e else 1.0)
        fishers.append(rel(e["fisher"], f"{key}.fisher") if "fisher" in e else None)
        sizes.append(validate.number(e["size"], f"{key}.size", "(0, inf)") if "size" in e else None)
        for k, p in validate.mapping(e.get("stats", {}), f"{key}.stats").items():
            stats.setdefault(k, [None] * len(models))[i] = rel(p, f"{key}.stats.{k}")
    if any(f is not None for f in fishers) and any(f is None for f in fishers):
        raise MergeError("give a 'fisher' file for every model or for none")
    m = get_method(validate.text(config["method"], "method"))
    options = dict(validate.mapping(config.get("options", {}), "options"))
    for key in ("delta", "base_size"):
        if key in config:
            if key in options:
                raise MergeError(f"{key} is given twice, at the top and in options; keep one")
            options[key] = validate.number(config[key], key)
    shard_size = config.get("shard_size", "5GB")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, str)):
        raise MergeError(f"shard_size must be a size such as 2GB or a number of bytes, got {shard_size!r}")
    try:
        parse_size(shard_size)
    except MergeError as e:
        raise MergeError(f"shard_size: {e}") from None
    output = rel(config["output"], "output")
    if source is not None:
        validate.check_output(output, [source])
    return dict(base=rel(config["base"], "base"), models=paths, output=output, method=m.name, alphas=alphas,
                fishers=fishers if fishers[0] is not None else None, sizes=sizes,
                base_fisher=rel(config["base_fisher"], "base_fisher") if "base_fisher" in config else None,
                options=validate.knobs(m, options), dtype=validate.float_dtype(config.get("dtype")),
                shard_size=shard_size, overwrite=validate.boolean(config.get("overwrite", False), "overwrite"),
                stats=stats or None)


def merge_config(config: PathLike | Mapping[str, Any], **overrides) -> Summary:
    """Run the merge a config describes (overrides: e.g. progress=False, overwrite=True)."""
    return merge_checkpoints(**{**load_config(config), **overrides})


def write_config(path: PathLike, base: PathLike, models: Sequence[PathLike], output: PathLike, *,
                 alphas: Sequence[float] | None = None, fishers: Sequence[PathLike] | None = None,
                 method: str = "task_arithmetic", **extra: Any) -> Path:
    """Write the YAML config of a merge (the format above; `extra`: delta, base_fisher,
    shard_size, ...) atomically to `path` and return `path`."""
    from .atomic import atomic_file

    alphas = [1.0] * len(models) if alphas is None else list(alphas)
    entries = [{"path": str(p), "alpha": float(a)} for p, a in zip(models, alphas)]
    for entry, f in zip(entries, fishers or ()):
        entry["fisher"] = str(f)
    cfg = {"base": str(base), "models": entries, "method": method, "output": str(output),
           **{k: str(v) if isinstance(v, os.PathLike) else v for k, v in extra.items()}}
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(path)
