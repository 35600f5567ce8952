"""LM benchmark, removing data: the LM fine-tuned on a domain to forget, then subtracted with
negative alpha: task negation theta_0 + alpha tau_r, and gradient matching
theta_0 + (H_0 + alpha H_r)^{-1} alpha (H_0 + H_r) tau_r with H_0 = delta + N_0 F_0, F_0 the
base model's Fisher on the KEPT domains (the prior says what theta_0 must keep). Every method
that takes a base Fisher gets one curve per N_0; the others one curve. Cached as a whole.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import cache
from ..diagnostics import removal_diagnostics
from . import domains as D, pipeline as P
from .domains import LMSetup, prepare, setup  # noqa: F401  (the shared settings of both LM benchmarks)


def run(s: LMSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Removing a domain: one row per (method, alpha, N_0) with perplexity on the removed domain,
    the mean log-perplexity ratio over the kept domains (merged / base), and for gradient matching
    the diagnostics of `removal_diagnostics`. Cached as a whole."""
    s = s or setup()
    rows = cache.cached("language-table", D.table_cfg(s, "lm-remove"), lambda: _run(s, progress))
    return pd.DataFrame(rows)


def _takes_base_fisher(m: P.Method) -> bool:
    return "base_fisher" in inspect.signature(m.fn).parameters


def _run(s: LMSetup, progress: bool) -> list[dict]:
    with D.quiet(s):
        ft = D.finetune(s, s.remove, progress)
        ev = D.Evaluator(s, (s.remove, *s.domains))
        f_r = D.fisher(s, s.remove, ft, f"ft-{s.remove}")
        f_0 = D.kept_fisher(s)
        n_r = float(D.domain_size(s, s.remove))
        rows: list[dict] = []

        def record(method, alpha, ppl, **extra):
            kept = [ppl[d] for d in s.domains]
            rows.append({"method": method, "alpha": alpha, "removed": ppl[s.remove],
                         "kept": math.exp(sum(math.log(v) for v in kept) / len(kept)),
                         **{f"ppl_{d}": v for d, v in ppl.items()}, **extra})

        record("base", 0.0, ev())
        record("fine-tuned", 1.0, ev(ft))
        ms = P.methods(s.removal_methods)
        jobs = [(m, a, None) for m in ms if not _takes_base_fisher(m) for a in s.removal_alphas]
        jobs += [(m, a, k) for m in ms if _takes_base_fisher(m)
                 for k in s.base_sizes for a in s.removal_alphas]
        for m, a, k in tqdm(jobs, desc="lm-remove merges", disable=not progress, leave=False):
            if k is None:
                record(m.name, a, ev(P.merge(s, m, ev.base, [ft], a, fishers=[f_r], sizes=[n_r])))
                continue
            n0 = k * n_r
            sd = P.merge(s, m, ev.base, [ft], a, fishers=[f_r], sizes=[n_r], base_fisher=f_0,
                         base_size=n0)
            record(m.name, a, ev(sd), base_size=n0, **removal_diagnostics(f_r, n_r, a, s.delta, f_0, n0))
    base_row = rows[0]
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, removed_vs_base=r["removed"] / base_row["removed"],
                 kept_vs_base=r["kept"] / base_row["kept"])
    return rows


def gains(s: LMSetup, alpha: float, multiple: float) -> dict[str, float]:
    """removal_diagnostics for the removal run's own Fishers (from the cache after a run), with
    N_0 = multiple * N_r."""
    with D.quiet(s):
        f_r = D.domain_fisher(s, s.remove, progress=False)
        f_0 = D.kept_fisher(s)
    n_r = float(D.domain_size(s, s.remove))
    return removal_diagnostics(f_r, n_r, alpha, s.delta, f_0, multiple * n_r)


def kept_at(curve: pd.DataFrame, target: float) -> float:
    """Kept-domain perplexity ratio of a removal curve where its removed-domain ratio is `target`
    (interpolated in logs; NaN outside the curve's range)."""
    g = curve.sort_values("removed_vs_base")
    x, y = np.log(g.removed_vs_base.to_numpy()), np.log(g.kept_vs_base.to_numpy())
    inside = x.min() <= np.log(target) <= x.max()
    return float(np.exp(np.interp(np.log(target), x, y))) if inside else float("nan")


def removed_at(curve: pd.DataFrame, kept: float) -> float:
    """Removed-domain perplexity ratio of a removal curve where its kept-domain ratio is `kept`
    (interpolated in logs; NaN outside the curve's range): forgetting at matched retention."""
    g = curve.sort_values("kept_vs_base")
    x, y = np.log(g.kept_vs_base.to_numpy()), np.log(g.removed_vs_base.to_numpy())
    inside = x.min() <= np.log(kept) <= x.max()
    return float(np.exp(np.interp(np.log(kept), x, y))) if inside else float("nan")


def matched_kept(curves: list[pd.DataFrame]) -> float:
    """A retention level every curve reaches: the geometric middle of their common range of
    kept-domain ratios (NaN where they share none)."""
    lo = max(c.kept_vs_base.min() for c in curves)
    hi = min(c.kept_vs_base.max() for c in curves)
    return float(np.sqrt(lo * hi)) if hi > lo else float("nan")


def matched_target(curves: list[pd.DataFrame]) -> float:
    """A removal level every curve reaches: the geometric middle of their common range above 1
    (NaN where they share none)."""
    lo = max([c.removed_vs_base.min() for c in curves] + [1.0])
    hi = min(c.removed_vs_base.max() for c in curves)
    return float(np.sqrt(lo * hi)) if hi > lo else float("nan")


def curves(df: pd.DataFrame) -> dict[tuple[str, float | None], pd.DataFrame]:
    """The removal curves of a table: (method, N_0 or None) -> its rows over alpha, each starting
    at the base model (alpha = 0: both ratios 1)."""
    d = df[~df["method"].isin(["base", "fine-tuned"])]
    n0 = d["base_size"] if "base_size" in d else pd.Series(np.nan, index=d.index)
    base = df[df["method"] == "base"]
    return {(m, None if pd.isna(k) else float(k)): pd.concat([base.assign(method=m, base_size=k), g], ignore_index=True)
            for (m, k), g in d.assign(base_size=n0).groupby(["method", "base_size"], sort=False, dropna=False)}


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per removal curve (method, N_0): the removed-domain perplexity ratio at a retention level
    (kept-domain ratio) that every curve reaches, the kept-domain ratio at a removal level every
    curve reaches, and the strongest removal reached."""
    cs = curves(df)
    kept, target = matched_kept(list(cs.values())), matched_target(list(cs.values()))
    return pd.DataFrame([{"method": m, "base_size": k, "matched_kept_vs_base": kept,
                          "removed_vs_base_at_kept": removed_at(c, kept),
                          "matched_removed_vs_base": target, "kept_vs_base_at_removed": kept_at(c, target),
                          "max_removed_vs_base": float(c.removed_vs_base.max())}
                         for (m, k), c in cs.items()]).set_index(["method", "base_size"])


def curve_label(method: str, base_size: float | None, n_r: float) -> str:
    """A removal curve's name: task negation, or gradient matching with its N_0 / N_r."""
    if base_size is None or pd.isna(base_size):
        return "task negation" if method == "task_arithmetic" else method
    return f"{method.replace('_', ' ')}, $N_0 = {base_size / n_r:g} N_r$"


def figure(df: pd.DataFrame, n_r: float):
    """The removal curves: perplexity on the kept domains (cost) against perplexity on the
    removed domain (forgetting), both relative to the base, along alpha (labelled)."""
    from .. import plots
    fig, ax = plots.figure(width=6.0, height=4.2)
    for i, ((m, n0), g) in enumerate(curves(df).items()):
        g = g.sort_values("alpha", ascending=False)
        ax.plot(g.kept_vs_base, g.removed_vs_base, marker="o", color=f"C{i}", label=curve_label(m, n0, n_r))
        for _, r in g.iterrows():
            ax.annotate(f"{r.alpha:g}", (r.kept_vs_base, r.removed_vs_base), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.scatter([1.0], [1.0], color="k", marker="x", zorder=5)
    ax.annotate("base", (1.0, 1.0), fontsize=8, xytext=(4, -10), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="perplexity on the kept domains / base (cost)",
           ylabel="perplexity on the removed domain / base (forgetting)")
    plots.legend_outside(ax)
    return fig


def quotes(s: LMSetup, df: pd.DataFrame) -> dict[str, Any]:
    """Every number and verdict the chapter quotes about removal (keys without the chapter's
    prefix): the fine-tuned model, the guard's diagnostics, and forgetting at matched retention,
    gradient matching (its best N_0) against task negation by the one tie rule over seeds."""
    from ..merge import METHODS
    n_r = float(D.domain_size(s, s.remove))
    per_seed = pd.concat([summary(g).reset_index().assign(seed=seed) for seed, g in df.groupby("seed")])
    per_seed["curve"] = [curve_label(m, k, n_r) for m, k in zip(per_seed["method"], per_seed["base_size"])]
    seeds = P.by_seed(per_seed, "removed_vs_base_at_kept", key="curve")
    gm = per_seed[per_seed["method"] == "gradient_matching"]
    best = gm.groupby("curve")["removed_vs_base_at_kept"].mean().fillna(-np.inf).idxmax()
    ta = curve_label("task_arithmetic", None, n_r)
    gmr = df[df["method"] == "gradient_matching"]
    guard = METHODS["gradient_matching"].defaults.get("guard")
    return {
        "guard": float("nan") if guard is None else float(guard),
        "ft": float(df.loc[df["method"] == "fine-tuned", "removed_vs_base"].mean()),
        "kept": float(per_seed["matched_kept_vs_base"].mean()),
        "ta-at": float(seeds[ta].mean()), "gm-at": float(seeds[best].mean()),
        "gm-n0": float(gm.loc[gm["curve"] == best, "base_size"].iloc[0] / n_r),
        "cmp": P.compare(seeds, best, ta, higher="forgets more than task negation",
                         lower="forgets less than task negation", tie="ties with task negation")
        if seeds[[best, ta]].notna().all(axis=None) else "cannot be compared there (a curve does not reach it)",
        "gain-max": float(gmr["gain_max"].max()), "floored-max": float(gmr["floored"].max()),
        "finite": "finite" if np.isfinite(gmr[["removed", "kept"]].to_numpy()).all() else "not finite",
    }
