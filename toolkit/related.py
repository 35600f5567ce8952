"""The related methods on the vision benchmark (chapter 7): the leaderboard of every registered
method and WEMoE, and the studies of IVON's free uncertainty and Weight Scope Alignment; one seed
per call (`over_seeds` and `seed_jobs` run several side by side), every claim made over seeds with `pipeline.paired`.

Protocol: every knob (alpha from `Method.grid`, the others from `KNOBS`, WEMoE's adaptation
steps) is chosen on the validation split chapter 5 carves from each task's training data
(`E.artifacts(s)["vals"]`; a fixed random subset of `val_cap` per task), and only the chosen point
is evaluated on the whole test split. Scores are normalised: a task's accuracy divided by its own
fine-tuned model's on the same split. A method enters the leaderboard by its `register` decorator
alone: its statistics come from `STATISTICS` by name (chapter 5's Fishers are reused, not
recomputed). Results are cached per seed (`toolkit.cache`), keyed by everything they depend on.
"""
from __future__ import annotations

import functools
import itertools
import statistics as stat
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cache, data as D, vision as V
from .experiments import pipeline as P, vision as E
from .merge import METHODS, get_method
from .mismatch import gradient_mismatch, total_norm
from .scale import pick as by_scale

if TYPE_CHECKING:
    from .experiments.text_add import TextAddSetup

StateDict = Mapping[str, Tensor]
VERSION = 4  # of the tables cached here: bump when what they hold changes meaning
KNOBS: dict[str, dict[str, tuple]] = {"ties": {"density": (0.2, 0.5)}, "dare": {"p": (0.3, 0.7)},
                                      "regmean": {"off_diag": (0.5, 0.9, 1.0)}}


def val_cap(scale: str) -> int | None:
    """Validation examples per task that choose the knobs (None: all): a subset at `small`, where
    each of the ~50 evaluations per seed is a pass of the ViT on a CPU."""
    return by_scale(None, 64, None, scale)


def study_size(scale: str) -> int | None:
    """Tasks in the IVON and WSA studies (None: all): each needs its own fine-tunings."""
    return by_scale(2, 2, None, scale)


def wemoe_settings(scale: str) -> tuple[int, int, float]:
    """WEMoE's test-time adaptation: (steps, unlabeled inputs per task and step, Adam's learning
    rate); a few steps need a larger rate (at 1e-3, 8 steps left every prediction unchanged)."""
    return by_scale((2, 16, 1e-2), (8, 16, 1e-2), (500, 16, 1e-3), scale)


# ---------------------------------------------------------------------------------------------
# statistics and their costs
# ---------------------------------------------------------------------------------------------

def clock(s: P.Setup) -> float:
    """The clock of every cost: this process's CPU seconds on a CPU (other processes' load does
    not count), wall seconds on a GPU (after the queued kernels finish)."""
    if s.device == "cpu":
        return time.process_time()
    torch.cuda.synchronize()
    return time.perf_counter()


def step_seconds(s: E.VisionSetup, ft: dict, task: V.Task, train, repeats: int = 5) -> float:
    """Median time of one AdamW training step of a task model on one batch (the cost unit)."""
    model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device)
    x, y = next(iter(V.loader(train, s.batch_size)))
    return train_step_seconds(s, model, x.to(s.device), y.to(s.device), repeats)


def train_step_seconds(s: P.Setup, model, x, y: Tensor, repeats: int = 5) -> float:
    """Median time of one AdamW step of `model` on the batch (x, y), the first one left out."""
    from .batch import logits
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for i in range(repeats + 1):
        t = clock(s)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits(model, x), y).backward()
        opt.step()
        if i:
            times.append(clock(s) - t)
    model.eval()
    return stat.median(times)


def _batches(s: E.VisionSetup, train):
    return ((x.to(s.device), y.to(s.device)) for x, y in V.loader(train, s.batch_size))


def _mc_fisher(s: P.Setup, model, batches, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    from .curvature import fisher
    return fisher(model, batches, s.fisher_kind, seed=s.seed, progress=False,
                  max_examples=s.fisher_examples, params=keep)


def _grams(s: P.Setup, model, batches, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    from .gram import grams
    return grams(model, batches, params=keep, max_examples=s.fisher_examples)[0]


def _node_fishers(s: P.Setup, model, batches, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    from .masknodes import expand, node_fishers, node_groups
    groups = node_groups(model)  # timm ViT blocks or BERT layers
    f, _ = node_fishers(model, batches, groups=groups, seed=s.seed, max_examples=s.fisher_examples)
    e = expand(f, groups, {k: v.shape for k, v in model.state_dict().items()})
    return {k: v for k, v in e.items() if keep(k)}


# statistic name (as in `register(stats=...)`) -> how one task's statistic is computed at theta_t:
# fn(setup, task model, its training batches, which parameters) on any architecture
STATISTICS: dict[str, Callable] = {"fishers": _mc_fisher, "grams": _grams, "node_fishers": _node_fishers}


def _vision_statistic(s: E.VisionSetup, name: str, model, train) -> dict[str, Tensor]:
    """STATISTICS[name] of a vision task model, keyed by backbone names."""
    keep = lambda n: n.startswith("backbone.")  # noqa: E731
    return V.backbone_keys(STATISTICS[name](s, model, _batches(s, train), keep))


# statistics chapter 5 already made (a key of `E.artifacts`): reused, their pass only timed
FROM_ARTIFACTS: dict[str, str] = {"fishers": "fishers"}


def task_statistic(s: E.VisionSetup, name: str, ft: dict, ft_cfg: dict, task: V.Task, train) -> dict:
    """{"value": one task's statistic at theta_t, "seconds": its pass} (cached)."""
    def compute():
        model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device)
        return measured(s, lambda: _vision_statistic(s, name, model, train))
    return cache.cached("related-stat", _stat_cfg(s, ft_cfg, name), compute)


def _stat_cfg(s: P.Setup, ft_cfg: dict, name: str) -> dict:
    """What one task's statistic depends on (its cache key)."""
    return {"ft": ft_cfg, "stat": name, "kind": s.fisher_kind, "examples": s.fisher_examples, "seed": s.seed,
            "clock": _clock_kind(s)}


def _clock_kind(s: P.Setup) -> str:
    return "cpu" if s.device == "cpu" else "wall"


def measured(s: P.Setup, run: Callable[[], Mapping[str, Tensor]]) -> dict:
    """{"value": run() on the CPU, "seconds": its `clock` time}."""
    t = clock(s)
    value = run()
    return {"value": {k: v.cpu() for k, v in value.items()}, "seconds": clock(s) - t}


def statistic(s: E.VisionSetup, A: dict, name: str) -> tuple[list[dict], float]:
    """Every task's statistic `name` and the seconds of one task's pass (task 0's; every task
    uses the same number of examples). Chapter 5's (`FROM_ARTIFACTS`) are reused: their pass is
    timed once, on the first seed that asks (`pass_seconds`)."""
    if name in FROM_ARTIFACTS:
        return A[FROM_ARTIFACTS[name]], pass_seconds(s, A, name)
    got = [task_statistic(s, name, ft, c, t, tr) for ft, c, t, tr in
           zip(A["finetuned"], A["ft_cfgs"], s.tasks, A["trains"])]
    return [g["value"] for g in got], got[0]["seconds"]


def _cost_key(s: E.VisionSetup, A: dict) -> dict:
    """What a cost measured on task 0 depends on (not the seed: costs are measured once)."""
    return {"base": A["base_cfg"], "task": V.config_dict(s.tasks[0]), "n": len(A["trains"][0]),
            "bs": s.batch_size, "kind": s.fisher_kind, "examples": s.fisher_examples, "clock": _clock_kind(s)}


def pass_seconds(s: E.VisionSetup, A: dict, name: str) -> float:
    """Seconds of the pass of statistic `name` on task 0's model (cached)."""
    def compute():
        ft, task = A["finetuned"][0], s.tasks[0]
        model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device)
        return measured(s, lambda: _vision_statistic(s, name, model, A["trains"][0]))["seconds"]
    return cache.cached("related-cost", {**_cost_key(s, A), "stat": name}, compute)


def unit_step(s: E.VisionSetup, A: dict) -> float:
    """Seconds of one training step of task 0's model, the cost unit (cached)."""
    ft, t, tr = A["finetuned"][0], s.tasks[0], A["trains"][0]
    return cache.cached("related-cost", {**_cost_key(s, A), "stat": "training step"},
                        lambda: step_seconds(s, ft, t, tr))


# ---------------------------------------------------------------------------------------------
# scoring: knobs on validation, the chosen point on test
# ---------------------------------------------------------------------------------------------

class Scorer:
    """Normalised accuracy per task of a backbone with each task's head: on a fixed subset of the
    validation split ("val", `val_cap`) or on the whole test split ("test"), divided by the
    task's own model's accuracy on the same data. `ev[split](backbone, which)` gives
    {task index: accuracy} (vision: `E.Evaluator`; text: `TextEvaluator`, via `from_evaluators`)."""

    def __init__(self, s: E.VisionSetup, heads: Sequence[StateDict], bbs: Sequence[StateDict],
                 vals: Sequence, tests: Sequence):
        vals = [D.cap(v, val_cap(s.scale), s.seed) for v in vals]
        self._own({"val": E.Evaluator(s, heads, vals), "test": E.Evaluator(s, heads, tests)}, bbs)

    @classmethod
    def from_evaluators(cls, ev: Mapping[str, Callable], bbs: Sequence[StateDict]) -> "Scorer":
        """A scorer over given evaluators {"val": ..., "test": ...} (any benchmark)."""
        score = cls.__new__(cls)
        score._own(ev, bbs)
        return score

    def _own(self, ev: Mapping[str, Callable], bbs: Sequence[StateDict]) -> None:
        self.ev = dict(ev)
        self.own = {k: [e(bb, [i])[i] for i, bb in enumerate(bbs)] for k, e in self.ev.items()}

    def normalise(self, split: str, acc: Sequence[float]) -> list[float]:
        return [a / o if o > 0 else float("nan") for a, o in zip(acc, self.own[split])]

    def __call__(self, backbone: StateDict, split: str) -> list[float]:
        acc = self.ev[split](backbone)
        return self.normalise(split, [acc[i] for i in range(len(acc))])


def _grid(method: str, search: Mapping[str, Mapping[str, tuple]] = KNOBS) -> list[dict]:
    """Knob settings to try: the product of search[method] (the defaults when absent)."""
    knobs = {k: v for k, v in search.get(method, {}).items() if k in get_method(method).options}
    return [dict(zip(knobs, vals)) for vals in itertools.product(*knobs.values())] or [{}]


def _mean(xs: Sequence[float]) -> float:
    """Mean over the tasks whose own model is above 0 on the split (NaN entries left out)."""
    xs = [x for x in xs if x == x]
    return stat.mean(xs) if xs else float("nan")


def pick(df: pd.DataFrame) -> pd.Series:
    """The row with the best mean normalised validation accuracy (first one on ties)."""
    return df.loc[df["val"].fillna(-1.0).idxmax()]


def sweep(s: P.Setup, method: str, base: StateDict, bbs: Sequence[StateDict], score: Scorer,
          names: Sequence[str], fishers=None, sizes=None, stats=None,
          search: Mapping[str, Mapping[str, tuple]] = KNOBS) -> dict[str, Any]:
    """Every (knobs, alpha) point of a method (knobs from `search`, alphas from `Method.grid`)
    scored on validation; the best one on test: alpha, knobs, val, test (mean normalised), test
    per task, raw test accuracy, the spread of the validation score over alpha at the chosen
    knobs, the median merge seconds, and the chosen merged backbone ("merged")."""
    m, rows, merged, top = get_method(method), [], {}, None
    for knobs in _grid(method, search):
        for a in m.grid(s.alphas):
            t = clock(s)
            sd = P.merge(s, method, base, bbs, a, fishers=fishers, sizes=sizes, stats=stats, **knobs)
            val = _mean(score(sd, "val"))
            rows.append({"alpha": a, "knobs": knobs, "val": val, "merge_seconds": clock(s) - t})
            rank = val if val == val else -1.0  # as `pick`: NaN counts as -1, the first best wins
            if top is None or rank > top:
                top, merged = rank, sd  # only the best is evaluated on test
    df = pd.DataFrame(rows)
    best = pick(df)
    test = score(merged, "test")
    at_knobs = df[df["knobs"].apply(lambda k: k == best["knobs"])]["val"]
    alpha = P.row_alpha(m, float(best["alpha"]))  # plain floats: the cache loads weights only
    return {"alpha": alpha, "knobs": best["knobs"], "val": float(best["val"]),
            "test": _mean(test), **dict(zip(names, test)),
            "test_acc": stat.mean(a * o for a, o in zip(test, score.own["test"])),
            "alpha_spread": float(at_knobs.max() - at_knobs.min()),
            "merge_seconds": float(df["merge_seconds"].median()), "merged": merged}


def _table(s: E.VisionSetup, A: dict, what: str, compute: Callable[[], list[dict]], **extra: Any) -> pd.DataFrame:
    """One seed's rows of a study, cached by everything they depend on."""
    cfg = {"ft": A["ft_cfgs"], "alphas": list(s.alphas), "knobs": s.knobs(),
           "fisher": [s.fisher_kind, s.fisher_examples], "n_test": s.n_test,
           "val": [s.val_fraction, val_cap(s.scale)], **extra}
    return _rows(what, s.seed, cfg, compute)


def _methods_key() -> dict[str, list]:
    """What a leaderboard's rows depend on in the registry (part of its cache key)."""
    return {n: [list(m.stats), dict(m.defaults), m.alpha_cancels, m.scale_knob, m.label]
            for n, m in METHODS.items()}


def _rows(what: str, seed: int, cfg: dict, compute: Callable[[], list[dict]]) -> pd.DataFrame:
    """Rows cached under (VERSION, what, seed, cfg), with a `seed` column."""
    rows = cache.cached("related-table", {"v": VERSION, "what": what, "seed": seed, **cfg}, compute)
    return pd.DataFrame(rows).assign(seed=seed)


def _at_seed(fn: Callable[..., pd.DataFrame], scale: str | None, kw: dict, seed: int,
             make: Callable[..., P.Setup] = E.setup) -> pd.DataFrame:
    return fn(make(scale, seed), **kw).reset_index()


def seed_jobs(fn: Callable[..., pd.DataFrame], seeds: Sequence[int], scale: str | None = None,
              setup: Callable[..., P.Setup] = E.setup, **kw: Any) -> list[tuple]:
    """One job per seed for `pipeline.parallel` / `pipeline.tables`: fn(setup(scale, seed), **kw)
    as a table with its index reset (`fn` and `setup` importable, so spawned processes find
    them; `setup`: chapter 5's by default, `text_add.setup` for `text_leaderboard`)."""
    return [(functools.partial(_at_seed, fn, scale, kw, make=setup), (seed,)) for seed in seeds]


def over_seeds(fn: Callable[..., pd.DataFrame], seeds: Sequence[int], scale: str | None = None,
               **kw: Any) -> pd.DataFrame:
    """fn(E.setup(scale, seed), **kw) for every seed, side by side on the CPU cores
    (`pipeline.tables`): one table (index reset, a `seed` column)."""
    return P.tables(seed_jobs(fn, seeds, scale, **kw))[0]


# ---------------------------------------------------------------------------------------------
# the leaderboard
# ---------------------------------------------------------------------------------------------

def leaderboard(s: E.VisionSetup | None = None, progress: bool = False,
                wemoe_steps: int | None = None) -> pd.DataFrame:
    """One seed: a row per registered method (plus WEMoE, marked dynamic) with the knobs chosen on
    validation, normalised test accuracy (mean and per task), the validation score's spread over
    alpha, and costs (`clock`): one task's statistics pass in seconds and in training steps, the
    merge's seconds, the parameters needed at inference beyond one backbone."""
    s = s or E.setup()
    steps = wemoe_steps if wemoe_steps is not None else wemoe_settings(s.scale)[0]
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        df = _table(s, A, "leaderboard", lambda: _leaderboard(s, A, steps), methods=_methods_key(),
                    search=KNOBS, wemoe=[steps, *wemoe_settings(s.scale)[1:]])
    return df.set_index("method")


def _leaderboard(s: E.VisionSetup, A: dict, wemoe_steps: int) -> list[dict]:
    names, bbs = A["names"], [ft["backbone"] for ft in A["finetuned"]]
    score = Scorer(s, [ft["head"] for ft in A["finetuned"]], bbs, A["vals"], A["tests"])
    step = unit_step(s, A)
    at_task = [gradient_at_task(s, ft, c, t, tr)
               for ft, c, t, tr in zip(A["finetuned"], A["ft_cfgs"], s.tasks, A["trains"])]
    rows = method_rows(s, A["base"], bbs, score, names, A["sizes"], lambda st: statistic(s, A, st), step,
                       lambda sd: mismatch_norm(s, sd, A["finetuned"], A["trains"], at_task))
    lam = next(r["alpha"] for r in rows if r["method"] == "task_arithmetic")
    rows.append(wemoe_row(s, A, score, lam, wemoe_steps, step))
    return rows


def method_rows(s: P.Setup, base: StateDict, bbs: Sequence[StateDict], score: Scorer, names: Sequence[str],
                sizes: Sequence[float], statistic: Callable[[str], tuple[list, float]], step: float,
                mismatch: Callable[[StateDict], float],
                search: Mapping[str, Mapping[str, tuple]] = KNOBS) -> list[dict]:
    """A leaderboard row per registered method whose statistics `STATISTICS` knows (any
    benchmark): `sweep` (knobs on validation, the chosen point on test), the mismatch
    ||m(theta)|| of the chosen merge, and one task's statistics pass (`statistic(name)` gives
    (per-task values, seconds)) in seconds and in training steps of `step` seconds."""
    rows = []
    for name, m in METHODS.items():
        if any(st not in STATISTICS for st in m.stats):
            continue  # a statistic the benchmark cannot compute yet: add it to STATISTICS
        got = {st: statistic(st) for st in m.stats}
        vals = {st: v for st, (v, _) in got.items()}
        fishers = vals.pop("fishers", None)
        sec = sum(t for _, t in got.values())
        r = sweep(s, name, base, bbs, score, names, fishers, sizes, vals, search)
        r["mismatch"] = mismatch(r.pop("merged"))
        rows.append({"method": name, "label": m.label, **r, "stat_seconds": sec, "stat_steps": sec / step,
                     "extra_params": 0, "dynamic": False})
    return rows


def wemoe_row(s: E.VisionSetup, A: dict, score: Scorer, lam: float, steps: int, step: float) -> dict:
    """WEMoE with lam = task arithmetic's validated alpha, its routers adapted on the unlabeled
    test inputs (test-time training, as in the paper); the number of adaptation steps is a knob
    chosen on validation among 0 (task arithmetic), steps/2 and steps."""
    from .wemoe import build
    t0 = clock(s)
    moe = build(V.make_backbone(s.vit), A["base"], [ft["backbone"] for ft in A["finetuned"]],
                lam=lam, init=lam).to(s.device)
    built = clock(s) - t0
    heads = [h.eval().requires_grad_(False) for h in score.ev["test"].heads]
    batch = wemoe_settings(s.scale)[1]
    unlabeled = [[x.to(s.device) for x, _ in itertools.islice(V.loader(t, batch, shuffle=True, seed=s.seed), steps)]
                 for t in A["tests"]]

    def accuracy(split: str) -> list[float]:
        ev = score.ev[split]
        return score.normalise(split, [V.accuracy(V.TaskModel(moe, h), ds, device=s.device)
                                       for h, ds in zip(heads, ev.tests)])
    tokens = (s.vit.img_size // s.vit.patch_size) ** 2 + 1
    return _wemoe_adapted(s, moe, built, heads, unlabeled, accuracy, score, A["names"], lam, steps, step, tokens)


def _wemoe_adapted(s: P.Setup, moe, built: float, heads: Sequence[Callable], unlabeled: Sequence,
                   accuracy: Callable[[str], list[float]], score: Scorer, names: Sequence[str], lam: float,
                   steps: int, step: float, tokens: int) -> dict:
    """WEMoE's row on any benchmark: the routers adapted (`wemoe.adapt`) for 0, steps/2 and steps
    steps, the count with the best normalised validation score (`accuracy(split)`) kept and
    evaluated on test; costs in seconds and in training steps of `step` seconds; `tokens`
    per example through the routed MLPs (for the multiply-add ratio)."""
    from .wemoe import adapt, extra_parameters, forward_flops, routers
    lr = wemoe_settings(s.scale)[2]

    def state() -> list[Tensor]:
        return [p.detach().clone() for p in routers(moe)]
    torch.manual_seed(s.seed)
    done, sec, losses = 0, 0.0, []
    points = [(0, 0.0, _mean(accuracy("val")), state())]  # (steps, seconds so far, val, routers)
    for target in sorted({max(1, steps // 2), steps}) if steps > 0 else []:
        t0 = clock(s)
        losses += adapt(moe, heads, unlabeled, steps=target - done, lr=lr)
        sec += clock(s) - t0
        done = target
        points.append((done, sec, _mean(accuracy("val")), state()))
    best, best_sec, val, weights = max(points, key=lambda p: -1.0 if p[2] != p[2] else p[2])
    with torch.no_grad():
        for p, w in zip(routers(moe), weights):
            p.copy_(w)
    test = accuracy("test")
    extra = extra_parameters(moe)
    fl = forward_flops(moe, tokens)
    return {"method": "wemoe", "label": "WEMoE (dynamic)", "alpha": lam, "knobs": {"steps": best},
            "val": val, "test": _mean(test), **dict(zip(names, test)),
            "test_acc": stat.mean(a * o for a, o in zip(test, score.own["test"])), "alpha_spread": None,
            "mismatch": None, "merge_seconds": built, "stat_seconds": best_sec, "stat_steps": best_sec / step,
            "adapt_steps": steps, "adapt_cost": sec / step,
            "extra_params": extra["task_vectors"] + extra["routers"], "dynamic": True,
            "mlp_cost_ratio": fl["wemoe_mlp"] / fl["merged_mlp"],
            "val_by_steps": {n: v for n, _, v, _ in points},
            "entropy_first_last": [losses[0], losses[-1]] if losses else None}


def summary(lb: pd.DataFrame, names: Sequence[str] = ()) -> pd.DataFrame:
    """Per method over seeds: normalised test accuracy (mean, sd; per task: mean), the knobs chosen
    per seed, the validation score, the alpha spread and the costs (means); best first."""
    g = lb.groupby("method", sort=False)
    join = lambda xs: " ".join("-" if x is None or x != x else (f"{x:g}" if isinstance(x, float) else  # noqa: E731
                                                                 ",".join(f"{v:g}" for v in x.values()) or "-")
                               for x in xs)
    out = pd.DataFrame({"label": g["label"].first(), "test": g["test"].mean(), "test sd": g["test"].std(ddof=1),
                        **{n: g[n].mean() for n in names}, "alpha per seed": g["alpha"].apply(join),
                        "knobs per seed": g["knobs"].apply(join), "val": g["val"].mean(),
                        "alpha spread": g["alpha_spread"].mean(), "mismatch": g["mismatch"].mean(),
                        "stat seconds": g["stat_seconds"].mean(),
                        "stat steps": g["stat_steps"].mean(), "merge seconds": g["merge_seconds"].mean(),
                        "extra params": g["extra_params"].first(), "dynamic": g["dynamic"].first(),
                        "seeds": g["seed"].nunique()})
    return out.sort_values("test", ascending=False)


def board_figure(res: pd.DataFrame, seeds: pd.DataFrame, width: float = 7.0):
    """The leaderboard as bars: a `summary`'s mean normalised test score per method (whiskers:
    one sd over seeds, dots: the seeds of a `pipeline.by_seed` table), WEMoE hatched, the
    individual models dashed at 1."""
    import numpy as np

    from . import plots
    fig, ax = plots.figure(width=width, height=3.8)
    order = list(res.index)
    x = np.arange(len(order))
    bars = ax.bar(x, res["test"], yerr=res["test sd"].fillna(0), capsize=3,
                  color=[plots.method_color(m) or "0.5" for m in order])
    for i, m in enumerate(order):
        if res.loc[m, "dynamic"]:
            bars[i].set_hatch("//")
        ys = seeds[m].dropna()
        ax.plot(np.full(len(ys), i), ys, "k.", ms=4)
    lo = float(seeds.min().min())
    ax.set_ylim(min(lo, float((res["test"] - res["test sd"].fillna(0)).min())) - 0.01, 1.01)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set(xticks=x, xticklabels=res["label"], ylabel="mean normalised test accuracy")
    for lbl in ax.get_xticklabels():
        lbl.set(rotation=35, ha="right", rotation_mode="anchor")
    return fig


WORDS = {"higher": "higher", "lower": "lower",
         "tie": "a tie (the mean difference is within the seeds' noise)"}


def verdict(seeds: pd.DataFrame, a: str, b: str, **words: str) -> str:
    """The book's one rule (`pipeline.compare` of a `pipeline.by_seed` table: a against b per
    seed) in the chapter's words, `WORDS` unless given; "one seed: no verdict" with one seed."""
    return P.compare(seeds, a, b, **{**WORDS, **words})


def plus_minus(mean: float, sd: float, digits: int = 3) -> str:
    """'mean ± sd' (just the mean when sd is NaN: one seed)."""
    return f"{mean:.{digits}f}" if sd != sd else f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# the studies' tasks: the ones with the fewest training examples
# ---------------------------------------------------------------------------------------------

def study_tasks(s: E.VisionSetup, A: dict) -> list[int]:
    """Indices of the IVON and WSA studies' tasks: the `study_size` ones with the fewest
    training examples (the cheapest fine-tunings), in the benchmark's order."""
    k = study_size(s.scale) or len(s.tasks)
    return sorted(sorted(range(len(s.tasks)), key=lambda i: (len(A["trains"][i]), i))[:k])


def subset(s: E.VisionSetup, A: dict, idx: Sequence[int]) -> tuple[E.VisionSetup, dict]:
    """The setup and `E.artifacts` restricted to the tasks `idx`."""
    keys = ("names", "trains", "vals", "tests", "sizes", "finetuned", "ft_cfgs", "fishers")
    return replace(s, tasks=tuple(s.tasks[i] for i in idx)), {**A, **{k: [A[k][i] for i in idx] for k in keys}}


def mismatch_norm(s: E.VisionSetup, backbone: StateDict, fts: Sequence[dict], trains: Sequence,
                  at_task: Sequence[StateDict]) -> float:
    """||m(theta)|| = ||sum_t [grad lbar_t(theta) - grad lbar_t(theta_t)]|| at a merged backbone."""
    g = [E.summed_gradient(s, backbone, ft["head"], t, tr) for ft, t, tr in zip(fts, s.tasks, trains)]
    return total_norm(gradient_mismatch(g, at_task))


def gradient_at_task(s: E.VisionSetup, ft: dict, ft_cfg: dict, task: V.Task, train) -> dict[str, Tensor]:
    """grad lbar_t(theta_t) of a task model (cached)."""
    return cache.cached("related-grad", {"ft": ft_cfg, "n": s.mismatch_examples},
                        lambda: E.summed_gradient(s, ft["backbone"], ft["head"], task, train))


# ---------------------------------------------------------------------------------------------
# IVON: the posterior precision as H_t
# ---------------------------------------------------------------------------------------------

# Tuned on one small task (mnist) against AdamW's accuracy: ess = N_t gave 0.10-0.59 accuracy
# (weight noise 1/sqrt(N_t h) about 0.5), ess = 20 N_t 0.85 (AdamW 0.87); beta2 = 0.9 lets h
# leave hess_init within a fine-tuning of ~60 steps; clip_radius bounds the Newton-like steps.
IVON_KNOBS = {"lr": 0.2, "hess_init": 1.0, "beta2": 0.9, "weight_decay": 1e-6, "clip_radius": 1e-3}
IVON_ESS_FACTOR = 20.0  # ess = factor * N_t (a tempered posterior); H_t = N_t h for the merge


def ivon_finetune(s: E.VisionSetup, base: StateDict, base_cfg: dict, task: V.Task, train) -> tuple[dict, dict]:
    """theta_t, its head and IVON's Hessian h of the backbone (H_t = N_t h), fine-tuned from theta_0."""
    from .ivon import finetune
    n = len(train)
    cfg = {"base": base_cfg, "task": V.config_dict(task), "epochs": s.finetune_epochs, "n": n, "seed": s.seed,
           "ivon": IVON_KNOBS, "ess_factor": IVON_ESS_FACTOR}

    def compute():
        bb = V.make_backbone(s.vit)
        bb.load_state_dict(base)
        model = V.TaskModel(bb, V.make_head(s.vit, task.n_classes, seed=s.seed)).to(s.device)
        data = V._cycle(V.loader(train, s.batch_size, shuffle=True, seed=s.seed))
        batches = ((x.to(s.device), y.to(s.device)) for x, y in data)
        t = clock(s)
        h = finetune(model, batches, steps=E._steps(s, n), ess=IVON_ESS_FACTOR * n, seed=s.seed, **IVON_KNOBS)
        sec = clock(s) - t
        return {"backbone": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                "head": {k: v.cpu() for k, v in model.head.state_dict().items()},
                "hess": {k: v.cpu() for k, v in V.backbone_keys(h).items()}, "seconds": sec}
    return cache.cached("related-ivon", cfg, compute), cfg


def ivon_study(s: E.VisionSetup | None = None, progress: bool = False) -> pd.DataFrame:
    """One seed, the `study_tasks`: gradient matching of IVON-trained models with H_t from IVON
    (free) and from a post-hoc MC Fisher, and their task arithmetic; alpha on validation,
    normalised test accuracy, the cost per task, and both optimisers' own test accuracy."""
    s = s or E.setup()
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        s, A = subset(s, A, study_tasks(s, A))
        df = _table(s, A, "ivon", lambda: _ivon(s, A), ivon=[IVON_KNOBS, IVON_ESS_FACTOR])
    return df.set_index("H_t")


def _ivon(s: E.VisionSetup, A: dict) -> list[dict]:
    step = unit_step(s, A)
    ivs = [ivon_finetune(s, A["base"], A["base_cfg"], t, tr) for t, tr in zip(s.tasks, A["trains"])]
    fts, cfgs = [i[0] for i in ivs], [i[1] for i in ivs]
    bbs = [ft["backbone"] for ft in fts]
    score = Scorer(s, [ft["head"] for ft in fts], bbs, A["vals"], A["tests"])
    mc = [task_statistic(s, "fishers", ft, {**c, "ivon": True}, t, tr)
          for ft, c, t, tr in zip(fts, cfgs, s.tasks, A["trains"])]
    sources = {"IVON (free)": ([ft["hess"] for ft in fts], 0.0),
               "MC Fisher (post hoc)": ([g["value"] for g in mc], stat.mean(g["seconds"] for g in mc))}
    rows = []
    for src, (hs, sec) in sources.items():
        r = sweep(s, "gradient_matching", A["base"], bbs, score, A["names"], hs, A["sizes"])
        del r["merged"]
        rows.append({"H_t": src, **r, "stat_seconds": sec, "stat_steps": sec / step})
    r = sweep(s, "task_arithmetic", A["base"], bbs, score, A["names"])
    del r["merged"]
    rows.append({"H_t": "none (task arithmetic)", **r, "stat_seconds": 0.0, "stat_steps": 0.0})
    adam = E.Evaluator(s, [ft["head"] for ft in A["finetuned"]], A["tests"])
    own_adamw = stat.mean(adam(ft["backbone"], [i])[i] for i, ft in enumerate(A["finetuned"]))
    for r in rows:
        r.update(own_ivon=stat.mean(score.own["test"]), own_adamw=own_adamw,
                 tasks=" + ".join(A["names"]))
    return rows


# ---------------------------------------------------------------------------------------------
# Weight Scope Alignment: fine-tuning with and without the scope regulariser
# ---------------------------------------------------------------------------------------------

def scope_finetune(s: E.VisionSetup, base: StateDict, base_cfg: dict, task: V.Task, train,
                   strength: float) -> tuple[dict, dict]:
    """theta_t fine-tuned by chapter 5's recipe (`E.finetune`: linear probe, then the backbone at
    finetune_lr, the head at head_lr, prior delta / N_t) plus strength * R toward theta_0's
    scopes. With strength 0 it is chapter 5's model (tests/test_related.py checks it)."""
    from .scope import attached, scope
    n = len(train)
    cfg = {"base": base_cfg, "task": V.config_dict(task), "epochs": s.finetune_epochs, "lr": s.finetune_lr,
           "head_lr": s.head_lr, "delta": s.delta, "n": n, "seed": s.seed, "probe": True, "wsa": strength}

    def compute():
        with V.fast_cpu():  # as E.artifacts runs E.finetune (oneDNN's kernels give other floats)
            bb = V.make_backbone(s.vit)
            bb.load_state_dict(base)
            head = V.linear_probe(bb, V.make_head(s.vit, task.n_classes, seed=s.seed), train, device=s.device)
            with attached(bb, scope(base), strength):
                V.fit(bb, [head], [train], steps=E._steps(s, n), batch_size=s.batch_size, lr=s.finetune_lr,
                      head_lr=s.head_lr, seed=s.seed, prior=base, prior_precision=s.delta / n,
                      device=s.device, progress=False)
        return {"backbone": {k: v.cpu() for k, v in bb.state_dict().items()},
                "head": {k: v.cpu() for k, v in head.state_dict().items()}}
    return cache.cached("related-wsa", cfg, compute), cfg


def scope_spread(base: StateDict, bbs: Sequence[StateDict]) -> float:
    """Mean over layers of the spread (max - min) of the task models' sigma, relative to theta_0's."""
    from .scope import scope
    sc0, scs = scope(base), [scope(b) for b in bbs]
    return stat.mean((max(x[k][1] for x in scs) - min(x[k][1] for x in scs)) / sc0[k][1] for k in sc0)


SCOPE_METHODS = ("average", "task_arithmetic", "gradient_matching")
WSA_STRENGTH = 1.0  # weight of R beside the mean cross-entropy of a batch


def scope_study(s: E.VisionSetup | None = None, strength: float = WSA_STRENGTH,
                progress: bool = False) -> pd.DataFrame:
    """One seed, the `study_tasks`: averaging, task arithmetic and gradient matching of chapter 5's
    models and of the same tasks fine-tuned with WSA (the same recipe otherwise): alpha on
    validation, normalised test accuracy, the mismatch at alpha = 1 and the scopes' spread."""
    s = s or E.setup()
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        s, A = subset(s, A, study_tasks(s, A))
        df = _table(s, A, "wsa", lambda: _scope(s, A, strength), strength=strength, methods=SCOPE_METHODS)
    return df.set_index(["fine-tuning", "method"])


def _scope(s: E.VisionSetup, A: dict, strength: float) -> list[dict]:
    wsa = [scope_finetune(s, A["base"], A["base_cfg"], t, tr, strength) for t, tr in zip(s.tasks, A["trains"])]
    wsa_fishers = [task_statistic(s, "fishers", ft, c, t, tr)["value"]
                   for (ft, c), t, tr in zip(wsa, s.tasks, A["trains"])]
    runs = {"without": (A["finetuned"], A["ft_cfgs"], A["fishers"]),
            "with WSA": ([w[0] for w in wsa], [w[1] for w in wsa], wsa_fishers)}
    rows = []
    for label, (fts, cfgs, fishers) in runs.items():
        bbs = [ft["backbone"] for ft in fts]
        score = Scorer(s, [ft["head"] for ft in fts], bbs, A["vals"], A["tests"])
        at_task = [gradient_at_task(s, ft, c, t, tr) for ft, c, t, tr in zip(fts, cfgs, s.tasks, A["trains"])]
        spread = scope_spread(A["base"], bbs)
        for m in SCOPE_METHODS:
            r = sweep(s, m, A["base"], bbs, score, A["names"], fishers, A["sizes"])
            at1 = P.merge(s, m, A["base"], bbs, 1.0, fishers=fishers, sizes=A["sizes"])
            rows.append({"fine-tuning": label, "method": m, "alpha": r["alpha"], "val": r["val"],
                         "test": r["test"], "mismatch_alpha1": mismatch_norm(s, at1, fts, A["trains"], at_task),
                         "scope_spread": spread, "tasks": " + ".join(A["names"])})
    return rows


# ---------------------------------------------------------------------------------------------
# the leaderboard on chapter 6's text benchmark (adding tasks to MiniLM's top layer)
# ---------------------------------------------------------------------------------------------

class TextEvaluator:
    """Accuracy of a body (the merged parameters of text-add's top model) with each task's own
    classifier head on one data set per task; one reusable classifier per task."""

    def __init__(self, s, heads: Sequence[StateDict], datasets: Sequence):
        from .experiments import encoder as EN, text_add as TA
        self.models, self.batches = [], [TA._eval_batches(s, d) for d in datasets]
        for h, d in zip(heads, datasets):
            model = EN.classifier(s.model, len(d.classes), s.seed, s.top_layers)[0]
            model.load_state_dict(h, strict=False)
            self.models.append(model.to(s.device).eval())

    def __call__(self, body: StateDict, which: Sequence[int] | None = None) -> dict[int, float]:
        """{task index: accuracy} of `body` on the data sets `which` (default: all)."""
        out = {}
        for i in (range(len(self.models)) if which is None else which):
            self.models[i].load_state_dict(body, strict=False)
            out[i] = self.accuracy(i)
        return out

    def accuracy(self, i: int) -> float:
        from .train import evaluate
        return evaluate(self.models[i], self.batches[i])["accuracy"]


def text_artifacts(s: TextAddSetup) -> dict:
    """Chapter 6's fine-tuned tasks and Fishers (from its cache), theta_0's body, the splits,
    N_t, and mean(N_t F_t) (the unit of delta)."""
    from .experiments import encoder as EN, text_add as TA
    from .train import trainable
    fts = [TA.finetune(s, t, progress=False) for t in s.tasks]
    fishers = [TA.task_fisher(s, t, ft) for t, ft in zip(s.tasks, fts)]
    splits = {sp: [TA._split(s, t, sp) for t in s.tasks] for sp in ("train", "val", "test")}
    model = EN.classifier(s.model, len(splits["train"][0].classes), s.seed, s.top_layers)[0]
    sizes = [float(len(d)) for d in splits["train"]]
    return {"names": list(s.tasks), "finetuned": fts, "ft_cfgs": [TA._ft_cfg(s, t) for t in s.tasks],
            "base": {k: v for k, v in trainable(model).items() if not EN.is_head(k)}, "fishers": fishers,
            "sizes": sizes, "unit": TA.mean_precision(fishers, sizes), **splits}


def _text_model(s: TextAddSetup, A: dict, i: int, body: StateDict | None = None):
    """Task i's classifier (one per task, reused) with `body` (default: its own fine-tuned one)
    and its head."""
    from .experiments import encoder as EN
    models = A.setdefault("models", {})
    if i not in models:
        models[i] = EN.classifier(s.model, len(A["train"][i].classes), s.seed, s.top_layers)[0].to(s.device)
    models[i].load_state_dict({**(body or A["finetuned"][i]["body"]), **A["finetuned"][i]["head"]}, strict=False)
    return models[i]


def _text_batches(s: TextAddSetup, data, n: int | None = None) -> list:
    from .experiments import text_add as TA
    return TA._batches(s, data, None if n is None else range(min(n, len(data))))


def _text_stat(s: TextAddSetup, A: dict, i: int, name: str) -> dict:
    """STATISTICS[name] of task i's model at theta_t over its training texts, body names."""
    from .experiments import encoder as EN
    model = _text_model(s, A, i)
    batches = _text_batches(s, A["train"][i], s.fisher_examples)  # chapter 6's Fishers' texts
    return measured(s, lambda: STATISTICS[name](s, model, iter(batches), lambda k: not EN.is_head(k)))


def text_statistic(s: TextAddSetup, A: dict, name: str) -> tuple[list[dict], float]:
    """Every task's statistic `name` and one task's pass in seconds, as `statistic` for vision:
    chapter 6's Fishers reused (their pass timed once), the others computed here (cached)."""
    if name in FROM_ARTIFACTS:
        cfg = {**_text_cost_key(s, A), "stat": name}
        return A[FROM_ARTIFACTS[name]], cache.cached("related-cost", cfg,
                                                     lambda: _text_stat(s, A, 0, name)["seconds"])
    got = [cache.cached("related-stat", _stat_cfg(s, c, name), lambda i=i: _text_stat(s, A, i, name))
           for i, c in enumerate(A["ft_cfgs"])]
    return [g["value"] for g in got], got[0]["seconds"]


def _text_cost_key(s: TextAddSetup, A: dict) -> dict:
    """What a cost measured on task 0's model depends on (not the seed)."""
    return {**A["ft_cfgs"][0], "seed": None, "kind": s.fisher_kind, "examples": s.fisher_examples,
            "clock": _clock_kind(s)}


def text_unit_step(s: TextAddSetup, A: dict) -> float:
    """Seconds of one AdamW step of task 0's top model on one batch, the cost unit (cached)."""
    x, y = _text_batches(s, A["train"][0], s.batch_size)[0]
    return cache.cached("related-cost", {**_text_cost_key(s, A), "stat": "training step"},
                        lambda: train_step_seconds(s, _text_model(s, A, 0), x, y))


def text_mismatch_examples(scale: str) -> int | None:
    """Training texts per task for the mismatch's gradients (None: all); 32 at `small`, where the
    nine gradients per seed and task are a sizeable part of the chapter's budget."""
    return by_scale(None, 32, 1024, scale)


def text_gradient(s: TextAddSetup, A: dict, i: int, body: StateDict) -> dict[str, Tensor]:
    """grad lbar_t of task i at `body` (its head): the summed loss over its first
    `text_mismatch_examples` training texts, scaled by N_t / n."""
    from .train import loss_gradient
    n = min(len(A["train"][i]), text_mismatch_examples(s.scale) or len(A["train"][i]))
    g = loss_gradient(_text_model(s, A, i, body), _text_batches(s, A["train"][i], n))
    return {k: g[k].cpu() * (A["sizes"][i] / n) for k in body}


def text_search(s: TextAddSetup, unit: float) -> dict[str, dict[str, tuple]]:
    """`KNOBS` plus chapter 6's delta grid (relative to mean(N_t F_t)) for every method taking
    delta; at `small` TIES and DARE keep their default density and p (alpha still chosen): the
    chapter's budget (each knob value is a sweep of alpha, a merge and an evaluation per point)."""
    deltas = tuple(d * unit for d in s.deltas)
    fixed = {} if s.scale == "full" else {"ties": {}, "dare": {}}
    return {**KNOBS, **fixed, **{m.name: {"delta": deltas} for m in P.methods(option="delta")}}


def text_leaderboard(s: TextAddSetup | None = None, progress: bool = False,
                     wemoe_steps: int | None = None) -> pd.DataFrame:
    """The leaderboard on chapter 6's text-add benchmark, one seed (`text_add.setup`): a row per
    registered method plus WEMoE, knobs (alpha, delta as delta_rel = delta / mean(N_t F_t), the
    `KNOBS`, WEMoE's steps) chosen on text-add's validation split, the chosen point on its test
    split, normalised accuracy per task, the mismatch, the costs; columns as `leaderboard`'s.
    Chapter 6's fine-tunes and Fishers are reused from the cache; cached by everything."""
    from . import hub
    from .experiments import text_add as TA
    s = s or TA.setup()
    steps = wemoe_steps if wemoe_steps is not None else wemoe_settings(s.scale)[0]
    cfg = {**TA._table_cfg(s), "methods": _methods_key(), "search": text_search(s, 1.0),
           "mismatch": text_mismatch_examples(s.scale),
           "wemoe": [steps, *wemoe_settings(s.scale)[1:]]}
    with hub.quiet(TA._threads(s)):
        df = _rows("text-leaderboard", s.seed, cfg, lambda: _text_leaderboard(s, steps, progress))
    return df.set_index("method")


def _text_leaderboard(s: TextAddSetup, wemoe_steps: int, progress: bool) -> list[dict]:
    A = text_artifacts(s)
    bodies = [ft["body"] for ft in A["finetuned"]]
    heads = [ft["head"] for ft in A["finetuned"]]
    score = Scorer.from_evaluators({sp: TextEvaluator(s, heads, A[sp]) for sp in ("val", "test")}, bodies)
    at_task = [text_gradient(s, A, i, b) for i, b in enumerate(bodies)]

    def mismatch(body: StateDict) -> float:
        g = [text_gradient(s, A, i, body) for i in range(len(bodies))]
        return total_norm(gradient_mismatch(g, at_task))
    step = text_unit_step(s, A)
    rows = method_rows(s, A["base"], bodies, score, A["names"], A["sizes"], lambda st: text_statistic(s, A, st),
                       step, mismatch, text_search(s, A["unit"]))
    for r in rows:
        if "delta" in r["knobs"]:
            r["knobs"] = {**r["knobs"], "delta": float(f"{r['knobs']['delta'] / A['unit']:.12g}")}  # relative
    lam = next(r["alpha"] for r in rows if r["method"] == "task_arithmetic")
    rows.append(text_wemoe_row(s, A, score, lam, wemoe_steps, step))
    return rows


def text_wemoe_row(s: TextAddSetup, A: dict, score: Scorer, lam: float, steps: int, step: float) -> dict:
    """WEMoE on the text benchmark, as `wemoe_row`: the routed FFNs are the top BERT layers'
    (the last one's for the [CLS] token only), the routers adapted on unlabeled test texts."""
    from .batch import logits
    from .wemoe import build
    ev = score.ev["test"]
    prefix = ev.models[0].base_model_prefix + "."
    strip = lambda sd: {k[len(prefix):]: v for k, v in sd.items()}  # noqa: E731
    t0 = clock(s)
    moe = build(ev.models[0].base_model, strip(A["base"]), [strip(ft["body"]) for ft in A["finetuned"]],
                lam=lam, init=lam).to(s.device)
    built = clock(s) - t0
    batch = wemoe_settings(s.scale)[1]
    unlabeled = [[x for x, _ in _text_batches_shuffled(s, d, batch)[:steps]] for d in A["test"]]
    evs = list(score.ev.values())
    originals = [[m.base_model for m in e.models] for e in evs]
    for e in evs:  # every task's classifier reads the one WEMoE body
        for m in e.models:
            setattr(m, m.base_model_prefix, moe)
    try:
        def accuracy(split: str) -> list[float]:
            e = score.ev[split]
            return score.normalise(split, [e.accuracy(i) for i in range(len(e.models))])
        heads = [lambda x, m=m: logits(m, x) for m in ev.models]
        tokens = 1 if s.top_layers == 1 else s.max_len  # the last layer's FFN sees [CLS] alone
        return _wemoe_adapted(s, _Passthrough(ev.models), built, heads, unlabeled, accuracy, score, A["names"],
                              lam, steps, step, tokens)
    finally:
        for e, orig in zip(evs, originals):
            for m, body in zip(e.models, orig):
                setattr(m, m.base_model_prefix, body)


class _Passthrough(torch.nn.Module):
    """WEMoE's `adapt` on text: the task classifiers (sharing the routed body) as submodules, so
    their routers are found; the inputs passed on to each task's classifier (its "head")."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        self.tasks = torch.nn.ModuleList(models)

    def forward(self, **inputs: Any) -> dict:
        return inputs


def _text_batches_shuffled(s: TextAddSetup, data, batch_size: int) -> list:
    from .experiments import text_add as TA
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed)).tolist()
    return TA._batches(s, data, order, batch_size)
