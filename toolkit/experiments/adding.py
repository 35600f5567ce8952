"""The paper's own setting (its Figure 1) in vision: adding data sets to ONE model.

One 10-class digit task with one shared head, fed by sources of very different size (upright
MNIST, the 8x8 digits upsampled, rotated MNIST, inverted MNIST, inverted digits). theta_0 is
the pretrained ViT fitted to the first source; every added source t is fine-tuned from theta_0
on its own data with the prior (delta / 2) ||theta - theta_0||^2 on the summed loss; the merges
of the first k added models are compared with the target, the model trained from theta_0 on the
first k + 1 sources at once (same prior, same passes over every example):

    python -m toolkit.experiments adding --scale small --seed 0 --out results/adding.csv

For every k of `ks` (Figure 1's markers) and every method: test accuracy, ||theta - theta_{0:k}||
(distance to the all-data parameters) and ||m(theta)||, m(theta) = sum_{t=0..k} [grad lbar_t(theta)
- grad lbar_t(theta_t)] (toolkit.mismatch; at the all-data model it equals
H_0 (theta_TA - theta_{0:k}), so it is not zero there either). Knobs (alpha) are chosen on
validation examples carved from the sources' training data; only the chosen merge is evaluated
on the test split. `sources` checks the two assumptions behind gradient matching on the cached
models: is each theta_t stationary for its objective, and does H_t (theta - theta_t) predict the
change of its gradient at the merge?
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import pandas as pd
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from .. import cache, vision as V
from ..errors import MergeError
from ..mismatch import gradient_mismatch, total_norm
from ..scale import pick
from . import pipeline as P
from . import vision as VB

StateDict = Mapping[str, Tensor]

# the first source is theta_0's data; the others are added, largest first (N_t span ~30x)
SOURCES = (
    (V.Task("mnist", "mnist", pool=(3, 4, 5), pools=8), None),
    (V.Task("digits", "digits", "upsample", pool=(1, 2), pools=4), None),
    (V.Task("rot_mnist", "mnist", "rot90", pool=(6,), pools=8), 320),
    (V.Task("inv_mnist", "mnist", "invert", pool=(7,), pools=8), 120),
    (V.Task("inv_digits", "digits", "upsample_invert", pool=(3,), pools=4), 40),
)


# the alpha grid at small: far past the target's own alpha_t = 1, because gradient matching's
# validation accuracy keeps rising past it and then stays nearly flat (chapter 5)
ALPHAS = (0.25, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0)
LIMIT = 1e6  # gradient matching's alpha -> infinity: theta_0 + (sum H_t)^-1 sum (H_0 + H_t) tau_t


@dataclass(frozen=True, kw_only=True)
class AddingSetup(P.Setup):
    """Every number the data-adding experiment depends on (cache keys hash parts of it);
    delta is the prior of every fine-tune and target, H_0 = delta I (+ N_0 F_0 where a method takes it)."""
    suite: VB.VisionSetup        # the multi-task setup whose pretrained backbone starts everything
    sources: tuple[tuple[V.Task, int | None], ...]  # (source, cap on its training examples)
    epochs: float                # passes over each example, for fine-tunes and targets alike
    lr: float
    fisher_examples: int
    mismatch_examples: int       # examples per source for the gradients of the mismatch
    ks: tuple[int, ...]          # numbers of added sets compared (Figure 1's markers): the
                                 # first k added sources merged, against their all-data target


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> AddingSetup:
    """The data-adding experiment at a scale (tiny: seconds; small: a minute per seed on 2 cores)."""
    scale = P.check_scale(scale)
    if scale == "full":
        raise MergeError("the data-adding experiment runs at tiny and small scale only")
    p = lambda tiny, small: pick(tiny, small, None, scale)  # noqa: E731
    sources = SOURCES if scale == "small" else tuple((t, 48 if n is None else max(16, n // 8))
                                                     for t, n in SOURCES[:3])
    s = AddingSetup(scale=scale, seed=seed, suite=VB.setup(scale, seed=0), sources=sources,
                    epochs=p(2, 3), lr=p(1e-3, 3e-4), delta=1.0, fisher_examples=p(32, 256),
                    mismatch_examples=p(32, 128), ks=p((1, 2), (1, 2, 4)),
                    alphas=p((0.5, 1.0), ALPHAS), device=P.default_device())
    s = replace(s, **overrides)
    if not s.ks or any(not 1 <= k < len(s.sources) for k in s.ks) or list(s.ks) != sorted(set(s.ks)):
        raise MergeError(f"ks must be increasing numbers of added sets in 1..{len(s.sources) - 1}, "
                         f"got {s.ks}")
    return s


def _steps(s: AddingSetup, n: int) -> int:
    return max(1, math.ceil(s.epochs * n / s.suite.batch_size))


def _model(s: AddingSetup, sd: StateDict) -> V.TaskModel:
    m = V.TaskModel(V.make_backbone(s.suite.vit), V.make_head(s.suite.vit, 10))
    m.load_state_dict(sd)
    return m.eval()


def _train(s: AddingSetup, start: StateDict, data: Dataset, tag: str, cfg: dict) -> dict[str, Tensor]:
    """The whole model (backbone and the shared head) trained from `start` on `data` with the
    prior delta / (2 N) ||theta - theta_0||^2 per example, cached by `cfg`."""
    def compute():
        m = _model(s, start)
        prior = {k: v.clone() for k, v in start.items()}
        V.fit(m, [nn.Identity()], [data], steps=_steps(s, len(data)), batch_size=s.suite.batch_size,
              lr=s.lr, seed=s.seed, prior=prior, prior_precision=s.delta / len(data),
              device=s.suite.device, progress=False, desc=tag)
        return {k: v.cpu() for k, v in m.state_dict().items()}
    return cache.cached("adding-model", cfg, compute)


def _splits(s: AddingSetup) -> tuple[list, list, list]:
    """(train, validation, test) data sets of every source."""
    splits = [V.task_splits(t, s.scale, n_train=n, seed=s.seed) for t, n in s.sources]
    return tuple([sp[i] for sp in splits] for i in range(3))


def theta0(s: AddingSetup) -> tuple[dict[str, Tensor], dict]:
    """theta_0 (the pretrained backbone fitted to the first source: probe, then fine-tune; the
    same for every seed) and the cache key that every model trained from it extends."""
    trains = _splits(s)[0]
    backbone, bcfg = VB.base_backbone(s.suite, progress=False)
    key = {"base": bcfg, "sources": V.config_dict([t for t, _ in s.sources]),
           "n": [len(t) for t in trains], "epochs": s.epochs, "lr": s.lr, "delta": s.delta}

    def compute():
        bb = V.make_backbone(s.suite.vit)
        bb.load_state_dict(backbone)
        head = V.linear_probe(bb, V.make_head(s.suite.vit, 10), trains[0], device=s.suite.device)
        V.fit(bb, [head], [trains[0]], steps=_steps(s, len(trains[0])), batch_size=s.suite.batch_size,
              lr=s.lr, head_lr=10 * s.lr, seed=0, device=s.suite.device, progress=False)
        return {k: v.cpu() for k, v in V.TaskModel(bb, head).state_dict().items()}
    with V.fast_cpu():
        return cache.cached("adding-base", key, compute), key


def artifacts(s: AddingSetup) -> dict[str, Any]:
    """Data, theta_0, the fine-tuned models, their Fishers and the all-data targets (cached)."""
    from ..curvature import fisher
    trains, vals, tests = _splits(s)
    base, key = theta0(s)
    with V.fast_cpu():
        models = [base] + [_train(s, base, tr, f"add {t.name}", {**key, "source": i, "seed": s.seed})
                           for i, ((t, _), tr) in enumerate(zip(s.sources, trains)) if i > 0]
        targets = {k: _train(s, base, ConcatDataset(trains[:k + 1]), f"all-data {k}",
                             {**key, "target": k, "seed": s.seed}) for k in s.ks}

        def fisher_of(i):  # a plain dict: the cache loads with weights_only=True
            loader = V.loader(trains[i], s.suite.batch_size)
            return dict(fisher(_model(s, models[i]), loader, "mc", seed=s.seed, progress=False,
                               max_examples=s.fisher_examples))
        fishers = [cache.cached("adding-fisher", {**key, "source": i, "seed": s.seed,
                                                  "examples": s.fisher_examples}, lambda i=i: fisher_of(i))
                   for i in range(len(trains))]
    return {"names": [t.name for t, _ in s.sources], "trains": trains, "vals": vals, "tests": tests,
            "sizes": [float(len(t)) for t in trains], "base": base, "models": models,
            "fishers": fishers, "targets": targets}


def merge(s: AddingSetup, A: Mapping[str, Any], m: P.Method, k: int, alpha: float) -> dict[str, Tensor]:
    """theta_0 merged with the first k added models. A method in which a common alpha cancels
    (an average of models) averages theta_0 in as one more model, with N_0 and F_0; the others
    add the k task vectors to theta_0 and get H_0 = delta + N_0 F_0 where they take it."""
    fis, ns = A["fishers"][:k + 1], A["sizes"][:k + 1]
    if m.alpha_cancels:
        return P.merge(s, m, A["base"], A["models"][:k + 1], alpha, fishers=fis, sizes=ns)
    return P.merge(s, m, A["base"], A["models"][1:k + 1], alpha, fishers=fis[1:], sizes=ns[1:],
                   base_fisher=fis[0], base_size=ns[0])


def _accuracy(s: AddingSetup, sd: StateDict, data: Sequence[Dataset]) -> float:
    return V.accuracy(_model(s, sd), ConcatDataset(list(data)), device=s.suite.device)


def _gradient(s: AddingSetup, sd: StateDict, data: Dataset) -> dict[str, Tensor]:
    """grad of the SUMMED loss lbar over `data`, from its first mismatch_examples examples x N / n."""
    from ..train import loss_gradient
    n = min(len(data), s.mismatch_examples)
    g = loss_gradient(_model(s, sd), V.eval_batches(Subset(data, range(n)), s.suite.batch_size))
    return {k: v * (len(data) / n) for k, v in g.items()}


def distance(a: StateDict, b: StateDict) -> float:
    """||a - b||_2 over all tensors."""
    return total_norm({k: a[k].double() - b[k].double() for k in a})


def _dot(a: StateDict, b: StateDict) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def taylor(moved: StateDict, at_own: StateDict, precision: StateDict, theta: StateDict,
           own: StateDict) -> dict[str, float]:
    """How well the first-order step behind gradient matching, grad lbar_t(theta) ~
    grad lbar_t(theta_t) + H_t (theta - theta_t) with H_t = N_t F_t, predicts the measured change
    d = grad lbar_t(theta) - grad lbar_t(theta_t): the cosine between d and the prediction, and
    the ratio of their norms (1 and 1 where the quadratic picture holds)."""
    d = {k: moved[k].double() - at_own[k].double() for k in moved}
    pred = {k: precision[k].double() * (theta[k].double() - own[k].double()) for k in moved}
    nd, npred = total_norm(d), total_norm(pred)
    return {"taylor_cos": _dot(d, pred) / (nd * npred) if nd * npred > 0 else math.nan,
            "taylor_ratio": npred / nd if nd > 0 else math.nan}


def run(s: AddingSetup | None = None, progress: bool = False) -> pd.DataFrame:
    """One row per (added sets k, method): the validation-chosen alpha, test accuracy, accuracy
    of the all-data target, distance to it and gradient mismatch; plus rows for the target."""
    s = s or setup()
    df = pd.DataFrame(_tables(s)["rows"])
    df.insert(0, "seed", s.seed)
    names = [t.name for t, _ in s.sources]
    df["added"] = ["+".join(names[1:r + 1]) for r in df["k"]]
    df["error"] = 1.0 - df["accuracy"]
    for c in ("alpha", "val_accuracy"):
        df[c] = pd.to_numeric(df[c]).astype(float)
    return df


def _part(s: AddingSetup | None, part: str) -> pd.DataFrame:
    s = s or setup()
    df = pd.DataFrame(_tables(s)[part])
    df.insert(0, "seed", s.seed)
    return df


def sources(s: AddingSetup | None = None) -> pd.DataFrame:
    """One row per source t: N_t; `stationarity`, ||grad lbar_t(theta_t) + delta tau_t|| /
    ||grad lbar_t(theta_0)|| (0: theta_t minimises its objective lbar_t + delta/2 ||theta -
    theta_0||^2, as the derivation assumes; 1: no progress from theta_0; not defined for theta_0's
    own source), the norms of the gradient left and of the prior's pull delta tau_t, and `taylor`
    at the chosen gradient-matching merge of all sources (largest k)."""
    return _part(s, "sources")


def curves(s: AddingSetup | None = None) -> pd.DataFrame:
    """Validation accuracy at every point of every method's alpha grid, per k (the curves the
    alphas of `run` are chosen on), and gradient matching's limit alpha -> infinity (alpha inf)
    after all sets."""
    return _part(s, "curves")


def _tables(s: AddingSetup) -> dict[str, list[dict]]:
    """The rows of `run`, `sources` and `curves`, computed together (evaluations and gradients:
    a minute per seed) and cached by the setup; the models are loaded only to compute them."""
    key = {"setup": V.config_dict(s), "methods": {m.name: m.defaults for m in P.methods()}}
    return cache.cached("adding-table", key, lambda: _rows(s, artifacts(s)))


def _rows(s: AddingSetup, A: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Per k: every method's alpha grid on validation (methods in which a common alpha cancels
    have one point, so no validation run), the chosen merge on test, its distance to the all-data
    target and its mismatch; the per-source diagnostics of `sources`."""
    models, trains, sizes = A["models"], A["trains"], A["sizes"]
    with V.fast_cpu():
        at_own = [_gradient(s, m, tr) for m, tr in zip(models, trains)]
        at_start = [None] + [_gradient(s, A["base"], tr) for tr in trains[1:]]  # fine-tunes' start
        rows, curve, near = [], [], {}
        for k in s.ks:
            target, vals, tests = A["targets"][k], A["vals"][:k + 1], A["tests"][:k + 1]
            for method in P.methods():
                grid = method.grid(s.alphas)
                val = ({a: _accuracy(s, merge(s, A, method, k, a), vals) for a in grid}
                       if len(grid) > 1 else {grid[0]: math.nan})
                alpha = max(grid, key=lambda a: (val[a], -abs(a - 1.0)))  # ties: nearest the target's 1
                curve += [{"k": k, "method": method.name, "alpha": a, "val_accuracy": v}
                          for a, v in val.items() if len(grid) > 1]
                merged = merge(s, A, method, k, alpha)
                at = [_gradient(s, merged, tr) for tr in trains[:k + 1]]
                rows.append({"k": k, "method": method.name, "alpha": P.row_alpha(method, alpha),
                             "val_accuracy": val[alpha], "accuracy": _accuracy(s, merged, tests),
                             "distance": distance(merged, target),
                             "mismatch": total_norm(gradient_mismatch(at, at_own[:k + 1]))})
                if method.name == "gradient_matching" and k == s.ks[-1]:
                    curve.append({"k": k, "method": method.name, "alpha": math.inf,
                                  "val_accuracy": _accuracy(s, merge(s, A, method, k, LIMIT), vals)})
                    near = {t: taylor(at[t], at_own[t], {q: sizes[t] * f for q, f in A["fishers"][t].items()},
                                      merged, models[t]) for t in range(k + 1)}
            at = [_gradient(s, target, tr) for tr in trains[:k + 1]]
            rows.append({"k": k, "method": "all_data", "alpha": None, "val_accuracy": math.nan,
                         "accuracy": _accuracy(s, target, tests), "distance": 0.0,
                         "mismatch": total_norm(gradient_mismatch(at, at_own[:k + 1]))})
    out = []
    for t, name in enumerate(A["names"]):
        tau = {q: models[t][q].double() - A["base"][q].double() for q in A["base"]}
        resid = total_norm({q: at_own[t][q].double() + s.delta * tau[q] for q in tau})
        out.append({"source": name, "n": sizes[t],
                    "stationarity": resid / total_norm(at_start[t]) if t > 0 else math.nan,
                    "gradient": total_norm(at_own[t]), "prior_force": s.delta * total_norm(tau),
                    **near.get(t, {"taylor_cos": math.nan, "taylor_ratio": math.nan})})
    return {"rows": rows, "sources": out, "curves": curve}


def seed_jobs(seeds: Sequence[int], scale: str | None = None, **overrides: Any) -> list[tuple]:
    """One job per seed for `pipeline.parallel` (`run` of its setup), made after theta_0, which
    every seed shares."""
    setups = [setup(scale, seed, **overrides) for seed in seeds]
    theta0(setups[0])
    return [(run, (s,)) for s in setups]


def run_seeds(seeds: Sequence[int], scale: str | None = None, workers: int | None = None,
              **overrides: Any) -> pd.DataFrame:
    """`run` for every seed, side by side on the machine's cores (`pipeline.parallel`): one
    table (the seed column tells them apart)."""
    return P.tables(seed_jobs(seeds, scale, **overrides), workers=workers)[0]


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and number of added sets k: mean and standard deviation over seeds of test
    error, distance to the all-data model and mismatch (the markers of the paper's Figure 1)."""
    out = df.groupby(["method", "k"], sort=False)[["error", "distance", "mismatch"]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    return out.reset_index()


def summary(df: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
    """Per method at k added sets (default: all): mean and standard deviation over seeds of test
    accuracy, distance to the all-data model and mismatch, and the alphas chosen."""
    k = int(df["k"].max()) if k is None else k
    d = df[df["k"] == k]
    g = d.groupby("method", sort=False)
    out = g[["accuracy", "distance", "mismatch"]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["alphas"] = g["alpha"].apply(lambda a: ",".join("-" if math.isnan(x) else f"{x:g}" for x in a))
    return out.sort_values("accuracy_mean", ascending=False)


def source_table(sources_df: pd.DataFrame) -> pd.DataFrame:
    """`sources` of several seeds: per source, N_t and the mean and standard deviation over seeds
    of the stationarity and Taylor diagnostics."""
    cols = ["stationarity", "gradient", "prior_force", "taylor_cos", "taylor_ratio"]
    g = sources_df.groupby("source", sort=False)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out.insert(0, "n", g["n"].first().astype(int))
    return out
