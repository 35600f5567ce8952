"""Fisher diagnostics of a merge: how gradient matching with alpha < 0 (removing data) moves each
element, given the Fishers and the removal guard.

Pure functions over state dicts of Fishers (per-example means F_t) and task vectors; companions
of `toolkit.mismatch` (which measures the gradient mismatch itself).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def removal_diagnostics(fisher_r: StateDict, size_r: float, alpha: float, delta: float,
                        base_fisher: StateDict | None, base_size: float,
                        guard: float | None = None) -> dict[str, float]:
    """How gradient matching with alpha < 0 moves each element: step = g tau_r with
    g = alpha (H_0 + H_r) / max(Hbar, c (H_0 + |alpha| H_r)), Hbar = H_0 + alpha H_r, c the guard of
    `toolkit.merge.gradient_matching` (its default unless given). Returns the fraction of elements
    where the floor binds and the median, 99th percentile (of a sample) and maximum of |g| / |alpha|
    (1 = task negation; the floor caps it at max(1, 1/|alpha|) / c)."""
    from .merge import METHODS
    c = METHODS["gradient_matching"].defaults.get("guard") if guard is None else guard
    gains, bad, total, gain_max = [], 0, 0, 0.0
    for k, f in fisher_r.items():
        h0 = torch.full_like(f, delta, dtype=torch.float64)
        if base_fisher is not None:
            h0 = h0 + base_size * base_fisher[k].double()
        hr = size_r * f.double()
        hbar, scale = h0 + alpha * hr, h0 + abs(alpha) * hr
        if c is None:  # the older guard: task negation (gain 1) where Hbar <= 1e-6 (H_0 + |alpha| H_r)
            floored = hbar <= 1e-6 * scale
            g = torch.where(floored, torch.ones_like(hbar), (h0 + hr) / hbar.where(~floored, torch.ones_like(hbar)))
        else:
            floored = hbar < c * scale
            g = (h0 + hr) / torch.maximum(hbar, c * scale)
        bad += int(floored.sum())
        total += f.numel()
        g = g.flatten()
        gain_max = max(gain_max, float(g.max()))
        pick = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:20000]
        gains.append(g[pick].float())
    g = torch.cat(gains) if gains else torch.zeros(1)
    return {"floored": bad / max(total, 1), "gain_median": float(g.median()),
            "gain_p99": float(torch.quantile(g, 0.99)), "gain_max": gain_max}
