"""Vision benchmark: merging ViTs fine-tuned on several image tasks (chapter 5).

Pipeline: base ViT (trained on a mix of images no task owns, with quarter turns and inversions
so it sees every task's domain; timm weights at `full`) -> each task: a linear probe on the
frozen base, then fine-tuning (backbone at finetune_lr, head head_lr, cosine schedule; Gaussian
prior H_0 = delta I at theta_0) ->
diagonal Fishers (every estimator) -> merge the backbones with every registered method over an
alpha grid (heads are never merged) -> accuracy on every task -> one tidy table. Also: the
multi-task model (all tasks at once), sweeps over the Fisher estimator (methods that use Fishers),
the number of Fisher examples and delta (methods that take it), and the gradient mismatch of
merges of every size. Every point of the alpha grid is evaluated on a validation split carved
from each task's training data; per method (and Fisher estimator, #examples, delta) the alpha
best on validation is then evaluated on the test split, the only merge of the group that is
(`chosen`; the references are evaluated on both). Trained models, Fishers and each evaluation
are cached (`toolkit.cache`).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .. import cache, data as D, vision as V
from ..scale import pick
from . import pipeline as P

StateDict = Mapping[str, Tensor]
STUDIES = ("multitask", "merge", "fisher", "fisher_examples", "delta", "subsets")


@dataclass(frozen=True, kw_only=True)
class VisionSetup(P.Setup):
    """Every number the experiment depends on (the cache keys are hashes of parts of it)."""
    vit: V.ViTConfig
    tasks: tuple[V.Task, ...]
    n_train: int | None          # cap per task (None: all its training examples but validation)
    n_test: int | None           # None: the whole test split
    val_fraction: float          # of each task's training examples, held out to choose knobs
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    pretrain_augment: float      # probability of a quarter turn / an inversion per image
    pretrain_weight_decay: float
    finetune_epochs: float
    finetune_lr: float           # the backbone's
    head_lr: float               # the heads' (they start from a linear probe on theta_0)
    fisher_kind: str             # the estimator of the main comparison
    fisher_kinds: tuple[str, ...]
    fisher_examples: int | None  # examples per Fisher (None: the whole training set)
    fisher_example_grid: tuple[int, ...]
    deltas: tuple[float, ...]    # the delta sweep of the methods that take delta
    mismatch_examples: int       # examples per task for the gradients of the mismatch
    subsets_per_size: int | None
    subset_methods: tuple[str, ...] = ("task_arithmetic", "gradient_matching")  # mismatch study
    base_seed: int = 0           # theta_0 is one fixed "pretrained" model, as in the paper
    studies: tuple[str, ...] = STUDIES
    data_root: str | None = None


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> VisionSetup:
    """The experiment's settings at a scale (tiny: seconds, small: minutes on 2 CPU cores,
    full: GPU with timm's pretrained ViT-B/32 and torchvision data under `data_root`)."""
    scale = P.check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = VisionSetup(
        scale=scale, seed=seed, vit=V.VIT[scale], tasks=V.tasks_for(scale),
        n_train=p(192, 1200, None), n_test=p(96, None, None), val_fraction=p(0.2, 0.2, 0.05),
        batch_size=p(64, 64, 128), pretrain_steps=p(60, 3000, 0), pretrain_lr=2e-3,
        pretrain_augment=0.3, pretrain_weight_decay=0.05,
        finetune_epochs=p(3, 6, 2), finetune_lr=p(2e-3, 1e-3, 1e-5), head_lr=p(3e-3, 3e-3, 1e-3),
        delta=p(1.0, 1.0, 1.0), fisher_kind="mc",
        fisher_kinds=("mc", "exact", "empirical", "batch_squared"),
        fisher_examples=p(64, 512, 2048), fisher_example_grid=p((16,), (32, 128), (64, 256, 1024)),
        alphas=p((0.3, 1.0), (0.1, 0.2, 0.3, 0.5, 0.7, 1.0), (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)),
        deltas=p((1e3,), (1e-4, 1e-2, 1e2, 1e4), (1e-4, 1e-2, 1e2, 1e4)),
        mismatch_examples=p(32, 128, 1024), subsets_per_size=p(1, 3, 3),
        device=P.default_device(),
    )
    return replace(s, **overrides)


# ---------------------------------------------------------------------------------------------
# trained things (cached by configuration)
# ---------------------------------------------------------------------------------------------

def _key(obj: Any) -> Any:
    return V.config_dict(obj) if not isinstance(obj, (str, int, float, type(None))) else obj


EMBEDDED_BASE = "vit_base_small"  # theta_0 of the small scale, shipped in data/vision/ (make_base.py)


def base_recipe(s: VisionSetup) -> dict:
    """The configuration theta_0 is trained with: its cache key, and the recipe the shipped one states."""
    return {"vit": _key(s.vit), "seed": s.base_seed, "steps": s.pretrain_steps, "lr": s.pretrain_lr,
            "bs": s.batch_size, "augment": s.pretrain_augment, "wd": s.pretrain_weight_decay,
            "mix": [list(map(str, m)) for m in V.PRETRAIN_SOURCES], "n": pick(192, None, None, s.scale)}


def pretrain(s: VisionSetup, progress: bool = True) -> dict[str, Tensor]:
    """theta_0 trained from scratch on the pretraining mix (`pretrain_steps` steps of AdamW)."""
    bb = V.make_backbone(s.vit, seed=s.base_seed)
    head = V.make_head(s.vit, 30, seed=s.base_seed)
    mix = V.pretrain_data(s.scale, pick(192, None, None, s.scale), s.data_root)
    V.fit(bb, [head], [mix], steps=s.pretrain_steps, batch_size=s.batch_size, lr=s.pretrain_lr,
          weight_decay=s.pretrain_weight_decay, augment_p=s.pretrain_augment, seed=s.base_seed,
          device=s.device, progress=progress, desc="pretrain base")
    return {k: v.cpu() for k, v in bb.state_dict().items()}


def base_backbone(s: VisionSetup, progress: bool = True) -> tuple[dict[str, Tensor], dict]:
    """theta_0: the backbone pretrained on the mix of all source domains. At `full`, timm's
    weights; at `small`, the one shipped in data/vision/ when its recipe is this setup's (as the
    paper starts from a downloaded ViT; 3000 steps, ~3 min on 2 cores to redo); else trained here."""
    cfg = base_recipe(s)
    if s.scale == "full":
        return V.make_backbone(s.vit, pretrained=True).state_dict(), cfg

    def compute():
        if s.scale == "small":
            state, recipe = D.load_model(EMBEDDED_BASE)
            if recipe == json.loads(json.dumps(cfg)):
                return state
            warnings.warn(f"data/vision/{EMBEDDED_BASE}.pt was trained with another recipe than this "
                          "setup's; training theta_0 here (rebuild the file with data/vision/make_base.py)")
        return pretrain(s, progress)
    return cache.cached("vision-base", cfg, compute), cfg


def _steps(s: VisionSetup, n: int) -> int:
    return max(1, math.ceil(s.finetune_epochs * n / s.batch_size))


def finetune(s: VisionSetup, base: StateDict, base_cfg: dict, task: V.Task, train, progress=True):
    """theta_t and its head: a linear probe on theta_0 ("probe_head"), then fine-tuning from there
    with the prior delta/N_t per example, the backbone at finetune_lr and the head at head_lr."""
    n = len(train)
    cfg = {"base": base_cfg, "task": _key(task), "epochs": s.finetune_epochs, "lr": s.finetune_lr,
           "head_lr": s.head_lr, "delta": s.delta, "n": n, "seed": s.seed, "probe": True}

    def compute():
        bb = V.make_backbone(s.vit)
        bb.load_state_dict(base)
        head = V.linear_probe(bb, V.make_head(s.vit, task.n_classes, seed=s.seed), train, device=s.device)
        probe = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        V.fit(bb, [head], [train], steps=_steps(s, n), batch_size=s.batch_size, lr=s.finetune_lr,
              head_lr=s.head_lr, seed=s.seed, prior=base, prior_precision=s.delta / n, device=s.device,
              progress=progress, desc=f"fine-tune {task.name}")
        return {"backbone": {k: v.cpu() for k, v in bb.state_dict().items()},
                "head": {k: v.cpu() for k, v in head.state_dict().items()}, "probe_head": probe}
    return cache.cached("vision-finetune", cfg, compute), cfg


def multitask(s: VisionSetup, base: StateDict, base_cfg: dict, trains: Sequence, progress=True):
    """The upper bound: one backbone trained on all tasks at once (round-robin), one head each."""
    n = sum(len(t) for t in trains)
    cfg = {"base": base_cfg, "tasks": _key(s.tasks), "epochs": s.finetune_epochs, "lr": s.finetune_lr,
           "head_lr": s.head_lr, "delta": s.delta, "n": n, "seed": s.seed, "probe": True}

    def compute():
        bb = V.make_backbone(s.vit)
        bb.load_state_dict(base)
        heads = [V.linear_probe(bb, V.make_head(s.vit, t.n_classes, seed=s.seed), tr, device=s.device)
                 for t, tr in zip(s.tasks, trains)]
        V.fit(bb, heads, trains, steps=sum(_steps(s, len(t)) for t in trains), batch_size=s.batch_size,
              lr=s.finetune_lr, head_lr=s.head_lr, seed=s.seed, prior=base, prior_precision=s.delta / n, device=s.device,
              progress=progress, desc="multi-task")
        return {"backbone": {k: v.cpu() for k, v in bb.state_dict().items()},
                "heads": [{k: v.cpu() for k, v in h.state_dict().items()} for h in heads]}
    return cache.cached("vision-multitask", cfg, compute)


def task_fisher(s: VisionSetup, ft: dict, ft_cfg: dict, task: V.Task, train, kind: str,
                examples: int | None) -> dict[str, Tensor]:
    """Per-example mean diagonal Fisher F_t of the backbone at theta_t (toolkit.curvature)."""
    from ..curvature import fisher
    cfg = {"ft": ft_cfg, "kind": kind, "examples": examples, "seed": s.seed}

    def compute():
        model = V.task_model(s.vit, ft["backbone"], ft["head"], task.n_classes).to(s.device)
        batches = ((x.to(s.device), y.to(s.device)) for x, y in V.loader(train, s.batch_size))
        f = fisher(model, batches, kind, seed=s.seed, progress=False, max_examples=examples,
                   params=lambda name: name.startswith("backbone."))
        return {k: v.cpu() for k, v in V.backbone_keys(f).items()}
    return cache.cached("vision-fisher", cfg, compute)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

class Evaluator:
    """Accuracy of a backbone with each task's own head on each data set; one reusable backbone
    module, each data set's tensors gathered once (`data.as_tensors`) and sliced in batches."""

    def __init__(self, s: VisionSetup, heads: Sequence[StateDict], datasets: Sequence):
        self.s = s
        held = [D.as_tensors(d) for d in datasets]
        self.tests = [TensorDataset(*h) if h is not None else d for h, d in zip(held, datasets)]
        self.backbone = V.make_backbone(s.vit).to(s.device).eval()
        self.heads = []
        for t, h in zip(s.tasks, heads):
            head = V.make_head(s.vit, t.n_classes)
            head.load_state_dict(h)
            self.heads.append(head.to(s.device).eval())

    def __call__(self, backbone: StateDict, which: Sequence[int] | None = None,
                 heads: Sequence[StateDict] | None = None) -> dict[int, float]:
        """{task index: accuracy} of `backbone` with the tasks' heads (or `heads`) on the data
        sets `which` (default: all)."""
        self.backbone.load_state_dict(backbone)
        out = {}
        for i in (range(len(self.tests)) if which is None else which):
            head = self.heads[i]
            if heads is not None:
                head = copy.deepcopy(head)
                head.load_state_dict(heads[i])
            out[i] = V.accuracy(V.TaskModel(self.backbone, head), self.tests[i], device=self.s.device)
        return out


def summed_gradient(s: VisionSetup, backbone: StateDict, head: StateDict, task: V.Task, train) -> dict[str, Tensor]:
    """grad of lbar_t (the SUMMED loss over the N_t training examples) w.r.t. the backbone,
    estimated on the first `mismatch_examples` examples and scaled by N_t / n."""
    from ..train import loss_gradient
    model = V.task_model(s.vit, backbone, head, task.n_classes).to(s.device)
    n = min(len(train), s.mismatch_examples)
    sub = torch.utils.data.Subset(train, range(n))
    batches = ((x.to(s.device), y.to(s.device)) for x, y in V.loader(sub, s.batch_size))
    g = loss_gradient(model, batches)
    return {k: v.cpu() * (len(train) / n) for k, v in V.backbone_keys(g).items()}


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------

def run(s: VisionSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Run (or load from the cache) everything; return the tidy table, one row per
    (study, method, fisher estimator, #Fisher examples, alpha, delta, merged tasks, evaluated task)."""
    s = s or setup()
    with V.fast_cpu():
        return _run(s, progress)


def artifacts(s: VisionSetup, progress: bool = True) -> dict[str, Any]:
    """Data, theta_0, the fine-tuned models and the main Fishers (all from the cache once made):
    what a notebook needs to look inside the merge beyond the results table."""
    data = [V.task_splits(t, s.scale, n_train=s.n_train, n_test=s.n_test, val_fraction=s.val_fraction,
                          root=s.data_root, seed=s.seed) for t in s.tasks]
    trains, vals, tests = ([d[i] for d in data] for i in range(3))
    with V.fast_cpu():
        base, base_cfg = base_backbone(s, progress)
        fts, ft_cfgs = zip(*[finetune(s, base, base_cfg, t, tr, progress) for t, tr in zip(s.tasks, trains)])
        fishers = [task_fisher(s, ft, c, t, tr, s.fisher_kind, s.fisher_examples)
                   for ft, c, t, tr in zip(fts, ft_cfgs, s.tasks, trains)]
    return {"names": [t.name for t in s.tasks], "trains": trains, "vals": vals, "tests": tests,
            "sizes": [float(len(t)) for t in trains], "base": base, "base_cfg": base_cfg,
            "finetuned": list(fts), "ft_cfgs": list(ft_cfgs), "fishers": fishers}


def _jobs(s: VisionSetup) -> list[tuple[str, P.Method, str, int | None, float, float]]:
    """(study, method, Fisher estimator, #Fisher examples, alpha, delta) of every merge."""
    main = (s.fisher_kind, s.fisher_examples)
    jobs = [("merge", m, *main, a, s.delta) for m, a in P.grid(s.alphas)]
    with_f = P.methods(fisher=True)
    for kind in s.fisher_kinds:
        if kind != s.fisher_kind:
            jobs += [("fisher", m, kind, s.fisher_examples, a, s.delta) for m, a in P.grid(s.alphas, with_f)]
    for ex in s.fisher_example_grid:
        jobs += [("fisher_examples", m, s.fisher_kind, ex, a, s.delta) for m, a in P.grid(s.alphas, with_f)]
    for d in s.deltas:
        jobs += [("delta", m, *main, a, d) for m, a in P.grid(s.alphas, P.methods(option="delta"))]
    return [j for j in jobs if j[0] in s.studies]


def _pick(val: Mapping[float, float]) -> float:
    """The alpha with the best mean validation score (the first in grid order on a tie)."""
    return max(val, key=lambda a: val[a])


def _run(s: VisionSetup, progress: bool) -> pd.DataFrame:
    A = artifacts(s, progress)
    trains, tests, sizes, names = A["trains"], A["tests"], A["sizes"], A["names"]
    base, base_cfg, fts, ft_cfgs = A["base"], A["base_cfg"], A["finetuned"], A["ft_cfgs"]
    bbs = [ft["backbone"] for ft in fts]
    ev = {"test": Evaluator(s, [ft["head"] for ft in fts], tests),
          "val": Evaluator(s, [ft["head"] for ft in fts], A["vals"])}
    eval_key = {"ft": list(ft_cfgs), "n_test": s.n_test, "val": s.val_fraction, "seed": s.seed}
    rows: list[dict] = []

    def evaluated(what: dict, make, split: str, which=None, heads=None) -> dict[int, float]:
        """Accuracy per task of the backbone make() on one split, cached by what made it."""
        key = {**eval_key, **what, "split": split, "which": None if which is None else list(which)}
        res = cache.cached("vision-eval", key, lambda: ev[split](make(), which, heads))
        return {int(k): v for k, v in res.items()}

    def record(study: str, method: str, test: Mapping[int, float], val: Mapping[int, float], **extra):
        for i in sorted(set(test) | set(val)):
            rows.append({"study": study, "method": method, "task": names[i],
                         "accuracy": test.get(i, math.nan), "val_accuracy": val.get(i, math.nan),
                         **extra})

    def reference(study: str, what: dict, make, which=None, heads=None) -> None:
        record(study, study, *(evaluated(what, make, k, which, heads) for k in ("test", "val")))

    for i in range(len(fts)):  # each fine-tuned model on its own task
        reference("individual", {"individual": i}, lambda i=i: bbs[i], which=[i])
    own_val = {r["task"]: r["val_accuracy"] for r in rows}
    reference("probe", {"probe": True}, lambda: base, heads=[ft["probe_head"] for ft in fts])
    reference("base_heads", {"base_heads": True}, lambda: base)  # theta_0 with the fine-tuned heads
    if "multitask" in s.studies:
        mt = multitask(s, base, base_cfg, trains, progress)
        reference("multitask", {"multitask": True}, lambda: mt["backbone"], heads=mt["heads"])

    fisher = lambda kind, ex: [task_fisher(s, ft, c, t, tr, kind, ex)  # noqa: E731
                               for ft, c, t, tr in zip(fts, ft_cfgs, s.tasks, trains)]
    fishers: dict[tuple, list] = {(s.fisher_kind, s.fisher_examples): A["fishers"]}
    groups: dict[tuple, list[tuple]] = {}  # one alpha grid per (study, method, estimator, #ex, delta)
    for job in _jobs(s):
        groups.setdefault((job[0], job[1].name, *job[2:4], job[5]), []).append(job)
    for jobs in tqdm(list(groups.values()), desc="merges", disable=not progress):
        val, whats = {}, {}
        for study, m, kind, ex, a, d in jobs:  # the grid on validation
            uses_f, takes_d = m.uses_fisher, "delta" in m.options
            if uses_f and (kind, ex) not in fishers:
                fishers[(kind, ex)] = fisher(kind, ex)
            f = fishers.get((kind, ex)) if uses_f else None
            whats[a] = {"method": m.name, "alpha": a, "delta": d if takes_d else None,
                        "fisher": [kind, ex] if uses_f else None, "ties": s.ties_density,
                        "dare": s.dare_p}
            make = lambda m=m, a=a, f=f, d=d: P.merge(s, m, base, bbs, a, fishers=f,  # noqa: E731
                                                      sizes=sizes, delta=d)
            val[a] = (evaluated(whats[a], make, "val"), make)
        score = {a: sum(v[i] / own_val[names[i]] for i in v) / len(v) for a, (v, _) in val.items()}
        best = _pick(score)
        test = evaluated(whats[best], val[best][1], "test")  # the test split: the chosen alpha only
        for study, m, kind, ex, a, d in jobs:
            uses_f, takes_d = m.uses_fisher, "delta" in m.options
            record(study, m.name, test if a == best else {}, val[a][0], alpha=P.row_alpha(m, a),
                   delta=d if takes_d else None, fisher=kind if uses_f else None,
                   fisher_examples=ex if uses_f else None, n_tasks=len(bbs), tasks="+".join(names))
    if "subsets" in s.studies:
        rows += mismatch_study(s, base, fts, ft_cfgs, trains, A["fishers"], sizes, evaluated, progress)

    df = pd.DataFrame(rows)
    ind = df[df["study"] == "individual"].set_index("task")
    df["individual"] = df["task"].map(ind["accuracy"])
    df["normalised"] = df["accuracy"] / df["individual"]
    df["val_normalised"] = df["val_accuracy"] / df["task"].map(ind["val_accuracy"])
    df.insert(0, "seed", s.seed)
    df.insert(0, "scale", s.scale)
    cols = ["scale", "seed", "study", "method", "fisher", "fisher_examples", "alpha", "delta", "n_tasks",
            "tasks", "task", "accuracy", "individual", "normalised", "val_accuracy", "val_normalised",
            "mismatch"]
    for c in cols:
        if c not in df:
            df[c] = None
    for c in ("fisher_examples", "alpha", "delta", "n_tasks", "mismatch", "accuracy", "normalised",
              "val_accuracy", "val_normalised"):
        df[c] = pd.to_numeric(df[c]).astype(float)
    return df[cols]


def mismatch_study(s: VisionSetup, base, fts, ft_cfgs, trains, fishers, sizes, evaluated,
                   progress: bool = True) -> list[dict]:
    """Merges of task subsets of every size (`s.subset_methods`, alpha_t = 1, the all-data target):
    test accuracy and ||m(theta)||, m = sum_t [grad lbar_t(theta) - grad lbar_t(theta_t)]."""
    from ..mismatch import gradient_mismatch, total_norm
    names = [t.name for t in s.tasks]
    at_task = [cache.cached("vision-grad", {"ft": ft_cfgs[i], "n": s.mismatch_examples, "theta": "task"},
                            lambda i=i: summed_gradient(s, fts[i]["backbone"], fts[i]["head"], s.tasks[i], trains[i]))
               for i in range(len(fts))]
    rows = []
    subs = V.subsets(len(fts), 2, s.subsets_per_size, s.seed)
    for m, sub in tqdm([(m, sub) for sub in subs for m in P.methods(s.subset_methods)],
                       desc="mismatch", disable=not progress):
        uses_f, takes_d = m.uses_fisher, "delta" in m.options
        what = {"method": m.name, "subset": list(sub), "alpha": 1.0, "delta": s.delta,
                "fisher": [s.fisher_kind, s.fisher_examples]}
        merged = None

        def make():
            nonlocal merged
            merged = merged or P.merge(s, m, base, [fts[i]["backbone"] for i in sub], 1.0,
                                       fishers=[fishers[i] for i in sub], sizes=[sizes[i] for i in sub])
            return merged

        acc = evaluated(what, make, "test", which=sub)  # no knob to choose: test only

        def mism():
            g = [summed_gradient(s, make(), fts[i]["head"], s.tasks[i], trains[i]) for i in sub]
            return total_norm(gradient_mismatch(g, [at_task[i] for i in sub]))
        norm = cache.cached("vision-grad", {"what": {**what, "which": list(sub)},
                                            "ft": [ft_cfgs[i] for i in sub], "n": s.mismatch_examples}, mism)
        for i in sub:
            rows.append({"study": "subsets", "method": m.name, "alpha": 1.0,
                         "delta": s.delta if takes_d else None,
                         "fisher": s.fisher_kind if uses_f else None,
                         "fisher_examples": s.fisher_examples if uses_f else None,
                         "n_tasks": len(sub), "tasks": "+".join(names[j] for j in sub), "task": names[i],
                         "accuracy": acc[i], "val_accuracy": math.nan, "mismatch": norm})
    return rows


# ---------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------

KNOBS = ["method", "fisher", "fisher_examples", "delta"]  # one alpha grid per value of these


def by_alpha(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """Means over tasks (one seed or several pooled) per grid point (method, estimator, #examples,
    alpha, delta) of a study: validation accuracy and normalised accuracy at every point, test ones
    where the point was evaluated on test (the chosen alpha; NaN elsewhere)."""
    d = df[df["study"] == study].fillna({"alpha": -1.0})
    g = d.groupby([*KNOBS, "alpha"], sort=False, dropna=False)
    out = g[["accuracy", "normalised", "val_accuracy", "val_normalised"]].mean().reset_index()
    out["alpha"] = out["alpha"].where(out["alpha"] >= 0)
    return out


def chosen(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """Per seed and method (and estimator, #examples, delta): the alpha with the best mean
    normalised VALIDATION accuracy (the first in grid order on a tie) and the test accuracy there
    ("accuracy", "normalised"), the one grid point the run evaluates on test."""
    out = []
    for seed, d in df.groupby("seed", sort=False):
        a = by_alpha(d, study).fillna({"alpha": -1.0})
        best = a.loc[a.groupby(KNOBS, sort=False, dropna=False)["val_normalised"].idxmax()]
        out.append(best.assign(seed=seed))
    res = pd.concat(out, ignore_index=True)
    res["alpha"] = res["alpha"].where(res["alpha"] >= 0)
    return res[["seed", *KNOBS, "alpha", "accuracy", "normalised", "val_normalised"]]


def references(df: pd.DataFrame) -> pd.DataFrame:
    """Per seed and reference model (individual, multitask, probe, base_heads): mean accuracy and
    mean normalised accuracy over tasks, on test and on validation."""
    d = df[df["study"].isin(["individual", "multitask", "probe", "base_heads"])]
    cols = ["accuracy", "normalised", "val_accuracy", "val_normalised"]
    return d.groupby(["seed", "method"], sort=False)[cols].mean().reset_index()


def seed_table(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """Mean and standard deviation over seeds of the mean test accuracy and normalised accuracy
    over tasks: the references and every method at its validation-chosen alpha (`alphas`: the
    choice per seed)."""
    rows = pd.concat([references(df), chosen(df, study)], ignore_index=True)
    g = rows.groupby("method", sort=False)
    out = g[["accuracy", "normalised"]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["alphas"] = g["alpha"].apply(lambda a: ",".join("-" if pd.isna(x) else f"{x:g}" for x in a))
    out["seeds"] = g["seed"].nunique()
    return out


def per_seed(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """The rows of `seed_table` before averaging: per seed and model (references, every method at
    its chosen alpha) the mean test accuracy and normalised accuracy over tasks; the input of
    `pipeline.by_seed` and `pipeline.compare` (the paired per-seed rule)."""
    return pd.concat([references(df), chosen(df, study)], ignore_index=True)


def alpha_curves(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """Per method and alpha: mean and standard deviation over seeds of the mean (over tasks)
    normalised VALIDATION accuracy (the curve the alpha is chosen on; test is evaluated only at
    the chosen alpha)."""
    d = df[df["study"] == study].fillna({"alpha": -1.0})
    seeds = d.groupby(["method", "alpha", "seed"], sort=False)[["val_normalised"]].mean()
    out = seeds.groupby(["method", "alpha"], sort=False).agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out = out.reset_index()
    out["alpha"] = out["alpha"].where(out["alpha"] >= 0)
    return out


def seed_jobs(seeds: Sequence[int], scale: str | None = None, **overrides: Any) -> list[tuple]:
    """One job per seed for `pipeline.parallel` (`run` of its setup, no progress bars), made
    after theta_0, which every seed shares."""
    setups = [setup(scale, seed, **overrides) for seed in seeds]
    with V.fast_cpu():
        base_backbone(setups[0], progress=False)
    return [(functools.partial(run, progress=False), (s,)) for s in setups]


def run_seeds(seeds: Sequence[int], scale: str | None = None, workers: int | None = None,
              **overrides: Any) -> pd.DataFrame:
    """`run` for every seed (one pretrained theta_0, seeds vary heads, fine-tuning and Fishers),
    side by side on the machine's cores (`pipeline.parallel`)."""
    return P.tables(seed_jobs(seeds, scale, **overrides), workers=workers)[0]


def summary(df: pd.DataFrame, study: str = "merge") -> pd.DataFrame:
    """Per method: the alphas chosen on validation (one per seed), the mean test accuracy and
    normalised accuracy there, and `val_spread`, max - min over the alpha grid of the mean
    normalised validation accuracy (0 where a common alpha cancels): sensitivity to alpha."""
    ch = chosen(df, study)
    g = ch.groupby("method", sort=False)
    spread = alpha_curves(df, study).groupby("method", sort=False)["val_normalised_mean"]
    return pd.DataFrame({
        "alphas": g["alpha"].apply(lambda a: ",".join("-" if pd.isna(x) else f"{x:g}" for x in a)),
        "accuracy": g["accuracy"].mean(), "normalised": g["normalised"].mean(),
        "val_spread": spread.max() - spread.min()})
