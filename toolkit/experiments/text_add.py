"""Text benchmark, adding tasks: one pretrained encoder (MiniLM at small; roberta-base at full; a
random tiny BERT at tiny) fine-tuned per task with its own head, the shared bodies merged with
every registered method. Knobs (alpha, delta, TIES' lambda) are chosen on a validation split and
the chosen merge is reported on the test split; a multi-task model (one body, every task's head,
trained on all tasks with the same number of steps) is the upper reference.

delta is given relative to mean(N_t F_t), the mean over tasks and elements of the Fisher
precisions, so that it means the same prior strength whatever the Fishers' scale.
Below the top `top_layers` the encoder stays at theta_0 (`encoder.py`): what is fine-tuned and
merged is the top of the network. Fine-tuned models and Fishers are cached by configuration,
the result table by the whole setup.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import cache, hub, text as T, tiny
from ..merge import METHODS
from ..train import trainable
from ..scale import pick
from . import encoder as E, pipeline as P

StateDict = Mapping[str, Tensor]
MINILM = tiny.MINILM


@dataclass(frozen=True, kw_only=True)
class TextAddSetup(P.Setup):
    """Every number of the adding-tasks experiment (cache keys hash parts of it)."""
    model: str
    tasks: tuple[str, ...]
    top_layers: int              # layers fine-tuned and merged (the rest stay at theta_0)
    n_train: int                 # N_t per task
    n_val: int                   # validation texts per task: knobs are chosen here
    n_test: int                  # test texts per task: the chosen merge is reported here
    max_len: int
    batch_size: int
    steps: int
    lr: float
    fisher_kind: str
    fisher_examples: int
    deltas: tuple[float, ...]    # delta / mean(N_t F_t), chosen on validation with alpha
    data_seed: int = 0           # the test/validation/training split (the same for every seed)


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> TextAddSetup:
    """Adding tasks at a scale: tiny (random BERT, seconds), small (MiniLM, BBC/tweets/spam, CPU
    minutes), full (roberta-base on the paper's five sentiment sets through `datasets`, GPU)."""
    scale = P.check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = TextAddSetup(
        scale=scale, seed=seed, model=p("tiny-bert", MINILM, "roberta-base"),
        tasks=p(("bbc", "tweets", "spam"), ("bbc", "tweets", "spam"),
                ("imdb", "yelp", "rotten_tomatoes", "sst2", "amazon")),
        top_layers=p(1, 2, 12), n_train=p(32, 480, 8000), n_val=p(8, 48, 500), n_test=p(16, 300, 1000),
        max_len=p(32, 32, 256), batch_size=p(8, 16, 16), steps=p(4, 30, 500), lr=p(1e-3, 2e-4, 1e-5),
        fisher_kind="mc", fisher_examples=p(8, 256, 1000),
        alphas=p((0.5, 1.0), (0.25, 0.5, 1.0, 1.5, 2.0), (0.2, 0.5, 1.0, 1.5, 2.0)),
        delta=1.0, deltas=p((1e-2, 1.0), (1e-2, 1.0), (1e-3, 1e-2, 1.0, 1e2)), device=P.default_device())
    return replace(s, **overrides)


def _threads(s: P.Setup) -> int | None:
    return 1 if s.scale == "tiny" else None


def _split(s: TextAddSetup, name: str, split: str) -> T.TextSet:
    n = {"train": s.n_train, "val": s.n_val, "test": s.n_test}[split]
    if name in T.HF_SETS and split == "val":  # the hub sets have no validation split here: a train slice
        full = T.load_task(name, "train", s.n_train + s.n_val, seed=s.data_seed)
        return T.TextSet(name, full.texts[s.n_train:], full.labels[s.n_train:], full.classes)
    return T.load_task(name, split, n, n_test=s.n_test, n_val=s.n_val, seed=s.data_seed)


def _feats(s: TextAddSetup, data: T.TextSet) -> list[Tensor]:
    return E.features(s.model, s.top_layers, s.max_len, data)


def _batches(s: TextAddSetup, data: T.TextSet, order=None, batch_size: int | None = None) -> list:
    return E.batches(_feats(s, data), data.labels, batch_size or s.batch_size, order, s.device)


def _train_order(s: TextAddSetup, n: int, salt: str) -> list[int]:
    """Example order of fine-tuning: `steps` batches cycling through seeded permutations."""
    rng, out = random.Random(f"{s.seed}:{salt}"), []
    while len(out) < s.steps * s.batch_size:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm
    return out[: s.steps * s.batch_size]


def _ft_cfg(s: TextAddSetup, what: str) -> dict:
    return {"exp": "text-add", "model": s.model, "top": s.top_layers, "what": what, "n": s.n_train,
            "data": [_split(s, t, "train").fingerprint() for t in s.tasks], "steps": s.steps, "lr": s.lr,
            "bs": s.batch_size, "len": s.max_len, "seed": s.seed}


def finetune(s: TextAddSetup, name: str, progress: bool = True) -> dict:
    """theta_t (body) and its head: AdamW on the task's cross-entropy from theta_0 (cached)."""
    from ..train import train as fit

    def compute():
        train = _split(s, name, "train")
        model, _ = E.classifier(s.model, len(train.classes), s.seed, s.top_layers)
        fit(model.to(s.device), _batches(s, train, _train_order(s, len(train), name)), lr=s.lr,
            progress=progress, desc=f"fine-tune {name}")
        sd = trainable(model)
        return {"body": {k: v for k, v in sd.items() if not E.is_head(k)},
                "head": {k: v for k, v in sd.items() if E.is_head(k)}}
    return cache.cached("language-ft", _ft_cfg(s, name), compute)


def multitask(s: TextAddSetup, progress: bool = True) -> dict:
    """The multi-task reference: one body, one head per task, trained round-robin for
    len(tasks) * steps steps (each step one task's batch; the individual models' total)."""
    from ..train import train as fit

    def compute():
        trains = [_split(s, t, "train") for t in s.tasks]
        models = [E.classifier(s.model, len(d.classes), s.seed, s.top_layers)[0].to(s.device) for d in trains]
        for m in models[1:]:
            m.base_model.load_state_dict(models[0].base_model.state_dict())
            setattr(m, m.base_model_prefix, models[0].base_model)  # one shared body
        per_task = [_batches(s, d, _train_order(s, len(d), t)) for t, d in zip(s.tasks, trains)]
        joint = _Heads(models)
        fit(joint, [({"task": i, **x}, y) for step in range(s.steps) for i, b in enumerate(per_task)
                    for x, y in [b[step]]], lr=s.lr, progress=progress, desc="fine-tune multi-task")
        body = {k: v.detach().cpu().clone() for k, v in models[0].named_parameters() if not E.is_head(k)}
        heads = [{k: v.detach().cpu().clone() for k, v in m.named_parameters() if E.is_head(k)} for m in models]
        return {"body": body, "heads": heads}
    return cache.cached("language-ft", _ft_cfg(s, "multitask"), compute)


class _Heads(torch.nn.Module):
    """Several classifiers sharing one body; inputs carry the index of the task's head."""

    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, task: int, **inputs):
        return self.models[task](**inputs)


def task_fisher(s: TextAddSetup, name: str, ft: dict) -> dict[str, Tensor]:
    """F_t of the body at theta_t: per-example mean diagonal Fisher (toolkit.curvature)."""
    from ..curvature import fisher

    def compute():
        train = _split(s, name, "train")
        model, _ = E.classifier(s.model, len(train.classes), s.seed, s.top_layers)
        model.load_state_dict({**ft["body"], **ft["head"]}, strict=False)
        f = fisher(model.to(s.device), iter(_batches(s, train)), s.fisher_kind, seed=s.seed, progress=False,
                   max_examples=s.fisher_examples, params=lambda k: not E.is_head(k))
        return {k: v.cpu() for k, v in f.items() if k in ft["body"]}
    return cache.cached("language-fisher", {**_ft_cfg(s, name), "fisher": [s.fisher_kind, s.fisher_examples]},
                        compute)


def mean_precision(fishers, sizes) -> float:
    """mean(N_t F_t) over tasks and elements: the unit in which delta is given."""
    tot = sum(n * sum(float(v.double().sum()) for v in f.values()) for f, n in zip(fishers, sizes))
    return tot / (len(fishers) * sum(v.numel() for v in fishers[0].values()))


def _table_cfg(s: TextAddSetup) -> dict:
    data = [_split(s, t, sp).fingerprint() for t in s.tasks for sp in ("train", "val", "test")]
    return {"exp": "text-add-v2", **asdict(s), "data": data, "methods": list(METHODS)}


def prepare(s: TextAddSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune every task and the multi-task model, estimate the Fishers (cached): the slow half
    of `run`, as its own step so a notebook cell stays short."""
    s = s or setup()
    if not P.table_cached(_table_cfg(s)):
        with hub.quiet(_threads(s)):
            for t in s.tasks:
                task_fisher(s, t, finetune(s, t, progress))
            multitask(s, progress)


def run(s: TextAddSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Adding tasks: one row per (study, method, alpha, delta, split, task) with accuracy and
    normalised accuracy (merged / the task's own model on the same split). Studies:
    individual, base (theta_0 body, task heads), multitask, grid (every merge on validation),
    chosen (per method the knobs best on validation, on test). Cached as a whole."""
    s = s or setup()
    rows = cache.cached("language-table", _table_cfg(s), lambda: _run(s, progress))
    return pd.DataFrame(rows)


def _run(s: TextAddSetup, progress: bool) -> list[dict]:
    from ..train import evaluate
    with hub.quiet(_threads(s)):
        fts = {t: finetune(s, t, progress) for t in s.tasks}
        fs = [task_fisher(s, t, fts[t]) for t in s.tasks]
        mt = multitask(s, progress)
        splits = {(t, sp): _split(s, t, sp) for t in s.tasks for sp in ("val", "test")}
        models = {t: E.classifier(s.model, len(splits[t, "test"].classes), s.seed, s.top_layers)[0].to(s.device)
                  for t in s.tasks}
        base = {k: v for k, v in trainable(models[s.tasks[0]]).items() if not E.is_head(k)}
        evals = {k: _batches(s, d, batch_size=64) for k, d in splits.items()}
        bodies = [fts[t]["body"] for t in s.tasks]
        sizes = [float(len(_split(s, t, "train"))) for t in s.tasks]
        unit = mean_precision(fs, sizes)

        def accuracy(t: str, body: StateDict, split: str, head: StateDict | None = None) -> float:
            models[t].load_state_dict({**body, **(head or fts[t]["head"])}, strict=False)
            with torch.no_grad():
                return evaluate(models[t], evals[t, split])["accuracy"]

        rows: list[dict] = []

        def record(study, method, split, body, heads=None, tasks=s.tasks, **extra):
            rows.extend({"study": study, "method": method, "split": split, "task": t,
                         "accuracy": accuracy(t, body, split, heads and heads[t]), **extra} for t in tasks)

        for t in s.tasks:
            for split in ("val", "test"):
                record("individual", "individual", split, fts[t]["body"], tasks=(t,))
        record("base", "base body, task head", "test", base)
        record("multitask", "multi-task model", "test", mt["body"], dict(zip(s.tasks, mt["heads"])))
        jobs = [(m, a, d) for m, a in P.grid(s.alphas) for d in (s.deltas if "delta" in m.options else [None])]
        grid = []
        for m, a, d in tqdm(jobs, desc="text-add merges (validation)", disable=not progress, leave=False):
            kw = {"delta": d * unit} if d is not None else {}
            sd = P.merge(s, m, base, bodies, a, fishers=fs, sizes=sizes, **kw)
            record("grid", m.name, "val", sd, alpha=P.row_alpha(m, a), delta_rel=d)
            grid.append((m, a, d, sum(r["accuracy"] for r in rows[-len(s.tasks):]) / len(s.tasks)))
        for name in dict.fromkeys(m.name for m, *_ in grid):
            m, a, d, _ = max((g for g in grid if g[0].name == name), key=lambda g: g[3])
            kw = {"delta": d * unit} if d is not None else {}
            record("chosen", name, "test", P.merge(s, m, base, bodies, a, fishers=fs, sizes=sizes, **kw),
                   alpha=P.row_alpha(m, a), delta_rel=d)
    ind = {(r["task"], r["split"]): r["accuracy"] for r in rows if r["study"] == "individual"}
    for r in rows:
        own = ind[r["task"], r["split"]]
        r.update(scale=s.scale, seed=s.seed, individual=own, mean_precision=unit,
                 normalised=r["accuracy"] / own if own else float("nan"))
    cols = ["scale", "seed", "study", "method", "alpha", "delta_rel", "split", "task", "accuracy", "individual",
            "normalised", "mean_precision"]
    return [{c: r.get(c) for c in cols} for r in rows]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per reference and chosen merge, over seeds: mean and standard deviation of the mean test
    accuracy and normalised accuracy over tasks, and the knobs chosen (alpha, delta) per seed."""
    d = df[df["split"] == "test"]
    per_seed = d.groupby(["study", "method", "seed"], sort=False)[["accuracy", "normalised"]].mean()
    g = per_seed.groupby(["study", "method"], sort=False)
    out = pd.concat({"accuracy": g["accuracy"].mean(), "accuracy sd": g["accuracy"].std(ddof=1),
                     "normalised": g["normalised"].mean(), "normalised sd": g["normalised"].std(ddof=1)}, axis=1)
    knobs = d[d.study == "chosen"].groupby(["study", "method"], sort=False).agg(
        alpha=("alpha", lambda a: " ".join(f"{x:g}" for x in a.drop_duplicates()) if a.notna().any() else ""),
        delta_rel=("delta_rel", lambda a: " ".join(f"{x:g}" for x in a.drop_duplicates()) if a.notna().any() else ""))
    return out.join(knobs).reset_index(level=0)
