"""Fisher files: a diagonal Fisher F_t stored like a checkpoint, plus what a merge needs to trust it.

A Fisher file is safetensors with the model's tensor names (the per-example MEAN Fisher, so
H_t = N_t F_t) and string metadata: estimator (the Fisher kind), n_samples, n_examples (examples
averaged over), dataset_size (N_t), task, and model_hash (`toolkit.checkpoint.fingerprint` of
the checkpoint it was estimated at: a merge refuses a Fisher of another model).

`estimate_fisher_file` is `python -m toolkit fisher`: a causal LM on a text file, one text per
line (.txt) or one JSON object per line with a "text" field (.jsonl). Under
`accelerate launch -m toolkit fisher ...` each of the P processes takes every P-th example,
computes the mean Fisher F_p of its n_p examples, and one all-reduce gives
F = sum_p n_p F_p / sum_p n_p, the mean over all examples.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from . import validate
from .atomic import atomic_file
from .checkpoint import Checkpoint, fingerprint
from .errors import MergeError

FORMAT = "toolkit-fisher-1"


@dataclass(frozen=True)
class FisherInfo:
    """A Fisher file's metadata."""
    path: Path
    estimator: str
    n_examples: int
    dataset_size: float | None
    model_hash: str | None
    extra: dict[str, str] = field(default_factory=dict)


def write_fisher(path: str | os.PathLike, fisher: Mapping[str, Tensor], *, estimator: str, n_examples: int,
                 dataset_size: float | None = None, model_hash: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save per-example mean Fishers {name: F} with metadata, atomically (temp file + rename)."""
    n_examples = validate.number(n_examples, "n_examples", "[1, inf)", integer=True)
    if dataset_size is not None:
        dataset_size = validate.number(dataset_size, "dataset_size", "(0, inf)")
    for k, f in fisher.items():
        if not f.is_floating_point() or not torch.isfinite(f).all() or (f < 0).any():
            raise MergeError(f"Fisher for {k!r} must be finite, non-negative floats")
    meta = {"estimator": str(estimator), "n_examples": str(n_examples)}
    if dataset_size is not None:
        meta["dataset_size"] = repr(float(dataset_size))
    return save_statistic(path, fisher, meta, model_hash=model_hash, metadata=metadata)


def save_statistic(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, str], *,
                   model_hash: str | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save per-model statistics (Fishers, Grams) as safetensors with metadata ("toolkit": the
    file format, this module's unless `meta` names another), atomically (temp file + rename)."""
    from safetensors.torch import save_file

    meta = {"format": "pt", "toolkit": FORMAT, **meta}
    if model_hash:
        meta["model_hash"] = model_hash
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def fisher_info(path: str | os.PathLike) -> FisherInfo:
    """Read a Fisher file's metadata (header only)."""
    with Checkpoint(path) as ck:
        m = dict(ck.metadata)
    size = m.pop("dataset_size", None)
    return FisherInfo(Path(path), m.pop("estimator", "unknown"), int(m.pop("n_examples", 0)),
                      None if size is None else float(size), m.pop("model_hash", None), m)


def read_fisher(path: str | os.PathLike) -> tuple[dict[str, Tensor], FisherInfo]:
    """A Fisher file's tensors (in memory) and metadata."""
    with Checkpoint(path) as ck:
        return ck.state_dict(), fisher_info(path)


# ---------------------------------------------------------------------------------------------
# Data: texts -> causal-LM batches
# ---------------------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike, text_key: str = "text") -> list[str]:
    """Examples from a .txt file (one per non-empty line) or .jsonl file ({"text": ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"data file {path} does not exist")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise MergeError(f"data file {path} is not UTF-8 text (byte {e.start}); give .txt or .jsonl") from None
    if path.suffix != ".jsonl":
        texts = lines
    else:
        texts = []
        for i, ln in enumerate(lines):
            try:
                texts.append(str(json.loads(ln)[text_key]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MergeError(f"{path}: line {i + 1} is not a JSON object with a {text_key!r} field") from None
    if not texts:
        raise MergeError(f"data file {path} has no examples")
    return texts


def lm_batches(tokenizer, texts: Sequence[str], batch_size: int = 1, max_length: int = 128,
               device: torch.device | str = "cpu") -> list[tuple[dict[str, Tensor], Tensor]]:
    """(inputs, labels) batches for a causal LM: labels are the input ids, -100 at padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        out.append((inputs, labels))
    return out


# ---------------------------------------------------------------------------------------------
# Estimation (one or several processes)
# ---------------------------------------------------------------------------------------------


def reduce_mean(fisher: Mapping[str, Tensor], count: int, world: int) -> tuple[dict[str, Tensor], int]:
    """Combine per-process mean Fishers: F = sum_p n_p F_p / sum_p n_p (one all-reduce per tensor)."""
    if world == 1:
        return dict(fisher), count
    import torch.distributed as dist

    n = torch.tensor([float(count)], dtype=torch.float64, device=next(iter(fisher.values())).device)
    dist.all_reduce(n)
    total = int(n.item())
    out = {}
    for k, f in fisher.items():
        s = f.to(torch.float64) * count
        dist.all_reduce(s)
        out[k] = (s / total).to(f.dtype)
    return out, total


def to_checkpoint_names(fisher: Mapping[str, Tensor], ck: Checkpoint) -> dict[str, Tensor]:
    """Key the Fisher exactly like the checkpoint's float tensors (what a merge reads); tensors
    that are not parameters of the loaded model (buffers) get zeros, with a warning."""
    out, zeros = {}, []
    for k, info in ck.infos.items():
        if not info.dtype.is_floating_point:
            continue
        f = fisher.get(k)
        if f is None:
            zeros.append(k)
            f = torch.zeros(info.shape)
        elif tuple(f.shape) != info.shape:
            raise MergeError(f"Fisher for {k!r} has shape {tuple(f.shape)}, the checkpoint {info.shape}")
        out[k] = f.detach().float().cpu()
    if zeros:
        warnings.warn(f"{len(zeros)} float tensors of the checkpoint are not model parameters; their "
                      f"Fisher is set to 0: {zeros[:3]}", stacklevel=2)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model_dir: str | os.PathLike):
    """The model folder's tokenizer, or a MergeError saying which files it lacks."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MergeError(f"model {model_dir} must be a Hugging Face model folder (weights, config, tokenizer)")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise MergeError(f"model folder {model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer there with tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeError(f"model folder {model_dir}: its tokenizer files cannot be loaded "
                         f"({' '.join(str(e).split())[:120]})") from None


def estimate_fisher_file(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                         kind: str = "mc", n_samples: int = 1, max_examples: int | None = None,
                         dataset_size: float | None = None, batch_size: int = 8, max_length: int = 128,
                         seed: int = 0, backend: str = "auto", text_key: str = "text",
                         dtype: str = "float32", progress: bool = True, per: str = "sequence") -> FisherInfo | None:
    """Estimate the diagonal Fisher of a causal LM checkpoint on a text file and write a Fisher
    file. Runs on every process of an `accelerate launch`; rank 0 writes and returns the info
    (other ranks return None). per: as toolkit.curvature.fisher ("token": the mean over counted
    tokens, n_examples counts tokens). dataset_size N_t defaults to the number of texts in the file
    (per="token": the counted tokens, scaled by texts in the file / texts used)."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    from .curvature import fisher as estimate

    n_samples = validate.number(n_samples, "n_samples", "[1, inf)", integer=True)
    if max_examples is not None:
        max_examples = validate.number(max_examples, "max_examples", "[1, inf)", integer=True)
    if dataset_size is not None:
        dataset_size = validate.number(dataset_size, "dataset_size", "(0, inf)")
    batch_size = validate.number(batch_size, "batch_size", "[1, inf)", integer=True)
    max_length = validate.number(max_length, "max_length", "[2, inf)", integer=True)  # 1 token: nothing to predict
    seed = validate.number(seed, "seed", integer=True)
    load_dtype = validate.float_dtype(dtype, "dtype")
    model_dir, data = validate.path(model_dir, "model"), validate.path(data, "data")
    out = validate.check_output(out, [model_dir, data], "out")
    if out.is_dir():
        raise MergeError(f"out {out} is a folder; name the Fisher file to write, e.g. {out / 'fisher.safetensors'}")
    accel = hasattr(torch, "accelerator") and torch.accelerator.is_available()
    state = PartialState(cpu=not accel)  # CPU processes (torchrun) reduce over gloo
    rank, world = state.process_index, state.num_processes
    texts = read_texts(data, text_key)
    size = float(dataset_size) if dataset_size is not None else float(len(texts))
    used = texts[:max_examples] if max_examples is not None else texts
    mine = used[rank::world]
    if not mine:
        raise MergeError(f"process {rank} of {world} has no examples: {len(used)} examples for {world} processes")
    with Checkpoint(model_dir) as ck:
        model_hash = fingerprint(ck)
        tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype).to(state.device).eval()
        batches = lm_batches(tokenizer, mine, batch_size, max_length, state.device)
        f = estimate(model, batches, kind, n_samples=n_samples, backend=backend, task="causal_lm", per=per,
                     seed=seed + 1000003 * rank, progress=progress and state.is_main_process)
        f, total = reduce_mean(f, f.n, world)
        if per == "token" and dataset_size is None:
            size = total * len(texts) / len(used)
        f = to_checkpoint_names(f, ck)
    info = None
    if state.is_main_process:
        write_fisher(out, f, estimator=kind, n_examples=total, dataset_size=size, model_hash=model_hash,
                     metadata={"task": "causal_lm", "per": per, "n_samples": n_samples, "processes": world,
                               "data": Path(data).name, "max_length": max_length})
        info = fisher_info(out)
    state.wait_for_everyone()
    return info


def describe(info: FisherInfo) -> str:
    """One line about a Fisher file."""
    n = "?" if info.dataset_size is None else f"{info.dataset_size:g}"
    return (f"{info.path}: {info.estimator} Fisher over {info.n_examples} examples, N = {n}, "
            f"model {info.model_hash or 'unknown'}")

