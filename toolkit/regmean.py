"""RegMean (Jin et al., ICLR 2023): per linear layer, the weights whose outputs best match every
fine-tuned layer's outputs on its own task's inputs,

    W = argmin_W sum_t alpha_t ||X_t W^T - X_t W_t^T||^2 = (sum_t alpha_t W_t G_t') (sum_t alpha_t G_t')^{-1},

G_t = X_t^T X_t / n_t the Gram of the layer's inputs on task t (`toolkit.gram`), and
G' = r G + (1 - r) diag(G): off-diagonals shrunk by r (0.9 by default, the paper's; r = 1 is
exact least squares, r = 0 a per-input-feature weighted average). Tensors without Grams (biases,
norms, embeddings, convolutions) are averaged with weights alpha_t, as in the paper.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import MergeError
from .merge import average, register


def shrink(g: Tensor, off_diag: float) -> Tensor:
    """G' = r G + (1 - r) diag(G)."""
    return off_diag * g + (1.0 - off_diag) * torch.diag_embed(torch.diagonal(g))


@register("regmean", stats=("grams",), alpha_cancels=True, label="RegMean", color="#949494")
def regmean(base: Tensor, thetas: list[Tensor], alphas: list[float], grams: list[Tensor | None],
            off_diag: float = 0.9) -> Tensor:
    """RegMean: W = (sum_t alpha_t W_t G_t') (sum_t alpha_t G_t')^{-1}, G' = r G + (1-r) diag G; no Gram: average."""
    if not 0.0 <= off_diag <= 1.0:
        raise MergeError(f"regmean: off_diag must be in [0, 1], got {off_diag}")
    if any(a < 0 for a in alphas) or math.fsum(alphas) <= 0:
        raise MergeError(f"regmean needs non-negative alphas with a positive sum, got {alphas}")
    have = [g is not None for g in grams]
    if not any(have):
        return average(base, thetas, alphas)
    if not all(have):
        raise MergeError(f"regmean: Grams given for {sum(have)} of {len(have)} models of this tensor; "
                         "give one for every model or for none")
    if base.dim() != 2:
        raise MergeError(f"regmean: a Gram was given for a {base.dim()}-D tensor; Grams belong to 2-D "
                         "linear weights [out, in]")
    n_in = base.shape[1]
    for i, g in enumerate(grams):
        if g.shape != (n_in, n_in):
            raise MergeError(f"regmean: Gram {i} has shape {tuple(g.shape)}, the weight [out, in] = "
                             f"{tuple(base.shape)} needs [{n_in}, {n_in}]")
    gs = [a * shrink(g, off_diag) for a, g in zip(alphas, grams)]
    total = sum(gs)
    rhs = sum(g @ w.T for g, w in zip(gs, thetas))  # sum_t G_t' W_t^T  [in, out]
    sol, info = torch.linalg.solve_ex(total, rhs)
    if int(info) != 0 or not torch.isfinite(sol).all():
        raise MergeError("regmean: sum_t G_t' is singular (an input feature that is zero on every task); "
                         "use off_diag < 1 with non-zero diagonals, or collect Grams on more data")
    return sol.T.contiguous()
