"""Text benchmark, adding data sets to one model (the paper's Figure 1): one label space
(tweet sentiment: negative / neutral / positive) from several sources of very different size,
subject and label balance (`text.TWEET_SOURCES`). theta_0 is the encoder fine-tuned on the first
source; every other source t fine-tunes theta_0 into theta_t; merging the first k of them is
compared with the all-data model theta_all^k: theta_0 fine-tuned on the union of sources 1..k for
as many steps as theta_1..theta_k together, the target theta_{1:k} of the paper's derivation (its
prior, what theta_0 knows, is the shared starting point). Reported: accuracy, distance to
theta_all^k, and the gradient mismatch m(theta) = sum_{t<=k} [grad lbar_t(theta) - grad lbar_t(theta_t)].

Gradient matching uses H_0 = delta + N_0 F_0, with F_0 the Fisher of theta_0 on the first source
(what theta_0 already knows); the knobs of every method (alpha, TIES' lambda, and delta) are
chosen per k on the validation split, results are on the test split.
"""
from __future__ import annotations

import hashlib
import math
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
from ..scale import pick
from ..train import trainable
from . import encoder as E, pipeline as P

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class SourcesSetup(P.Setup):
    """Every number of the adding-data-sets experiment."""
    model: str
    top_layers: int
    sources: tuple[str, ...]     # the first trains theta_0; the others are added in this order
    sizes: tuple[int, ...]       # N_t per source
    markers: tuple[int, ...]     # the numbers k of added sources that are merged and compared
    n_val: int                   # validation texts per source
    n_test: int                  # test texts per source
    max_len: int
    batch_size: int
    epochs: int                  # passes over each source's training texts
    lr: float
    fisher_kind: str
    fisher_examples: int         # at most N_t
    deltas: tuple[float, ...]    # delta / mean(N_t F_t) for gradient matching, chosen on validation
    mismatch_examples: int       # texts per source for each gradient of lbar_t
    data_seed: int = 0


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> SourcesSetup:
    """tiny (random BERT, three sources), small (MiniLM, four tweet sources of 80-320 texts), full
    (roberta-base, six sources of 200-8000 texts)."""
    scale = P.check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    six = ("airline", "deflategate", "coachella", "apple", "cars", "allergy")
    s = SourcesSetup(
        scale=scale, seed=seed, model=p("tiny-bert", tiny.MINILM, "roberta-base"), top_layers=p(1, 1, 12),
        sources=p(six[:3], six[:4], six), sizes=p((32, 16, 8), (320, 240, 160, 80),
                                                  (8000, 4000, 2000, 1000, 500, 200)),
        markers=p((1, 2), (1, 2, 3), (1, 2, 3, 4, 5)),
        n_val=p(8, 32, 200), n_test=p(8, 50, 500), max_len=p(32, 32, 64), batch_size=p(8, 16, 16),
        epochs=p(1, 1, 2), lr=p(1e-3, 5e-4, 1e-5), fisher_kind="mc", fisher_examples=p(8, 128, 1000),
        alphas=p((0.5, 1.0), (0.5, 1.0), (0.5, 1.0)), delta=1.0,
        deltas=p((1e-2, 1.0), (1e-2, 1.0), (1e-3, 1e-2, 1.0)),
        mismatch_examples=p(8, 16, 256), device=P.default_device())
    return replace(s, **overrides)


def _threads(s: P.Setup) -> int | None:
    return 1 if s.scale == "tiny" else None


def source(s: SourcesSetup, i: int, split: str) -> T.TextSet:
    """Source i's training (N_i texts), validation or test split."""
    n = {"train": s.sizes[i], "val": s.n_val, "test": s.n_test}[split]
    return T.load_task(f"tweets_{s.sources[i]}", split, n, n_test=s.n_test, n_val=s.n_val, seed=s.data_seed)


def _steps(s: SourcesSetup, n: int) -> int:
    return math.ceil(s.epochs * n / s.batch_size)


def _data_cfg(s: SourcesSetup) -> dict:
    return {"exp": "text-sources-v3", "model": s.model, "top": s.top_layers, "len": s.max_len, "bs": s.batch_size,
            "epochs": s.epochs, "lr": s.lr, "seed": s.seed}


def _fit(s: SourcesSetup, start: StateDict | None, start_cfg: Any, parts: Sequence[int], progress: bool,
         desc: str) -> tuple[dict[str, Tensor], dict]:
    """theta trained from `start` (None: the pretrained encoder with a fresh head) on the shuffled
    union of the training texts of `parts`, for sum over parts of epochs * N / batch steps (cached)."""
    from ..train import train as fit
    cfg = {**_data_cfg(s), "start": start_cfg, "parts": [source(s, i, "train").fingerprint() for i in parts]}

    def compute():
        model, _ = E.classifier(s.model, 3, s.seed, s.top_layers)
        if start is not None:
            model.load_state_dict(start, strict=False)
        feats, labels = [], []
        for i in parts:
            d = source(s, i, "train")
            feats += E.features(s.model, s.top_layers, s.max_len, d)
            labels += list(d.labels)
        steps = sum(_steps(s, s.sizes[i]) for i in parts)
        rng, order = random.Random(f"{s.seed}:{desc}"), []
        while len(order) < steps * s.batch_size:
            perm = list(range(len(feats)))
            rng.shuffle(perm)
            order += perm
        fit(model.to(s.device), E.batches(feats, labels, s.batch_size, order[: steps * s.batch_size], s.device),
            lr=s.lr, progress=progress, desc=desc)
        return trainable(model)
    return cache.cached("language-ft", cfg, compute), cfg


def models(s: SourcesSetup, progress: bool = True) -> dict[str, Any]:
    """theta_0 (first source), theta_t (theta_0 fine-tuned on source t), the all-data models
    theta_all^k (theta_0 fine-tuned on sources 1..k at once) and the Fishers F_t (all cached)."""
    base, base_cfg = _fit(s, None, "pretrained", [0], progress, "theta_0")
    added = [_fit(s, base, base_cfg, [i], progress, f"theta_{i}")
             for i in range(1, len(s.sources))]
    thetas, cfgs = [base] + [a for a, _ in added], [base_cfg] + [c for _, c in added]
    alldata = {k: _fit(s, base, base_cfg, list(range(1, k + 1)), progress, f"all_{k}")[0] for k in s.markers}

    def fisher_of(i: int) -> dict[str, Tensor]:
        def compute():
            model, _ = E.classifier(s.model, 3, s.seed, s.top_layers)
            model.load_state_dict(thetas[i], strict=False)
            d = source(s, i, "train")
            b = E.batches(E.features(s.model, s.top_layers, s.max_len, d), d.labels, s.batch_size, device=s.device)
            return E.fisher(model.to(s.device), b, s.fisher_kind, s.seed, min(s.fisher_examples, len(d)))
        return cache.cached("language-fisher", {**cfgs[i], "fisher": [s.fisher_kind, s.fisher_examples]}, compute)
    return {"thetas": thetas, "alldata": alldata, "fishers": [fisher_of(i) for i in range(len(s.sources))]}


def _table_cfg(s: SourcesSetup) -> dict:
    data = [source(s, i, sp).fingerprint() for i in range(len(s.sources)) for sp in ("train", "val", "test")]
    return {"exp": "text-sources-v3", **asdict(s), "data": data, "methods": list(METHODS)}


def prepare(s: SourcesSetup | None = None, *, progress: bool = True) -> None:
    """Train theta_0, every theta_t and every all-data model, estimate the Fishers (cached)."""
    s = s or setup()
    if not P.table_cached(_table_cfg(s)):
        with hub.quiet(_threads(s)):
            models(s, progress)


def run(s: SourcesSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """One row per (k added sources, study, method) with validation and test accuracy (mean over
    sources 0..k), distance to theta_all^k, and ||m(theta)||. Studies: base (theta_0), all-data
    (theta_all^k), merge (per method the knobs best on validation). Cached as a whole."""
    s = s or setup()
    return pd.DataFrame(cache.cached("language-table", _table_cfg(s), lambda: _run(s, progress)))


def _digest(theta: StateDict) -> str:
    """A content hash of a state dict: the key under which its evaluations are memoised."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(theta):
        h.update(k.encode())
        h.update(theta[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(s: SourcesSetup, progress: bool) -> list[dict]:
    from ..mismatch import gradient_mismatch, total_norm
    from ..train import evaluate, loss_gradient
    with hub.quiet(_threads(s)):
        parts = models(s, progress)
        thetas, alldata, fs = parts["thetas"], parts["alldata"], parts["fishers"]
        sizes = [float(n) for n in s.sizes]
        unit = sum(n * sum(float(v.double().sum()) for v in f.values()) for f, n in zip(fs, sizes)) / (
            len(fs) * sum(v.numel() for v in fs[0].values()))
        model, _ = E.classifier(s.model, 3, s.seed, s.top_layers)
        model.to(s.device)

        def feats(d: T.TextSet) -> list[Tensor]:
            return E.features(s.model, s.top_layers, s.max_len, d)
        evals = {(i, sp): E.batches(feats(d), d.labels, 64, E.by_length(feats(d)), s.device)
                 for i in range(len(s.sources)) for sp in ("val", "test") for d in [source(s, i, sp)]}
        grad_sets = []
        for i in range(len(s.sources)):
            d = source(s, i, "train")
            n = min(s.mismatch_examples, len(d))
            grad_sets.append((E.batches(feats(d)[:n], d.labels[:n], s.batch_size, device=s.device), len(d) / n))
        memo: dict[tuple, Any] = {}  # (theta digest, source, split or "grad") -> accuracy or gradient

        def per_source(theta: StateDict, key: str, i: int, digest: str | None = None) -> Any:
            tag = (digest or _digest(theta), i, key)
            if tag not in memo:
                model.load_state_dict(theta, strict=False)
                if key == "grad":
                    b, scale = grad_sets[i]
                    memo[tag] = {k: v.cpu() * scale for k, v in loss_gradient(model, b).items()}
                else:
                    with torch.no_grad():
                        memo[tag] = evaluate(model, evals[i, key])["accuracy"]
            return memo[tag]

        def accuracy(theta: StateDict, split: str, k: int, digest: str | None = None) -> float:
            digest = digest or _digest(theta)
            return sum(per_source(theta, split, i, digest) for i in range(k + 1)) / (k + 1)

        def distance(a: StateDict, b: StateDict) -> float:
            return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b))

        at_own = [per_source(th, "grad", i) for i, th in enumerate(thetas)]
        rows: list[dict] = []

        def record(k, study, method, theta, **extra):
            key = _digest(theta)
            m = total_norm(gradient_mismatch([per_source(theta, "grad", i, key) for i in range(k + 1)],
                                             at_own[: k + 1], [1.0] * (k + 1)))
            rows.append({"k": k, "study": study, "method": method, "val": accuracy(theta, "val", k, key),
                         "test": accuracy(theta, "test", k, key), "distance": distance(theta, alldata[k]),
                         "mismatch": m, **extra})

        for k in tqdm(s.markers, desc="text-sources", disable=not progress, leave=False):
            record(k, "base", "theta_0", thetas[0])
            record(k, "all-data", "all-data model", alldata[k])
            added, fk = thetas[1: k + 1], fs[1: k + 1]
            for m in P.methods():
                if m.alpha_cancels:  # averages of every model, theta_0 included
                    cands = [(1.0, None, lambda m=m: P.merge(s, m, thetas[0], thetas[: k + 1], 1.0,
                                                             fishers=fs[: k + 1], sizes=sizes[: k + 1]))]
                elif "delta" in m.options:  # H_0 = delta + N_0 F_0: what theta_0 knows
                    cands = [(a, d, lambda m=m, a=a, d=d: P.merge(s, m, thetas[0], added, a, fishers=fk,
                                                                  sizes=sizes[1: k + 1], base_fisher=fs[0],
                                                                  base_size=sizes[0], delta=d * unit))
                             for a in s.alphas for d in s.deltas]
                else:
                    cands = [(a, None, lambda m=m, a=a: P.merge(s, m, thetas[0], added, a)) for a in s.alphas]
                best = max(((a, d, sd, accuracy(sd, "val", k)) for a, d, make in cands for sd in [make()]),
                           key=lambda c: c[3])
                record(k, "merge", m.name, best[2], alpha=best[0], delta_rel=best[1])
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, mean_precision=unit)
    return rows


def summary(df: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
    """Per study/method at k added sources (default: all): mean and standard deviation over seeds
    of test accuracy, distance to the all-data model and mismatch."""
    k = int(df["k"].max()) if k is None else k
    g = df[df["k"] == k].groupby(["study", "method"], sort=False)
    cols = ["test", "distance", "mismatch"]
    return pd.concat({**{c: g[c].mean() for c in cols}, **{f"{c} sd": g[c].std(ddof=1) for c in cols}},
                     axis=1)[[x for c in cols for x in (c, f"{c} sd")]].reset_index(level=0)


def run_seeds(seeds: Sequence[int], scale: str | None = None, progress: bool = False,
              **overrides: Any) -> pd.DataFrame:
    """`prepare` and `run` for every seed (cached), one table."""
    return E.run_seeds(sys.modules[__name__], seeds, scale, progress, **overrides)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """`summary` at the largest k, rows labelled as in the figures."""
    from ..plots import method_label
    out = summary(df)
    out.index = [method_label(m) for m in out.index]
    return out


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, k) of the all-data model and the merges: mean over seeds of test accuracy,
    mismatch and distance, and the test error."""
    pts = df[df["study"] != "base"].groupby(["method", "k"], sort=False)[["test", "mismatch", "distance"]]
    pts = pts.mean().reset_index()
    return pts.assign(error=1 - pts["test"])


def figure(pts: pd.DataFrame):
    """Test error against the gradient mismatch (left) and the distance to the all-data model
    (right), one marker per k (labelled); stars: the all-data model."""
    from .. import plots
    fig, axes = plots.figure(ncols=2, width=4.6, height=4.0)
    for m, g in pts.groupby("method", sort=False):
        merge = m in METHODS
        for ax, x in zip(axes, ("mismatch", "distance")):
            ax.plot(g[x], g["error"], marker="o" if merge else "*", ms=7, lw=0.8,
                    color=plots.method_color(m) if merge else "k",
                    label=plots.method_label(m) if merge else "all-data model")
            for _, r in g.iterrows():
                ax.annotate(f"{r.k:g}", (r[x], r.error), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xscale="log", xlabel=r"gradient mismatch $\|\mathbf{m}(\theta)\|$", ylabel="test error")
    axes[1].set(xlabel="distance to the all-data model", ylabel="test error")
    plots.legend_outside(axes[1])
    fig.tight_layout()
    return fig


def quotes(s: SourcesSetup, df: pd.DataFrame) -> dict[str, Any]:
    """Every number and verdict the chapter quotes about adding data sets (keys without the
    chapter's prefix): at the largest k, means over seeds and per-seed verdicts (`pipeline.compare`)."""
    from ..plots import method_label
    K = int(df["k"].max())
    at_k = df[df["k"] == K]
    test, dist = P.by_seed(at_k, "test"), P.by_seed(at_k, "distance")
    merges = [m for m in METHODS if m in test]
    best, closest = max(merges, key=lambda m: test[m].mean()), min(merges, key=lambda m: dist[m].mean())
    pts = points(df)
    pts = pts[pts["method"].isin(merges)]
    verdict = dict(higher="higher", lower="lower",
                   tie="a tie: the mean difference is within the seeds' noise")
    return {
        "len": s.max_len, "val": s.n_val, "test": s.n_test, "fex": s.fisher_examples,
        "mex": s.mismatch_examples, "n0": s.sizes[0], "nmin": min(s.sizes[1:]), "nmax": max(s.sizes[1:]),
        "first": s.sources[0], "added": ", ".join(s.sources[1:]), "epochs": s.epochs,
        "alphas": ", ".join(f"{a:g}" for a in s.alphas),
        "deltas": ", ".join(f"{d:g}" for d in s.deltas), "seeds": int(df["seed"].nunique()),
        "k": K, "ratio": max(s.sizes) / min(s.sizes),
        "all": float(test["all-data model"].mean()), "base": float(test["theta_0"].mean()),
        **{f"acc-{m}": float(test[m].mean()) for m in merges},
        **{f"dist-{m}": float(dist[m].mean()) for m in merges},
        "best": method_label(best), "best-acc": float(test[best].mean()), "closest": method_label(closest),
        "best-vs-base": P.compare(test, best, "theta_0", **verdict),
        "all-vs-base": P.compare(test, "all-data model", "theta_0", **verdict),
        "best-vs-all": P.compare(test, best, "all-data model", **verdict),
        "gmta-test": P.paired(test["gradient_matching"], test["task_arithmetic"])["diff"],
        "gmta-test-verdict": P.compare(test, "gradient_matching", "task_arithmetic", **verdict),
        "gmta-distance": P.paired(dist["gradient_matching"], dist["task_arithmetic"])["diff"],
        "gmta-distance-verdict": P.compare(dist, "gradient_matching", "task_arithmetic", **verdict),
        "rho": float(pts[["mismatch", "error"]].rank().corr().iloc[0, 1]),
        "rho-dist": float(pts[["distance", "error"]].rank().corr().iloc[0, 1]),
    }
