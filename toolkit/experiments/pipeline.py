"""What every benchmark shares: the settings' merge knobs, the merge-at-a-grid loop over the
registry, the per-method summary, and the scale, device and CSV helpers.

base theta_0 -> fine-tune per task -> Fishers F_t -> `merges` (every registered method over its
alpha grid, `merge.merge_at`) -> evaluate -> one tidy table -> `best_alpha` summary.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from .. import cache
from ..atomic import atomic_file
from ..errors import MergeError
from ..merge import METHODS, Method, get_method, merge_at
from ..scale import SCALES, get_scale

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The settings every benchmark has: scale, seed, the alpha grid, and the merge knobs (one set
    for every method; `merge_at` hands each method the ones it takes)."""
    scale: str
    seed: int                    # fine-tuning, heads, Fisher sampling, DARE masks, data caps
    alphas: tuple[float, ...]
    delta: float                 # H_0 = delta I of gradient matching
    ties_density: float = 0.2
    dare_p: float = 0.5
    fisher_floor: float = 1e-12  # Fisher averaging: avoids 0/0 where every Fisher is zero
    device: str = "cpu"

    def knobs(self, **override: Any) -> dict[str, Any]:
        """The merge knobs by the names the methods take (TIES density, DARE p and seed, ...)."""
        return {"delta": self.delta, "density": self.ties_density, "p": self.dare_p,
                "seed": self.seed, "fisher_floor": self.fisher_floor, **override}


def check_scale(scale: str | None) -> str:
    """`scale`, else $TOOLKIT_SCALE; a MergeError for anything but tiny/small/full."""
    scale = scale or get_scale()
    if scale not in SCALES:
        raise MergeError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _one_thread() -> None:
    torch.set_num_threads(1)


def parallel(jobs: Sequence[tuple[Callable[..., Any], tuple]], workers: int | None = None) -> list:
    """fn(*args) for every (fn, args) of `jobs`, results in order: in `workers` processes of one
    torch thread each (default: one per CPU core) when on a CPU with the cache on, else one after
    another in this process. Small models use two cores better as two single-threaded jobs than
    as one job on two threads (a ViT training step: 82 ms on one thread, 60 ms on two). The jobs'
    functions must be importable (spawned processes) and should cache what they make, with
    anything they share made beforehand, since the processes do not see each other's work. The
    spawned processes import the main module: a script that calls this needs the
    `if __name__ == "__main__":` guard (notebooks and `python -m toolkit.experiments` have it)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(jobs) <= 1 or cache.cache_dir() is None or torch.cuda.is_available():
        return [fn(*args) for fn, args in jobs]
    ctx = multiprocessing.get_context("spawn")  # forking a process that already runs OpenMP threads can hang
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_one_thread) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [f.result() for f in futures]


def tables(*groups: Sequence[tuple[Callable[..., pd.DataFrame], tuple]],
           workers: int | None = None) -> list[pd.DataFrame]:
    """`parallel` over the jobs of every group in one pool (so two experiments share the cores),
    then one table per group: its jobs' tables, concatenated."""
    out = parallel([job for group in groups for job in group], workers)
    res, i = [], 0
    for group in groups:
        res.append(pd.concat(out[i:i + len(group)], ignore_index=True))
        i += len(group)
    return res


def methods(names: Sequence[str] | None = None, *, fisher: bool | None = None,
            option: str | None = None) -> list[Method]:
    """Registered methods (all, or those named), optionally only those that use Fishers
    (fisher=True) or take a knob (option='delta'); registry order. "All" leaves out methods that
    need statistics the benchmarks do not compute (RegMean's Grams, mask-node Fishers: see
    `toolkit.related`, which computes them)."""
    ms = ([m for m in METHODS.values() if set(m.stats) <= {"fishers"}] if names is None
          else [get_method(n) for n in names])
    return [m for m in ms if (fisher is None or m.uses_fisher == fisher)
            and (option is None or option in m.options)]


def grid(alphas: Sequence[float], ms: Sequence[Method] | None = None) -> list[tuple[Method, float]]:
    """(method, alpha) over each method's alpha grid (one point where a common alpha cancels)."""
    return [(m, a) for m in (methods() if ms is None else ms) for a in m.grid(alphas)]


def merge(s: Setup, method: str | Method, base: StateDict, models: Sequence[StateDict],
          alpha: float, **kw: Any) -> dict[str, Tensor]:
    """One point of the alpha grid with the setup's knobs (`kw`: statistics such as fishers and
    sizes, or knobs that override the setup's, e.g. delta). Negative-alpha precision warnings
    are silenced: the benchmarks report them as diagnostics."""
    name = method if isinstance(method, str) else method.name
    stats = {k: kw.pop(k) for k in ("fishers", "sizes", "base_fisher", "stats") if k in kw}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gradient_matching: merged precision")
        return merge_at(name, base, models, alpha, **stats, **s.knobs(**kw))


def merges(s: Setup, base: StateDict, models: Sequence[StateDict], ms: Sequence[Method] | None = None,
           alphas: Sequence[float] | None = None, **kw: Any) -> Iterator[tuple[Method, float, dict]]:
    """(method, alpha, merged state dict) over the grid of every registered method (or `ms`)."""
    for m, a in grid(s.alphas if alphas is None else alphas, ms):
        yield m, a, merge(s, m, base, models, a, **kw)


def row_alpha(m: Method, alpha: float) -> float | None:
    """The alpha a table records: None where a common alpha cancels out of the method."""
    return None if m.alpha_cancels else alpha


def best_alpha(df: pd.DataFrame, value: str, keys: Sequence[str] | None = ("method", "alpha"),
               cols: Sequence[str] = (), lower: bool = False) -> pd.DataFrame:
    """Per method: the grid point (a group of `keys`; None: each row is one) with the best mean
    `value` (highest, or lowest with lower=True), the spread max - min of that mean over the
    grid, and the means of `cols` there."""
    g = df if keys is None else (
        df.groupby(list(keys), sort=False, dropna=False)[[value, *cols]].mean().reset_index())
    by = g.groupby("method", sort=False)[value]
    best = g.loc[by.idxmin() if lower else by.idxmax()].set_index("method")
    best["spread"] = by.max() - by.min()
    return best


def table_cached(cfg: dict, kind: str = "language-table") -> bool:
    """Whether a result table with this configuration is in the cache."""
    path = cache.path_for(kind, cfg)
    return path is not None and path.is_file()


def at_best(df: pd.DataFrame, best_alphas: Mapping[str, float]) -> pd.DataFrame:
    """The merge-study rows of each method at its best alpha (a `summary`'s best_alpha column;
    alpha NaN, where a common alpha cancels, counts as 1)."""
    d = df[df["study"] == "merge"].fillna({"alpha": 1.0})
    return d[d["alpha"] == d["method"].map(dict(best_alphas))]


def write_csv(df: pd.DataFrame, out: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    with atomic_file(out) as tmp:
        df.to_csv(tmp, index=False)


def to_device(x: Any, device: str) -> Any:
    from ..batch import to_device as move
    return move(x, device)


# two-sided 5% critical values of Student's t with 1..10 degrees of freedom (above: the normal's)
T_CRITICAL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """The one rule every claim of the book rests on, a paired t-test over seeds at the 5% level:
    d = a - b per seed (both indexed by seed), 'higher' / 'lower' when |mean d| exceeds
    t_{0.975, n-1} standard errors sd(d)/sqrt(n) (4.3 of them with 3 seeds), else 'a tie';
    'one seed: no verdict' with a single seed. With 3 seeds, "every seed agrees on the sign"
    alone happens by chance one time in four; this rule asks for a difference outside the noise.
    Returns the verdict, the mean difference, its range over seeds and t."""
    d = (a - b).dropna()
    if d.empty:
        raise MergeError("paired: no seed has both values")
    n, mean, lo, hi = len(d), float(d.mean()), float(d.min()), float(d.max())
    if n < 2:
        return {"diff": mean, "lo": lo, "hi": hi, "seeds": n, "t": float("nan"),
                "verdict": "one seed: no verdict"}
    se = float(d.std(ddof=1)) / math.sqrt(n)
    t = mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
    crit = T_CRITICAL[n - 2] if n - 1 <= len(T_CRITICAL) else 1.96
    verdict = "higher" if t > crit else "lower" if t < -crit else "a tie"
    return {"diff": mean, "lo": lo, "hi": hi, "seeds": n, "t": t, "verdict": verdict}


def by_seed(df: pd.DataFrame, value: str, key: str = "method") -> pd.DataFrame:
    """One column per `key` (method), one row per seed: the mean of `value` over the other rows
    (tasks, domains) of each seed; the input of `paired` and `compare`."""
    return df.groupby([key, "seed"], sort=False)[value].mean().unstack(key)


def compare(seeds: pd.DataFrame, a: str, b: str, higher: str = "higher", lower: str = "lower",
            tie: str = "a tie") -> str:
    """`paired` of columns a and b of a `by_seed` table, said in words: `higher` / `lower` /
    `tie` (or "one seed: no verdict")."""
    v = paired(seeds[a], seeds[b])["verdict"]
    return {"higher": higher, "lower": lower, "a tie": tie}.get(v, v)
