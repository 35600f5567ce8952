"""Fisher diagnostics of a merge: where H_t = N_t F_t competes with the prior and with the other
tasks, and where gradient matching with alpha < 0 (removing data) is ill-posed.

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
                        base_fisher: StateDict | None, base_size: float) -> dict[str, float]:
    """Where gradient matching with alpha < 0 is ill-posed or amplifies the task vector:
    step = g tau_r with g = alpha (H_0 + H_r) / (H_0 + alpha H_r). Returns the fraction of elements
    whose merged precision is not positive (merge.py falls back to task arithmetic there) and the
    median, 99th percentile (of a sample) and maximum of |g| / |alpha| where it is positive
    (1 = task negation)."""
    gains, bad, total, gain_max = [], 0, 0, 0.0
    for k, f in fisher_r.items():
        h0 = torch.full_like(f, delta, dtype=torch.float64)
        if base_fisher is not None:
            h0 = h0 + base_size * base_fisher[k].double()
        hr = size_r * f.double()
        hbar = h0 + alpha * hr
        ok = hbar > 1e-6 * (h0 + abs(alpha) * hr)
        bad += int((~ok).sum())
        total += f.numel()
        g = ((h0 + hr) / hbar)[ok].flatten()
        gain_max = max(gain_max, float(g.max())) if len(g) else gain_max
        pick = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:20000]
        gains.append(g[pick].float())
    g = torch.cat(gains) if gains else torch.zeros(1)
    return {"not_positive": bad / max(total, 1), "gain_median": float(g.median()),
            "gain_p99": float(torch.quantile(g, 0.99)), "gain_max": gain_max}


def fisher_competition(base: StateDict, models: Sequence[StateDict], fishers: Sequence[StateDict],
                       sizes: Sequence[float], delta: float, names: Sequence[str]) -> pd.DataFrame:
    """Where gradient matching departs from task arithmetic, per task: its share of the summed
    Fisher sum_t N_t F_t, the share of ||tau_t||^2 in elements where H_t > delta (there the merge
    averages with Fisher weights instead of adding), and the share of ||tau_t||^2 in elements where
    another task's H is larger still (there that task's value wins)."""
    rows = []
    totals = [sum(float(f[k].double().sum()) * n for k in base) for f, n in zip(fishers, sizes)]
    for i, (theta, f, n) in enumerate(zip(models, fishers, sizes)):
        tot = strong = lost = 0.0
        for k, b in base.items():
            tau2 = (theta[k].double() - b.double()) ** 2
            h = n * f[k].double()
            other = torch.stack([m * g[k].double() for j, (g, m) in enumerate(zip(fishers, sizes))
                                 if j != i]).amax(0)
            tot += float(tau2.sum())
            strong += float(tau2[h > delta].sum())
            lost += float(tau2[(h > delta) & (other > h)].sum())
        rows.append({"task": names[i], "share of sum H": totals[i] / sum(totals),
                     "tau^2 share where H > delta": strong / tot,
                     "tau^2 share where another H is larger": lost / tot})
    return pd.DataFrame(rows).set_index("task")


def fisher_scale(fishers: Sequence[StateDict], sizes: Sequence[float], delta: float,
                 names: Sequence[str] | None = None) -> pd.DataFrame:
    """How H_t = N_t F_t compares with the prior delta, per model: quantiles of H_t / delta, the
    fraction of elements where H_t > delta, and the share of sum H_t held by the top 1% of elements
    (heavy tails: a few elements carry most of the Fisher)."""
    rows = []
    for i, (f, n) in enumerate(zip(fishers, sizes)):
        h = torch.cat([v.flatten().double() for v in f.values()]) * n
        top = torch.topk(h, max(1, h.numel() // 100)).values.sum() / h.sum().clamp_min(1e-300)
        pick = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(0))[:200000]
        q = torch.quantile(h[pick], torch.tensor([0.5, 0.99], dtype=torch.float64))
        rows.append({"model": names[i] if names else i, "median H/delta": float(q[0]) / delta,
                     "p99 H/delta": float(q[1]) / delta,
                     "share H > delta": float((h > delta).double().mean()),
                     "top 1% share of sum H": float(top)})
    return pd.DataFrame(rows).set_index("model")
