"""LM benchmark, merging domains: the causal LM fine-tuned per text domain (embeddings frozen),
merged with every registered method over an alpha grid; perplexity per domain against the
individual models and the base. The table is cached as a whole.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import cache
from . import domains as D, pipeline as P
from .domains import LMSetup, prepare, setup  # noqa: F401  (the shared settings of both LM benchmarks)


def run(s: LMSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Multi-domain LM merging: one row per (study, method, alpha, domain) with the perplexity,
    the base's and the domain's own fine-tuned model's perplexity. Cached as a whole."""
    s = s or setup()
    rows = cache.cached("language-table", D.table_cfg(s, "lm-domains"), lambda: _run(s, progress))
    return pd.DataFrame(rows)


def _run(s: LMSetup, progress: bool) -> list[dict]:
    with D.quiet(s):
        fts = [D.finetune(s, d, progress) for d in s.domains]
        ev = D.Evaluator(s, s.domains)
        fs = [D.fisher(s, d, ft, f"ft-{d}") for d, ft in zip(s.domains, fts)]
        sizes = [float(D.domain_size(s, d)) for d in s.domains]
        rows: list[dict] = []

        def record(study, method, ppl, **extra):
            rows.extend({"study": study, "method": method, "domain": d, "perplexity": v, **extra}
                        for d, v in ppl.items())

        record("base", "base", ev())
        for d, ft in zip(s.domains, fts):
            record("individual", f"fine-tuned on {d}", ev(ft), trained_on=d)
        for m, a in tqdm(P.grid(s.alphas), desc="lm-domains merges", disable=not progress, leave=False):
            sd = P.merge(s, m, ev.base, fts, a, fishers=fs, sizes=sizes)
            record("merge", m.name, ev(sd), alpha=P.row_alpha(m, a),
                   delta=s.delta if "delta" in m.options else None)
    base_ppl = {r["domain"]: r["perplexity"] for r in rows if r["study"] == "base"}
    own = {r["trained_on"]: r["perplexity"] for r in rows if r.get("trained_on") == r["domain"]}
    cols = ["scale", "seed", "study", "method", "alpha", "delta", "domain", "perplexity", "base",
            "individual"]
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, base=base_ppl[r["domain"]], individual=own[r["domain"]])
    return [{c: r.get(c) for c in cols} for r in rows]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: the alpha with the lowest geometric-mean perplexity over the domains, that
    geometric mean, and its spread (max - min) over the alpha grid."""
    d = df[df["study"] == "merge"].fillna({"alpha": 1.0})
    best = P.best_alpha(d.assign(lp=np.log(d["perplexity"])), "lp", lower=True)
    return pd.DataFrame({"best_alpha": best["alpha"], "perplexity": np.exp(best["lp"]),
                         "spread_over_alpha": np.exp(best["lp"] + best["spread"]) - np.exp(best["lp"])})
