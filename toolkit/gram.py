"""Gram matrices of the inputs of every linear layer, RegMean's statistic, and Gram files.

    G = 1/n sum_i x_i x_i^T     (x_i: one row of the layer's input, i.e. one token or one image patch)

collected with forward hooks in ONE forward pass per batch (no backward pass), keyed by the
state-dict name of the layer's weight [out, in] (so `G` is [in, in]): `blocks.0.attn.qkv.weight`
in timm, `bert.encoder.layer.0.attention.self.query.weight` in Hugging Face. Every `nn.Linear`
counts (timm, transformers' BERT/Llama/... layers); GPT-2's transposed `Conv1D` does not.
For dict inputs with an `attention_mask`, padded positions are left out.

A Gram file is safetensors with those names and string metadata (statistic=gram,
n_rows, n_examples, model_hash, plus any extra), written atomically like a Fisher file.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .batch import batch_size
from .errors import MergeError

FORMAT = "toolkit-gram-1"


def linear_layers(model: nn.Module, params: Callable[[str], bool] | None = None) -> dict[str, nn.Linear]:
    """{state-dict name of the weight: layer} for every nn.Linear (optionally filtered by name)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            if params is None or params(key):
                out[key] = mod
    if not out:
        raise MergeError("grams: the model has no nn.Linear layers (after the name filter)")
    return out


@contextlib.contextmanager
def pre_hooks(model: nn.Module, hooks: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """The model in eval mode with forward pre-hooks on the given modules; both undone on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)


@torch.no_grad()
def grams(model: nn.Module, batches: Iterable[Any], *, params: Callable[[str], bool] | None = None,
          max_examples: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Mean Gram matrix 1/n X^T X of each linear layer's inputs over `batches` ((inputs, targets)
    pairs or inputs alone), and the number of examples used. One forward pass per batch; float32
    (float64 for float64 layers); the model is in eval mode meanwhile and is not changed."""
    layers = linear_layers(model, params)
    acc = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64 if m.weight.dtype == torch.float64
                          else torch.float32, device=m.weight.device) for k, m in layers.items()}
    rows = dict.fromkeys(layers, 0)
    keep: list[Tensor | None] = [None]  # the current batch's mask of real (non-padding) positions

    def hook(key: str):
        def fn(mod, inp):
            x = inp[0]
            if keep[0] is not None and x.dim() == 3 and x.shape[:2] == keep[0].shape:
                x = x[keep[0]]
            x = x.reshape(-1, x.shape[-1]).to(acc[key].dtype)
            acc[key].addmm_(x.T, x)
            rows[key] += x.shape[0]
        return fn

    seen = 0
    with pre_hooks(model, [(m, hook(k)) for k, m in layers.items()]):
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_examples is not None and seen >= max_examples:
                break
            B = batch_size(inputs)
            if max_examples is not None and seen + B > max_examples:
                B = max_examples - seen
                inputs = ({k: v[:B] if isinstance(v, Tensor) else v for k, v in inputs.items()}
                          if isinstance(inputs, dict) else inputs[:B])
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            keep[0] = None if mask is None else mask.bool()
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
            seen += B
    if seen == 0:
        raise MergeError("grams: no examples in the batches")
    return {k: acc[k] / max(rows[k], 1) for k in layers}, seen


def write_grams(path: str | os.PathLike, gram: Mapping[str, Tensor], *, n_examples: int,
                model_hash: str | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save mean Grams {weight name: G} with metadata, atomically (temp file + rename)."""
    from .fisherfile import save_statistic

    for k, g in gram.items():
        if g.dim() != 2 or g.shape[0] != g.shape[1] or not g.is_floating_point() or not torch.isfinite(g).all():
            raise MergeError(f"Gram for {k!r} must be a finite square float matrix, got {tuple(g.shape)}")
    meta = {"toolkit": FORMAT, "statistic": "gram", "n_examples": str(int(n_examples))}
    return save_statistic(path, gram, meta, model_hash=model_hash, metadata=metadata)


def read_grams(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A Gram file's matrices and metadata; MergeError if it is not a Gram file."""
    from .checkpoint import Checkpoint

    with Checkpoint(path) as ck:
        meta = dict(ck.metadata)
        if meta.get("statistic") != "gram":
            raise MergeError(f"{path} is not a Gram file (metadata statistic={meta.get('statistic')!r})")
        return ck.state_dict(), meta
