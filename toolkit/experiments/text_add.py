"""Text benchmark, adding tasks: one encoder (MiniLM; roberta-base at full; a random tiny BERT at
tiny) fine-tuned per task with its own head; the shared bodies merged with every registered
method over an alpha grid; accuracy per task, normalised accuracy, spread over alpha, and the
gradient mismatch m(theta) of the merges against their test error. Fine-tuned models, Fishers
and the result table are cached by configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import cache, hub, text as T, tiny
from ..merge import METHODS
from ..scale import pick
from ..train import trainable
from . import pipeline as P

StateDict = Mapping[str, Tensor]
MINILM = tiny.MINILM


@dataclass(frozen=True, kw_only=True)
class TextAddSetup(P.Setup):
    """Every number of the adding-tasks experiment (cache keys hash parts of it)."""
    model: str
    tasks: tuple[str, ...]
    n_train: int                 # N_t per task (also the number of fine-tuning examples seen)
    n_test: int
    max_len: int
    batch_size: int
    steps: int
    lr: float
    fisher_kind: str
    fisher_examples: int
    deltas: tuple[float, ...]    # the delta sweep (fine-tuning uses no explicit prior)
    mismatch_examples: int
    mismatch_methods: tuple[str, ...] = ("average", "task_arithmetic", "fisher_average",
                                         "gradient_matching")  # the merges whose mismatch is measured


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> TextAddSetup:
    """Adding tasks at a scale: tiny (random BERT, seconds), small (MiniLM, BBC/tweets/spam, CPU
    minutes), full (roberta-base on the paper's five sentiment sets through `datasets`, GPU)."""
    scale = P.check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = TextAddSetup(
        scale=scale, seed=seed, model=p("tiny-bert", MINILM, "roberta-base"),
        tasks=p(("bbc", "tweets", "spam"), ("bbc", "tweets", "spam"),
                ("imdb", "yelp", "rotten_tomatoes", "sst2", "amazon")),
        n_train=p(32, 640, 8000), n_test=p(16, 150, 1000), max_len=p(32, 64, 256), batch_size=p(8, 16, 16),
        steps=p(4, 40, 500), lr=p(1e-3, 1e-4, 1e-5), fisher_kind="mc", fisher_examples=p(8, 96, 1000),
        alphas=p((0.5, 1.0), (0.25, 0.5, 0.75, 1.0), (0.2, 0.4, 0.6, 0.8, 1.0)),
        delta=p(1e-2, 1e-2, 1e-2), deltas=p((1.0,), (1e-4, 1.0, 1e2), (1e-4, 1e-2, 1.0, 1e2)),
        mismatch_examples=p(8, 32, 256), device=P.default_device())
    return replace(s, **overrides)


def _threads(s: P.Setup) -> int | None:
    return 1 if s.scale == "tiny" else None


def _task_data(s: TextAddSetup, name: str) -> tuple[T.TextSet, T.TextSet]:
    return (T.load_task(name, "train", s.n_train, n_test=s.n_test, seed=s.seed),
            T.load_task(name, "test", s.n_test, n_test=s.n_test, seed=s.seed))


def _classifier(s: TextAddSetup, n_classes: int):
    """The base encoder with a fresh head (seeded: every task starts from the same theta_0)."""
    model, tok = hub.pretrained("classifier", tiny.model_name(s.model), n_classes, s.seed)
    return model.to(s.device).eval(), tok


def _is_head(name: str) -> bool:
    return name.startswith("classifier.")


def _batches(s: TextAddSetup, tok, data: T.TextSet, batch_size: int | None = None) -> list:
    return [P.to_device(b, s.device) for b in T.classification_batches(
        tok, data, batch_size=batch_size or s.batch_size, max_len=s.max_len)]


def finetune(s: TextAddSetup, name: str, train: T.TextSet, progress: bool = True) -> dict:
    """theta_t (body) and its head: AdamW on the task's cross-entropy from theta_0 (cached)."""
    from ..train import train as fit
    cfg = {"exp": "text-add", "model": s.model, "task": name, "data": train.fingerprint(), "steps": s.steps,
           "lr": s.lr, "bs": s.batch_size, "len": s.max_len, "seed": s.seed}

    def compute():
        model, tok = _classifier(s, len(train.classes))
        batches = _batches(s, tok, train)
        fit(model, [batches[i % len(batches)] for i in range(s.steps)], lr=s.lr, progress=progress,
            desc=f"fine-tune {name}")
        sd = trainable(model)
        return {"body": {k: v for k, v in sd.items() if not _is_head(k)},
                "head": {k: v for k, v in sd.items() if _is_head(k)}}
    return cache.cached("language-ft", cfg, compute)


def task_fisher(s: TextAddSetup, name: str, ft: dict, train: T.TextSet) -> dict[str, Tensor]:
    """F_t of the body at theta_t: per-example mean diagonal Fisher (toolkit.curvature)."""
    from ..curvature import fisher
    cfg = {"exp": "text-add", "model": s.model, "task": name, "data": train.fingerprint(), "steps": s.steps,
           "lr": s.lr, "bs": s.batch_size, "len": s.max_len, "seed": s.seed,
           "fisher": [s.fisher_kind, s.fisher_examples]}

    def compute():
        model, tok = _classifier(s, len(train.classes))
        model.load_state_dict({**ft["body"], **ft["head"]}, strict=False)
        f = fisher(model, iter(_batches(s, tok, train)), s.fisher_kind, seed=s.seed, progress=False,
                   max_examples=s.fisher_examples, params=lambda k: not _is_head(k))
        return {k: v.cpu() for k, v in f.items() if k in ft["body"]}
    return cache.cached("language-fisher", cfg, compute)


def _table_cfg(s: TextAddSetup) -> dict:
    data = [T.load_task(t, sp, n, n_test=s.n_test, seed=s.seed).fingerprint()
            for t in s.tasks for sp, n in (("train", s.n_train), ("test", s.n_test))]
    return {"exp": "text-add", **asdict(s), "data": data, "methods": list(METHODS)}


def prepare(s: TextAddSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune every task and estimate its Fisher (cached): the slow half of `run`, as its
    own step so a notebook cell stays short."""
    s = s or setup()
    if not P.table_cached(_table_cfg(s)):
        fishers(s, progress)


def run(s: TextAddSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Adding tasks: one row per (study, method, alpha, delta, task) with accuracy, the individual
    model's accuracy, normalised accuracy (merged / individual) and, for the mismatch study,
    ||m(theta)|| of the merge. Cached as a whole by the setup."""
    s = s or setup()
    rows = cache.cached("language-table", _table_cfg(s), lambda: _run(s, progress))
    return pd.DataFrame(rows)


def _run(s: TextAddSetup, progress: bool) -> list[dict]:
    from ..mismatch import gradient_mismatch, total_norm
    from ..train import evaluate, loss_gradient
    with hub.quiet(_threads(s)):
        data = {t: _task_data(s, t) for t in s.tasks}
        fts = {t: finetune(s, t, data[t][0], progress) for t in s.tasks}
        fs = [task_fisher(s, t, fts[t], data[t][0]) for t in s.tasks]
        models, tok = {}, None
        for t in s.tasks:
            models[t], tok = _classifier(s, len(data[t][0].classes))
        base = {k: v for k, v in trainable(models[s.tasks[0]]).items() if not _is_head(k)}
        for t in s.tasks:
            models[t].load_state_dict(fts[t]["head"], strict=False)
        tests = {t: _batches(s, tok, data[t][1], batch_size=64) for t in s.tasks}
        bodies = [fts[t]["body"] for t in s.tasks]
        sizes = [float(len(data[t][0])) for t in s.tasks]

        def accuracy(t: str, body: StateDict) -> float:
            models[t].load_state_dict(body, strict=False)
            with torch.no_grad():
                return evaluate(models[t], tests[t])["accuracy"]

        rows: list[dict] = []

        def record(study, method, acc, **extra):
            rows.extend({"study": study, "method": method, "task": t, "accuracy": a, **extra}
                        for t, a in acc.items())

        for t, b in zip(s.tasks, bodies):
            record("individual", "individual", {t: accuracy(t, b)})
        record("base", "base body, task head", {t: accuracy(t, base) for t in s.tasks})
        jobs = [("merge", m, a, s.delta) for m, a in P.grid(s.alphas)]
        jobs += [("delta", m, a, d) for d in s.deltas if d != s.delta
                 for m, a in P.grid(s.alphas, P.methods(option="delta"))]
        merged_at = {}
        for study, m, a, d in tqdm(jobs, desc="text-add merges", disable=not progress, leave=False):
            sd = P.merge(s, m, base, bodies, a, fishers=fs, sizes=sizes, delta=d)
            record(study, m.name, {t: accuracy(t, sd) for t in s.tasks}, alpha=P.row_alpha(m, a),
                   delta=d if "delta" in m.options else None)
            if study == "merge" and m.name in s.mismatch_methods:
                merged_at[(m.name, a)] = sd

        # gradient mismatch m(theta) = sum_t alpha_t [grad lbar_t(theta) - grad lbar_t(theta_t)]
        def grad(t: str, body: StateDict) -> dict[str, Tensor]:
            models[t].load_state_dict(body, strict=False)
            n = s.mismatch_examples
            sub = T.TextSet(t, data[t][0].texts[:n], data[t][0].labels[:n])
            g = loss_gradient(models[t], _batches(s, tok, sub))
            return {k: v.cpu() * (len(data[t][0]) / len(sub)) for k, v in g.items() if k in base}

        at_task = [grad(t, b) for t, b in zip(s.tasks, bodies)]
        for (m, a), sd in tqdm(merged_at.items(), desc="mismatch", disable=not progress, leave=False):
            g = [grad(t, sd) for t in s.tasks]
            norm = total_norm(gradient_mismatch(g, at_task, [a] * len(s.tasks)))
            alpha = P.row_alpha(METHODS[m], a)
            for r in rows:
                if r["study"] == "merge" and r["method"] == m and r.get("alpha") == alpha:
                    r["mismatch"] = norm
    ind = {r["task"]: r["accuracy"] for r in rows if r["study"] == "individual"}
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, individual=ind[r["task"]],
                 normalised=r["accuracy"] / ind[r["task"]] if ind[r["task"]] else float("nan"))
    cols = ["scale", "seed", "study", "method", "alpha", "delta", "task", "accuracy", "individual",
            "normalised", "mismatch"]
    return [{c: r.get(c) for c in cols} for r in rows]


def fishers(s: TextAddSetup, progress: bool = False) -> tuple[list[dict[str, Tensor]], list[float]]:
    """The Fishers F_t and sizes N_t of the adding-tasks experiment (from the cache after a run)."""
    with hub.quiet(_threads(s)):
        out = []
        for t in s.tasks:
            train, _ = _task_data(s, t)
            out.append((task_fisher(s, t, finetune(s, t, train, progress), train), float(len(train))))
    return [f for f, _ in out], [n for _, n in out]


def parts(s: TextAddSetup, progress: bool = False):
    """(theta_0 body, fine-tuned bodies, Fishers F_t, sizes N_t) of the adding-tasks experiment,
    from the cache after a run (computed otherwise)."""
    fs, sizes = fishers(s, progress)
    with hub.quiet(_threads(s)):
        model, _ = _classifier(s, 2)
        base = {k: v for k, v in trainable(model).items() if not _is_head(k)}
        bodies = [finetune(s, t, _task_data(s, t)[0], progress)["body"] for t in s.tasks]
    return base, bodies, fs, sizes


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method (main study): best alpha, mean accuracy and normalised accuracy there, and the
    spread max - min of the mean normalised accuracy over the alpha grid."""
    d = df[df["study"] == "merge"].copy()
    d["alpha"] = d["alpha"].fillna(1.0)
    best = P.best_alpha(d, "normalised", cols=("accuracy",))
    return pd.DataFrame({"best_alpha": best["alpha"], "accuracy": best["accuracy"],
                         "normalised": best["normalised"], "spread_over_alpha": best["spread"]})
