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
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

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
        top_layers=p(1, 1, 12), n_train=p(32, 480, 8000), n_val=p(8, 48, 500), n_test=p(16, 300, 1000),
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
    return E.features(s.model, s.top_layers, s.max_len, data, disk=True)


def _batches(s: TextAddSetup, data: T.TextSet, order=None, batch_size: int | None = None) -> list:
    return E.batches(_feats(s, data), data.labels, batch_size or s.batch_size, order, s.device)


def _eval_batches(s: TextAddSetup, data: T.TextSet) -> list:
    feats = _feats(s, data)
    return E.batches(feats, data.labels, 64, E.by_length(feats), s.device)


def _train_order(s: TextAddSetup, n: int, salt: str) -> list[int]:
    """Example order of fine-tuning: `steps` batches cycling through seeded permutations."""
    rng, out = random.Random(f"{s.seed}:{salt}"), []
    while len(out) < s.steps * s.batch_size:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm
    return out[: s.steps * s.batch_size]


def _ft_cfg(s: TextAddSetup, what: str) -> dict:
    return {"exp": "text-add-v3", "model": s.model, "top": s.top_layers, "what": what, "n": s.n_train,
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
    def compute():
        train = _split(s, name, "train")
        model, _ = E.classifier(s.model, len(train.classes), s.seed, s.top_layers)
        model.load_state_dict({**ft["body"], **ft["head"]}, strict=False)
        return E.fisher(model.to(s.device), _batches(s, train), s.fisher_kind, s.seed, s.fisher_examples,
                        params=lambda k: k in ft["body"])
    return cache.cached("language-fisher", {**_ft_cfg(s, name), "fisher": [s.fisher_kind, s.fisher_examples]},
                        compute)


def mean_precision(fishers, sizes) -> float:
    """mean(N_t F_t) over tasks and elements: the unit in which delta is given."""
    tot = sum(n * sum(float(v.double().sum()) for v in f.values()) for f, n in zip(fishers, sizes))
    return tot / (len(fishers) * sum(v.numel() for v in fishers[0].values()))


def _table_cfg(s: TextAddSetup) -> dict:
    data = [_split(s, t, sp).fingerprint() for t in s.tasks for sp in ("train", "val", "test")]
    return {"exp": "text-add-v3", **asdict(s), "data": data, "methods": list(METHODS)}


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
        evals = {k: _eval_batches(s, d) for k, d in splits.items()}
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


def run_seeds(seeds: Sequence[int], scale: str | None = None, progress: bool = False,
              **overrides: Any) -> pd.DataFrame:
    """`prepare` and `run` for every seed (cached), one table."""
    return E.run_seeds(sys.modules[__name__], seeds, scale, progress, **overrides)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The chapter's table: `summary` (mean and sd over seeds, chosen knobs) with the mean test
    accuracy per task, rows labelled as in the figures."""
    from ..plots import method_label
    test = df[df["split"] == "test"]
    tasks = list(dict.fromkeys(test["task"]))
    per_task = test.groupby(["method", "task"], sort=False)["accuracy"].mean().unstack("task")[tasks]
    cols = ["accuracy", "accuracy sd", "normalised", "normalised sd", "alpha", "delta_rel"]
    out = summary(df)[cols].join(per_task)
    out.index = [method_label(m) for m in out.index]
    return out


def alpha_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, delta, alpha) of the validation grid: mean and sd over seeds of the mean
    validation accuracy over tasks."""
    grid = df[df["study"] == "grid"]
    keys = ["method", "delta_rel", "alpha"]
    per_seed = grid.groupby([*keys, "seed"], sort=False, dropna=False)["accuracy"].mean()
    return per_seed.groupby(keys, sort=False, dropna=False).agg(["mean", "std"]).reset_index()


def figure(curve: pd.DataFrame):
    """Mean validation accuracy against alpha per method (and delta), error bars over seeds;
    dotted lines for methods in which a common alpha cancels."""
    from .. import plots
    fig, ax = plots.figure(width=6.0, height=4.0)
    styles = iter(["-", "--", ":", "-."])
    for (m, d), g in curve.groupby(["method", "delta_rel"], sort=False, dropna=False):
        if METHODS[m].alpha_cancels:
            ax.axhline(g["mean"].item(), ls=":", color=plots.method_color(m), label=plots.method_label(m))
            continue
        label = plots.method_label(m) + ("" if pd.isna(d) else f", $\\delta = {d:g}\\,\\overline{{N_t F_t}}$")
        ax.errorbar(g["alpha"], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=2,
                    color=plots.method_color(m), ls="-" if pd.isna(d) else next(styles), label=label)
    ax.set(xlabel=r"scaling factor $\alpha$ (TIES: $\lambda$)", ylabel="mean validation accuracy")
    plots.legend_outside(ax)
    return fig


def quotes(s: TextAddSetup, df: pd.DataFrame) -> dict[str, Any]:
    """Every number and verdict the chapter quotes about adding tasks (keys without the
    chapter's prefix). Verdicts follow the one tie rule (`pipeline.compare` over per-seed means)."""
    from ..plots import method_label
    test = df[df["split"] == "test"]
    summ = summary(df)
    norm, acc = P.by_seed(test, "normalised"), P.by_seed(test, "accuracy")
    merges = [m for m in METHODS if m in summ.index and m in norm]
    ranked = sorted(merges, key=lambda m: -summ.loc[m, "normalised"])
    winner, runner, last = ranked[0], ranked[1], ranked[-1]
    gm_ta = P.paired(norm["gradient_matching"], norm["task_arithmetic"])
    win = P.paired(norm[winner], norm[runner])
    mt = P.paired(acc["multi-task model"], acc[winner])
    ind = test[test["study"] == "individual"].groupby("task")["accuracy"].mean()
    curve = alpha_curve(df)
    ta_curve = curve[curve["method"] == "task_arithmetic"]["mean"]
    gm_curve = curve[curve["method"] == "gradient_matching"].groupby("delta_rel")["mean"]
    gm_spread = gm_curve.max() - gm_curve.min()
    q = {
        "steps": s.steps, "bs": s.batch_size, "n": s.n_train, "val": s.n_val, "test": s.n_test,
        "len": s.max_len, "fex": s.fisher_examples, "top": s.top_layers, "lr": s.lr,
        "alphas": ", ".join(f"{a:g}" for a in s.alphas), "deltas": ", ".join(f"{d:g}" for d in s.deltas),
        "seeds": int(df["seed"].nunique()),
        **{f"ind-{t}": float(ind[t]) for t in s.tasks},
        "base-mean": float(summ.loc["base body, task head", "accuracy"]),
        "mt-acc": float(summ.loc["multi-task model", "accuracy"]),
        "mt-norm": float(summ.loc["multi-task model", "normalised"]),
        **{f"norm-{m}": float(summ.loc[m, "normalised"]) for m in merges},
        **{f"normsd-{m}": float(summ.loc[m, "normalised sd"]) for m in merges},
        "winner": method_label(winner), "winner-norm": float(summ.loc[winner, "normalised"]),
        "runner": method_label(runner), "win-lo": win["lo"], "win-hi": win["hi"],
        "win-verdict": P.compare(norm, winner, runner, higher="ahead over the seeds", tie="a tie"),
        "last": method_label(last), "last-norm": float(summ.loc[last, "normalised"]),
        "gm-ta-diff": gm_ta["diff"], "gm-ta-lo": gm_ta["lo"], "gm-ta-hi": gm_ta["hi"],
        "gm-ta-verdict": P.compare(norm, "gradient_matching", "task_arithmetic",
                                   higher="above task arithmetic",
                                   lower="below task arithmetic",
                                   tie="a tie: the mean difference is within the seeds' noise"),
        "mt-gap": mt["diff"], "mt-lo": mt["lo"], "mt-hi": mt["hi"],
        "mt-verdict": P.compare(acc, "multi-task model", winner,
                                higher="the multi-task model is ahead",
                                lower="the best merge is ahead", tie="a tie"),
        "spread-ta": float(ta_curve.max() - ta_curve.min()),
        "spread-gm-lo": float(gm_spread.iloc[0]), "spread-gm-hi": float(gm_spread.iloc[-1]),
        "delta-lo": float(gm_spread.index[0]), "delta-hi": float(gm_spread.index[-1]),
    }
    return q
