"""LM benchmark, merging domains: the causal LM fine-tuned per text domain (embeddings frozen),
merged with every registered method, alpha chosen on a validation split, perplexity per domain
on the test split against the individual models and the base. Fisher-weighted methods run with
both normalisations of the Fisher (`per`): per sequence (N_t in texts) and per token (N_t in
tokens). The table is cached as a whole.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import cache
from ..merge import METHODS
from . import domains as D, pipeline as P
from .domains import LMSetup, prepare, setup  # noqa: F401  (the shared settings of both LM benchmarks)


def run(s: LMSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Multi-domain LM merging: one row per (study, method, alpha, domain) with the perplexity,
    the base's and the domain's own fine-tuned model's perplexity. Cached as a whole."""
    s = s or setup()
    rows = cache.cached("language-table", D.table_cfg(s, "lm-domains"), lambda: _run(s, progress))
    return pd.DataFrame(rows)


def label(method: str, per: str | None) -> str:
    """The row label of a merge: the method, with ' (per token)' for a per-token Fisher."""
    return f"{method} (per token)" if per == "token" else method


def _run(s: LMSetup, progress: bool) -> list[dict]:
    with D.quiet(s):
        fts = [D.finetune(s, d, progress) for d in s.domains]
        ev = D.Evaluator(s, s.domains, ("val", "test"))
        fs = {per: [D.fisher(s, d, ft, f"ft-{d}", per) for d, ft in zip(s.domains, fts)] for per in s.fisher_pers}
        sizes = {per: [float(D.domain_size(s, d, per)) for d in s.domains] for per in s.fisher_pers}
        rows: list[dict] = []

        def record(study, method, ppl, **extra):
            rows.extend({"study": study, "method": method, "domain": d, "perplexity": v, **extra}
                        for d, v in ppl.items())

        record("base", "base", ev())
        for d, ft in zip(s.domains, fts):  # each on its own domain
            record("individual", f"fine-tuned on {d}", ev(ft, domains=[d]), trained_on=d)
        jobs = [(m, a, per) for m, a in P.grid(s.alphas) for per in (s.fisher_pers if m.uses_fisher else [None])]
        chosen: dict[str, tuple[float, tuple]] = {}
        for m, a, per in tqdm(jobs, desc="lm-domains merges", disable=not progress, leave=False):
            if m.alpha_cancels:  # one grid point: nothing to choose on validation
                chosen[label(m.name, per)] = (np.nan, (m, a, per))
                continue
            stats = {"fishers": fs[per], "sizes": sizes[per]} if per else {}
            ppl = ev(P.merge(s, m, ev.base, fts, a, **stats), "val")
            record("grid", m.name, ppl, alpha=P.row_alpha(m, a), per=per, split="val",
                   delta=s.delta if "delta" in m.options else None)
            score = float(np.mean(np.log(list(ppl.values()))))
            if score < chosen.get(label(m.name, per), (np.inf,))[0]:
                chosen[label(m.name, per)] = (score, (m, a, per))
        for _, (m, a, per) in chosen.values():  # alpha chosen on validation, reported on test
            stats = {"fishers": fs[per], "sizes": sizes[per]} if per else {}
            record("merge", m.name, ev(P.merge(s, m, ev.base, fts, a, **stats)), alpha=P.row_alpha(m, a),
                   per=per, delta=s.delta if "delta" in m.options else None)
    base_ppl = {r["domain"]: r["perplexity"] for r in rows if r["study"] == "base"}
    own = {r["trained_on"]: r["perplexity"] for r in rows if r.get("trained_on") == r["domain"]}
    cols = ["scale", "seed", "study", "method", "per", "alpha", "delta", "split", "domain", "perplexity", "base",
            "individual"]
    for r in rows:
        r.setdefault("split", "test")
        r.update(scale=s.scale, seed=s.seed, base=base_ppl[r["domain"]], individual=own[r["domain"]])
    return [{c: r.get(c) for c in cols} for r in rows]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per merge (method, Fisher normalisation): the alpha chosen on validation and the test
    perplexity per domain and as a geometric mean over the domains."""
    d = df[df["study"] == "merge"].copy()
    d["merge"] = [label(m, p) for m, p in zip(d["method"], d["per"])]
    tab = d.pivot_table(index="merge", columns="domain", values="perplexity", sort=False)
    tab["geometric mean"] = np.exp(np.log(tab).mean(axis=1))
    tab.insert(0, "alpha", d.groupby("merge", sort=False)["alpha"].first())
    return tab


def _display(merge: str) -> str:
    """A merge's row label in words: the method's label, with ' (per token)' kept."""
    from ..plots import method_label
    method, per_token = merge.removesuffix(" (per token)"), merge.endswith(" (per token)")
    return method_label(method) + (" (per token)" if per_token else "")


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The chapter's table: test perplexity per domain and geometric mean of the base, the
    domains' own fine-tuned models and every chosen merge, with the alpha chosen on validation."""
    test = df[df["split"] == "test"]
    base = test[test["study"] == "base"].set_index("domain")
    ref = pd.DataFrame({"base": base["perplexity"], "own fine-tuned model": base["individual"]}).T
    ref["geometric mean"] = np.exp(np.log(ref).mean(axis=1))
    merges = summary(df)
    out = pd.concat([ref, merges.drop(columns="alpha")])
    out.insert(0, "alpha (validation)", pd.concat([pd.Series(np.nan, index=ref.index), merges["alpha"]]))
    return out


def quotes(s: LMSetup, df: pd.DataFrame, totals: pd.DataFrame) -> dict[str, Any]:
    """Every number and verdict the chapter quotes about merging LM domains (keys without the
    chapter's prefix); `totals` is `domains.fisher_totals(s)`. Verdicts by the one tie rule over
    seeds (`pipeline.compare`; one seed: no verdict)."""
    tab = table(df)
    gmean = tab["geometric mean"]
    d = df[df["study"] == "merge"]
    seeds = P.by_seed(d.assign(merge=[label(m, p) for m, p in zip(d["method"], d["per"])],
                               log_ppl=np.log(d["perplexity"])), "log_ppl", key="merge")
    lengths = totals["tokens per sequence"]
    short = lengths.idxmin()
    gm, gm_tok = "gradient_matching", label("gradient_matching", "token")
    lower = dict(higher="higher", lower="lower", tie="a tie")
    return {
        "steps": s.steps, "bs": s.batch_size, "n": s.n_train, "len": s.max_len, "fex": s.fisher_examples,
        "ftok": s.fisher_tokens, "top": s.top_layers, "delta": s.delta, "val": s.n_val, "test": s.n_test,
        "seeds": int(df["seed"].nunique()),
        **{f"base-{dom}": float(tab.loc["base", dom]) for dom in s.domains},
        **{f"own-{dom}": float(tab.loc["own fine-tuned model", dom]) for dom in s.domains},
        "base-gm": float(gmean["base"]), "own-gm": float(gmean["own fine-tuned model"]),
        "winner": _display(gmean.iloc[2:].idxmin()), "winner-gm": float(gmean.iloc[2:].min()),
        **{f"gm-{m}": float(gmean[m]) for m in summary(df).index if m in METHODS},
        **{f"gm-{m}-tok": float(gmean[label(m, "token")]) for m in METHODS if label(m, "token") in gmean},
        "gm-ta-verdict": P.compare(seeds, gm, "task_arithmetic", **lower),
        "seq-tok-verdict": P.compare(seeds, gm, gm_tok, **lower),
        "short": short, "short-seq": float(tab.loc[gm, short]), "short-tok": float(tab.loc[gm_tok, short]),
        "short-ta": float(tab.loc["task_arithmetic", short]),
        "short-len": float(lengths[short]), "long-len": float(lengths.max()),
        "short-share-seq": float(totals.loc[short, "share of sum H (sequence)"]),
        "short-share-tok": float(totals.loc[short, "share of sum H (token)"]),
    }
