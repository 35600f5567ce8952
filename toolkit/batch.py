"""How the toolkit feeds a batch to a model: one place, so every loop agrees.

A batch is `(inputs, targets)`; inputs are a tensor (vision, MLPs) or a dict of tensors
(transformers). `logits` returns the model's output scores for either.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def logits(model: nn.Module, inputs: Any) -> Tensor:
    """model(inputs) or model(**inputs); unwraps `.logits` of transformers outputs."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def to_device(x: Any, device: torch.device | str) -> Any:
    """Move a tensor, or a dict/list/tuple of tensors, to `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def batch_size(inputs: Any) -> int:
    """Number of examples in a batch's inputs."""
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    return len(inputs)


def take(x: Any, sl: slice | int) -> Any:
    """Rows `sl` of a tensor or of every tensor in a dict (a batch slice; an int keeps the dim)."""
    if isinstance(sl, int):
        sl = slice(sl, sl + 1)
    if isinstance(x, Tensor):
        return x[sl]
    if isinstance(x, dict):
        return {k: v[sl] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in x.items()}
    return x
