"""The related methods on the vision benchmark: the leaderboard of every registered method (knobs
and alpha chosen on a validation split, reported on a disjoint test split, with costs), and the
studies of IVON's free uncertainty, Weight Scope Alignment and WEMoE.

The validation and test splits are the two halves of each task's test set. A method enters the
leaderboard by its `register` decorator alone: its statistics come from `STATISTICS` (by name),
its alpha grid from `Method.grid`, its other knobs from `KNOBS` (defaults where absent).
"""
from __future__ import annotations

import statistics as stat
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from . import cache, vision as V
from .experiments import pipeline as P, vision as E
from .merge import METHODS, get_method
from .mismatch import gradient_mismatch, total_norm

StateDict = Mapping[str, Tensor]
KNOBS: dict[str, dict[str, tuple]] = {"ties": {"density": (0.2, 0.5)}, "dare": {"p": (0.3, 0.7)},
                                      "regmean": {"off_diag": (0.5, 0.9, 1.0)}}


def splits(tests: Sequence) -> tuple[list, list]:
    """(validation, test): the first and second half of each task's test set."""
    return ([Subset(t, range(len(t) // 2)) for t in tests],
            [Subset(t, range(len(t) // 2, len(t))) for t in tests])


def step_seconds(s: E.VisionSetup, ft: dict, task: V.Task, train, repeats: int = 5) -> float:
    """Median time of one AdamW training step of a task model on one batch (the cost unit)."""
    model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x, y = next(iter(V.loader(train, s.batch_size)))
    x, y = x.to(s.device), y.to(s.device)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    return stat.median(times)


def _batches(s: E.VisionSetup, train):
    return ((x.to(s.device), y.to(s.device)) for x, y in V.loader(train, s.batch_size))


def _mc_fisher(s, model, train):
    from .curvature import fisher
    f = fisher(model, _batches(s, train), s.fisher_kind, seed=s.seed, progress=False, max_examples=s.fisher_examples,
               params=lambda n: n.startswith("backbone."))
    return V.backbone_keys(f)


def _grams(s, model, train):
    from .gram import grams
    g, _ = grams(model, _batches(s, train), params=lambda n: n.startswith("backbone."), max_examples=s.fisher_examples)
    return V.backbone_keys(g)


def _node_fishers(s, model, train):
    from .masknodes import expand, node_fishers, node_groups
    groups = node_groups(model)
    f, _ = node_fishers(model, _batches(s, train), groups=groups, seed=s.seed, max_examples=s.fisher_examples)
    return V.backbone_keys(expand(f, groups, {k: v.shape for k, v in model.state_dict().items()}))


# statistic name (as in `register(stats=...)`) -> how one task's statistic is computed at theta_t
STATISTICS: dict[str, Callable] = {"fishers": _mc_fisher, "grams": _grams, "node_fishers": _node_fishers}


def task_statistic(s: E.VisionSetup, name: str, ft: dict, ft_cfg: dict, task: V.Task, train) -> dict:
    """{"value": one task's statistic, "seconds": its pass, "step": one training step} (cached)."""
    def compute():
        model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device)
        t = time.perf_counter()
        value = STATISTICS[name](s, model, train)
        sec = time.perf_counter() - t
        return {"value": {k: v.cpu() for k, v in value.items()}, "seconds": sec,
                "step": step_seconds(s, ft, task, train)}
    cfg = {"ft": ft_cfg, "stat": name, "kind": s.fisher_kind, "examples": s.fisher_examples, "seed": s.seed}
    return cache.cached("related-stat", cfg, compute)


class Scorer:
    """Accuracy of a backbone on the validation and test halves, normalised by each task model's own."""

    def __init__(self, s: E.VisionSetup, heads: Sequence[StateDict], bbs: Sequence[StateDict], tests: Sequence):
        val, test = splits(tests)
        self.ev = {"val": E.Evaluator(s, heads, val), "test": E.Evaluator(s, heads, test)}
        self.own = {k: [ev(bb, [i])[i] for i, bb in enumerate(bbs)] for k, ev in self.ev.items()}

    def __call__(self, backbone: StateDict) -> dict[str, list[float]]:
        """{"val"/"test": normalised accuracy per task, "val_acc"/"test_acc": raw accuracy per task}."""
        out = {}
        for k, ev in self.ev.items():
            acc = ev(backbone)
            out[f"{k}_acc"] = [acc[i] for i in range(len(acc))]
            out[k] = [a / o if o > 0 else float("nan") for a, o in zip(out[f"{k}_acc"], self.own[k])]
        return out


def _grid(method: str) -> list[dict]:
    """Knob settings to try: the product of KNOBS[method] (the defaults when absent)."""
    import itertools
    knobs = {k: v for k, v in KNOBS.get(method, {}).items() if k in get_method(method).options}
    return [dict(zip(knobs, vals)) for vals in itertools.product(*knobs.values())] or [{}]


def mismatch_norm(s: E.VisionSetup, backbone: StateDict, fts: Sequence[dict], trains: Sequence,
                  at_task: Sequence[StateDict]) -> float:
    """||m(theta)|| = ||sum_t [grad lbar_t(theta) - grad lbar_t(theta_t)]|| at a merged backbone."""
    g = [E.summed_gradient(s, backbone, ft["head"], t, tr) for ft, t, tr in zip(fts, s.tasks, trains)]
    return total_norm(gradient_mismatch(g, at_task))


def gradients_at_tasks(s: E.VisionSetup, A: dict) -> list[dict]:
    return [cache.cached("vision-grad", {"ft": c, "n": s.mismatch_examples, "theta": "task"},
                         lambda ft=ft, t=t, tr=tr: E.summed_gradient(s, ft["backbone"], ft["head"], t, tr))
            for ft, c, t, tr in zip(A["finetuned"], A["ft_cfgs"], s.tasks, A["trains"])]


def sweep(s: E.VisionSetup, method: str, base: StateDict, bbs: Sequence[StateDict], score: Scorer,
          fishers=None, sizes=None, stats=None, alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Every (alpha, knobs) point of a method: normalised accuracy per split, merge seconds."""
    rows = []
    m = get_method(method)
    for knobs in _grid(method):
        for a in m.grid(alphas or s.alphas):
            t = time.perf_counter()
            merged = P.merge(s, method, base, bbs, a, fishers=fishers, sizes=sizes, stats=stats, **knobs)
            sec = time.perf_counter() - t
            r = score(merged)
            rows.append({"method": method, "alpha": a, "knobs": knobs, "merge_seconds": sec,
                         "val": _mean(r["val"]), "test": _mean(r["test"]),
                         "test_tasks": r["test"], "test_acc": stat.mean(r["test_acc"]), "merged": merged})
    return pd.DataFrame(rows)


def _mean(xs: Sequence[float]) -> float:
    """Mean over the tasks whose own model is above 0 on the split (NaN entries left out)."""
    xs = [x for x in xs if x == x]
    return stat.mean(xs) if xs else float("nan")


def _or(x: float, default: float) -> float:
    return default if x != x else x


def pick(df: pd.DataFrame) -> pd.Series:
    """The row with the best mean normalised validation accuracy (first one on ties)."""
    return df.loc[df["val"].fillna(-1.0).idxmax()]


def leaderboard(s: E.VisionSetup | None = None, progress: bool = False, wemoe_steps: int | None = None) -> pd.DataFrame:
    """One row per registered method (plus WEMoE, marked dynamic): knobs picked on validation,
    normalised test accuracy (mean and per task), alpha spread, mismatch, costs."""
    s = s or E.setup()
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        fts, cfgs, trains, names = A["finetuned"], A["ft_cfgs"], A["trains"], A["names"]
        bbs = [ft["backbone"] for ft in fts]
        score = Scorer(s, [ft["head"] for ft in fts], bbs, A["tests"])
        at_task = gradients_at_tasks(s, A)
        rows = []
        for name, m in METHODS.items():
            if any(st not in STATISTICS for st in m.stats):
                continue  # a statistic the benchmark cannot compute yet: add it to STATISTICS
            got = {st: [task_statistic(s, st, ft, c, t, tr) for ft, c, t, tr in zip(fts, cfgs, s.tasks, trains)]
                   for st in m.stats}
            vals = {st: [g["value"] for g in v] for st, v in got.items()}
            fishers = vals.pop("fishers", None)
            df = sweep(s, name, A["base"], bbs, score, fishers, A["sizes"], vals)
            best = pick(df)
            at_knobs = df[df["knobs"].apply(lambda k: k == best["knobs"])]
            stat_sec = sum(g["seconds"] for v in got.values() for g in v)
            stat_steps = sum(g["seconds"] / g["step"] for v in got.values() for g in v)
            rows.append({"method": name, "label": m.label, "alpha": best["alpha"] if len(at_knobs) > 1 else None,
                         "knobs": best["knobs"], "val": best["val"], "test": best["test"],
                         **dict(zip(names, best["test_tasks"])),
                         "alpha_spread": at_knobs["test"].max() - at_knobs["test"].min(),
                         "mismatch": mismatch_norm(s, best["merged"], fts, trains, at_task),
                         "stat_seconds": stat_sec, "stat_steps": stat_steps,
                         "merge_seconds": float(df["merge_seconds"].median()), "extra_params": 0, "dynamic": False})
        rows.append(wemoe_row(s, A, score, rows, names, wemoe_steps))
    return pd.DataFrame(rows).set_index("method")


def wemoe_row(s: E.VisionSetup, A: dict, score: Scorer, rows: list[dict], names, steps: int | None) -> dict:
    """WEMoE with lam = task arithmetic's validated alpha, routers adapted on the unlabeled test
    inputs (test-time training, as in the paper); the number of adaptation steps is a knob chosen
    on validation among 0 (task arithmetic), steps/3, 2 steps/3 and steps."""
    from .wemoe import adapt, build, extra_parameters, forward_flops
    lam = next(r for r in rows if r["method"] == "task_arithmetic")["alpha"]
    steps = steps if steps is not None else {"tiny": 3, "small": 30, "full": 500}[s.scale]
    moe = build(V.make_backbone(s.vit), A["base"], [ft["backbone"] for ft in A["finetuned"]],
                lam=lam, init=lam).to(s.device)
    heads = [h.eval().requires_grad_(False) for h in score.ev["test"].heads]
    _, test = splits(A["tests"])
    unlabeled = [[x.to(s.device) for x, _ in V.loader(t, s.batch_size, shuffle=True, seed=s.seed)] for t in test]

    def normalised() -> dict[str, list[float]]:
        return {k: [V.accuracy(V.TaskModel(moe, h), ds, device=s.device) / own if own > 0 else float("nan")
                    for h, ds, own in zip(ev.heads, ev.tests, score.own[k])] for k, ev in score.ev.items()}
    torch.manual_seed(s.seed)
    done, sec, losses = 0, 0.0, []
    points = [(0, 0.0, normalised())]  # (steps, adaptation seconds so far, normalised accuracies)
    for target in sorted({max(1, steps // 3), max(1, 2 * steps // 3), steps}):
        t0 = time.perf_counter()
        losses += adapt(moe, heads, unlabeled, steps=target - done, lr=1e-3)
        sec += time.perf_counter() - t0
        done = target
        points.append((done, sec, normalised()))
    best_steps, best_sec, res = max(points, key=lambda p: _or(_mean(p[2]["val"]), -1.0))
    extra = extra_parameters(moe)
    fl = forward_flops(moe, (s.vit.img_size // s.vit.patch_size) ** 2 + 1)
    return {"method": "wemoe", "label": "WEMoE (dynamic)", "alpha": lam, "knobs": {"steps": best_steps},
            "val": _mean(res["val"]), "test": _mean(res["test"]), **dict(zip(names, res["test"])),
            "alpha_spread": None, "mismatch": None, "stat_seconds": best_sec, "stat_steps": None,
            "merge_seconds": None, "extra_params": extra["task_vectors"] + extra["routers"], "dynamic": True,
            "mlp_cost_ratio": fl["wemoe_mlp"] / fl["merged_mlp"],
            "test_by_steps": {n: _mean(r["test"]) for n, _, r in points},
            "entropy_first_last": (losses[0], losses[-1])}


# ---------------------------------------------------------------------------------------------
# IVON: the posterior precision as H_t
# ---------------------------------------------------------------------------------------------

# Tuned on one small task (mnist) against AdamW's accuracy: ess = N_t gave 0.10-0.59 accuracy
# (weight noise 1/sqrt(N_t h) about 0.5), ess = 20 N_t 0.85 (AdamW 0.87); beta2 = 0.9 lets h
# leave hess_init within a fine-tuning of ~60 steps; clip_radius bounds the Newton-like steps.
IVON_KNOBS = {"lr": 0.2, "hess_init": 1.0, "beta2": 0.9, "weight_decay": 1e-6, "clip_radius": 1e-3}
IVON_ESS_FACTOR = 20.0  # ess = factor * N_t (a tempered posterior); H_t = N_t h for the merge


def ivon_finetune(s: E.VisionSetup, base: StateDict, base_cfg: dict, task: V.Task, train) -> dict:
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
        t = time.perf_counter()
        h = finetune(model, batches, steps=E._steps(s, n), ess=IVON_ESS_FACTOR * n, seed=s.seed, **IVON_KNOBS)
        sec = time.perf_counter() - t
        return {"backbone": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                "head": {k: v.cpu() for k, v in model.head.state_dict().items()},
                "hess": {k: v.cpu() for k, v in V.backbone_keys(h).items()}, "seconds": sec}
    return cache.cached("related-ivon", cfg, compute), cfg


def ivon_study(s: E.VisionSetup | None = None, progress: bool = False) -> pd.DataFrame:
    """Gradient matching of IVON-trained models with H_t from IVON (free), from a post-hoc MC
    Fisher and from the exact Fisher: alpha on validation, normalised test accuracy, costs."""
    from .curvature import fisher
    s = s or E.setup()
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        ivs = [ivon_finetune(s, A["base"], A["base_cfg"], t, tr) for t, tr in zip(s.tasks, A["trains"])]
        fts, cfgs = [i[0] for i in ivs], [i[1] for i in ivs]
        bbs = [ft["backbone"] for ft in fts]
        score = Scorer(s, [ft["head"] for ft in fts], bbs, A["tests"])
        sources = {"IVON (free)": [{"value": ft["hess"], "seconds": 0.0, "step": 1.0} for ft in fts]}
        for kind in ("mc", "exact"):
            sk = replace(s, fisher_kind=kind)
            sources[f"{kind} Fisher (post hoc)"] = [
                task_statistic(sk, "fishers", ft, {**c, "ivon": True}, t, tr)
                for ft, c, t, tr in zip(fts, cfgs, s.tasks, A["trains"])]
        rows = []
        for src, got in sources.items():
            df = sweep(s, "gradient_matching", A["base"], bbs, score, [g["value"] for g in got], A["sizes"])
            best = pick(df)
            rows.append({"H_t": src, "alpha": best["alpha"], "val": best["val"], "test": best["test"],
                         "alpha_spread": df["test"].max() - df["test"].min(),
                         "stat_seconds": sum(g["seconds"] for g in got),
                         "stat_steps": sum(g["seconds"] / g["step"] for g in got)})
        ta = sweep(s, "task_arithmetic", A["base"], bbs, score)
        best = pick(ta)
        rows.append({"H_t": "none (task arithmetic)", "alpha": best["alpha"], "val": best["val"],
                     "test": best["test"], "alpha_spread": ta["test"].max() - ta["test"].min(),
                     "stat_seconds": 0.0, "stat_steps": 0.0})
        own = [V.accuracy(V.task_model(s.vit, ft["backbone"], ft["head"], t.n_classes), te)
               for ft, t, te in zip(fts, s.tasks, A["tests"])]
        adam = [V.accuracy(V.task_model(s.vit, ft["backbone"], ft["head"], t.n_classes), te)
                for ft, t, te in zip(A["finetuned"], s.tasks, A["tests"])]
    out = pd.DataFrame(rows).set_index("H_t")
    out.attrs.update(ivon_individual=stat.mean(own), adamw_individual=stat.mean(adam),
                     ivon_train_seconds=sum(ft["seconds"] for ft in fts))
    return out


# ---------------------------------------------------------------------------------------------
# Weight Scope Alignment: fine-tuning with and without the scope regulariser
# ---------------------------------------------------------------------------------------------

def scope_finetune(s: E.VisionSetup, base: StateDict, base_cfg: dict, task: V.Task, train, strength: float):
    """theta_t fine-tuned as in the experiment plus strength * R (target: theta_0's scopes)."""
    from .scope import attached, scope
    n = len(train)
    cfg = {"base": base_cfg, "task": V.config_dict(task), "epochs": s.finetune_epochs, "lr": s.finetune_lr,
           "delta": s.delta, "n": n, "seed": s.seed, "wsa": strength}

    def compute():
        bb = V.make_backbone(s.vit)
        bb.load_state_dict(base)
        head = V.make_head(s.vit, task.n_classes, seed=s.seed)
        with attached(bb, scope(base), strength):
            V.fit(bb, [head], [train], steps=E._steps(s, n), batch_size=s.batch_size, lr=s.finetune_lr,
                  seed=s.seed, prior=base, prior_precision=s.delta / n, device=s.device, progress=False)
        return {"backbone": {k: v.cpu() for k, v in bb.state_dict().items()},
                "head": {k: v.cpu() for k, v in head.state_dict().items()}}
    return cache.cached("related-wsa", cfg, compute), cfg


def scope_spread(base: StateDict, bbs: Sequence[StateDict]) -> float:
    """Mean over layers of the spread (max - min) of the task models' sigma, relative to theta_0's."""
    from .scope import scope
    sc0, scs = scope(base), [scope(b) for b in bbs]
    return stat.mean((max(x[k][1] for x in scs) - min(x[k][1] for x in scs)) / sc0[k][1] for k in sc0)


def scope_study(s: E.VisionSetup | None = None, strength: float = 1.0, progress: bool = False) -> pd.DataFrame:
    """Averaging, task arithmetic and gradient matching of models fine-tuned without / with WSA:
    validated normalised test accuracy, the mismatch at alpha = 1 and the scopes' spread."""
    s = s or E.setup()
    with V.fast_cpu():
        A = E.artifacts(s, progress)
        runs = {"without": (A["finetuned"], A["ft_cfgs"]),
                "with WSA": tuple(map(list, zip(*[scope_finetune(s, A["base"], A["base_cfg"], t, tr, strength)
                                                  for t, tr in zip(s.tasks, A["trains"])])))}
        rows = []
        for label, (fts, cfgs) in runs.items():
            bbs = [ft["backbone"] for ft in fts]
            score = Scorer(s, [ft["head"] for ft in fts], bbs, A["tests"])
            fishers = [task_statistic(s, "fishers", ft, c, t, tr)["value"]
                       for ft, c, t, tr in zip(fts, cfgs, s.tasks, A["trains"])]
            at_task = [cache.cached("vision-grad", {"ft": c, "n": s.mismatch_examples, "theta": "task"},
                                    lambda ft=ft, t=t, tr=tr: E.summed_gradient(s, ft["backbone"], ft["head"], t, tr))
                       for ft, c, t, tr in zip(fts, cfgs, s.tasks, A["trains"])]
            for m in ("average", "task_arithmetic", "gradient_matching"):
                df = sweep(s, m, A["base"], bbs, score, fishers, A["sizes"])
                best = pick(df)
                at1 = P.merge(s, m, A["base"], bbs, 1.0, fishers=fishers, sizes=A["sizes"])
                rows.append({"fine-tuning": label, "method": m, "alpha": best["alpha"], "test": best["test"],
                             "mismatch_alpha1": mismatch_norm(s, at1, fts, A["trains"], at_task),
                             "scope_spread": scope_spread(A["base"], bbs)})
    return pd.DataFrame(rows).set_index(["fine-tuning", "method"])
