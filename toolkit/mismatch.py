"""Gradient-mismatch diagnostics: why and where a merge misses the all-data model.

With summed task losses lbar_t and prior precision H_0, the all-data target satisfies
    theta_{1:T} = theta_TA - H_0^{-1} m(theta_{1:T}),
    m(theta) = sum_t alpha_t [grad lbar_t(theta) - grad lbar_t(theta_t)],
so the error of task arithmetic is exactly the H_0^{-1}-weighted gradient mismatch.
These functions are pure (state dicts in, state dicts or numbers out); gradients come from
`toolkit.train.loss_gradient` at the edge.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .errors import MergeError
from .merge import check_alphas, check_fisher

StateDict = Mapping[str, Tensor]


def gradient_mismatch(grads_at_theta: Sequence[StateDict], grads_at_task: Sequence[StateDict],
                      alphas: Sequence[float] | None = None) -> dict[str, Tensor]:
    """m(theta) = sum_t alpha_t [grad lbar_t(theta) - grad lbar_t(theta_t)], per tensor.

    grads_at_theta[t]: gradient of task t's summed loss at the candidate merged model theta;
    grads_at_task[t]: the same at the task's own model theta_t (about 0 for a converged
    unregularised fine-tune; minus H_0 tau_t for one trained with the prior).
    """
    if len(grads_at_theta) != len(grads_at_task):
        raise MergeError(f"got {len(grads_at_theta)} gradients at theta but {len(grads_at_task)} at the task models")
    alphas = check_alphas(alphas, len(grads_at_theta))
    keys = list(grads_at_theta[0])
    for i, g in enumerate([*grads_at_theta, *grads_at_task]):
        if set(g) != set(keys):
            raise MergeError(f"gradient dict {i} has other tensor names than the first: "
                             f"{sorted(set(g) ^ set(keys))[:5]}")
    return {k: sum(a * (gm[k].double() - gt[k].double())
                   for a, gm, gt in zip(alphas, grads_at_theta, grads_at_task)) for k in keys}


def total_norm(m: StateDict) -> float:
    """||m||_2 over all tensors together."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in m.values()))


def max_abs_diff(a: StateDict, b: StateDict) -> float:
    """Largest absolute difference between two state dicts: max_k max |a_k - b_k|."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def layer_of(name: str) -> str:
    """'blocks.0.attn.qkv.weight' -> 'blocks.0.attn.qkv' (the module that owns the tensor)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def mismatch_norms(m: StateDict, by: str = "tensor") -> dict[str, float]:
    """Euclidean norm of the mismatch per tensor (by='tensor') or per module (by='layer')."""
    if by not in ("tensor", "layer"):
        raise MergeError(f"by must be 'tensor' or 'layer', got {by!r}")
    sq: dict[str, float] = {}
    for k, v in m.items():
        key = k if by == "tensor" else layer_of(k)
        sq[key] = sq.get(key, 0.0) + float((v.double() ** 2).sum())
    return {k: math.sqrt(s) for k, s in sq.items()}


def predicted_error(m: StateDict, delta: float, base_fisher: StateDict | None = None,
                    base_size: float = 0.0) -> dict[str, Tensor]:
    """H_0^{-1} m with H_0 = delta + N_0 F_0: the predicted error theta_TA - theta_{1:T}."""
    out = {}
    for k, v in m.items():
        h0 = torch.full_like(v, float(delta), dtype=torch.float64)
        if base_fisher is not None and base_size:
            if k not in base_fisher:
                raise MergeError(f"the base Fisher has no entry for {k!r}")
            check_fisher(base_fisher[k], v, f"base Fisher for {k!r}")
            h0 = h0 + base_size * base_fisher[k].double()
        if (h0 <= 0).any():
            raise MergeError(f"H_0 is not positive for {k!r}: use delta > 0")
        out[k] = v.double() / h0
    return out
