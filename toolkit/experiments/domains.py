"""The causal LM fine-tuned per text domain, shared by the lm-domains and lm-remove benchmarks:
settings, fine-tunes (embeddings frozen), token-level Fishers and perplexity per domain, all
cached by configuration. SmolLM2-135M at small and full, a random tiny Llama at tiny.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import pandas as pd
from torch import Tensor

from .. import cache, hub, text as T, tiny
from ..lm import finetune_lm, freeze, is_embedding, perplexity
from ..merge import METHODS
from ..scale import pick
from ..train import trainable
from . import pipeline as P

StateDict = Mapping[str, Tensor]
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True, kw_only=True)
class LMSetup(P.Setup):
    """Every number of the two language-model experiments."""
    model: str
    domains: tuple[str, ...]     # the domains that are merged (and kept, in lm-remove)
    remove: str                  # the domain that is removed
    n_train: int                 # N_t per domain
    n_test: int
    max_len: int
    batch_size: int
    steps: int
    lr: float
    freeze_embeddings: bool      # embeddings (and a tied LM head) stay at theta_0: memory and time
    fisher_examples: int         # sequences per Fisher (token-level MC, one sample per token)
    removal_alphas: tuple[float, ...]
    base_sizes: tuple[float, ...]  # N_0 multiples of N_r for H_0 = delta + N_0 F_0 (removal)
    removal_methods: tuple[str, ...] = ("task_arithmetic", "gradient_matching")  # subtract tau_r


def setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> LMSetup:
    """LM experiments at a scale: tiny (random Llama), small (SmolLM2-135M, CPU), full (GPU)."""
    scale = P.check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = LMSetup(
        scale=scale, seed=seed, model=p("tiny-llama", SMOLLM, SMOLLM),
        domains=("news", "code", "tweets"), remove="spam",
        n_train=p(16, 120, 4000), n_test=p(8, 16, 200), max_len=p(32, 64, 256), batch_size=p(8, 8, 16),
        steps=p(2, 15, 250), lr=p(1e-3, 2e-4, 5e-5), freeze_embeddings=True, fisher_examples=p(8, 16, 256),
        alphas=p((0.5, 1.0), (0.5, 1.0), (0.3, 0.5, 0.7, 1.0)), delta=p(1e-4, 1e-4, 1e-4),
        removal_alphas=p((-0.5, -1.0), (-0.25, -0.5, -1.0, -1.5), (-0.25, -0.5, -0.75, -1.0, -1.5, -2.0)),
        base_sizes=p((3.0,), (3.0, 30.0), (1.0, 3.0, 30.0)), device=P.default_device())
    return replace(s, **overrides)


def quiet(s: LMSetup):
    """hub.quiet with one thread at tiny scale (tests), the machine's threads otherwise."""
    return hub.quiet(1 if s.scale == "tiny" else None)


def load(s: LMSetup):
    """theta_0: a fresh copy of the pretrained LM (embeddings frozen when the setup says so)."""
    model, tok = hub.pretrained("causal_lm", tiny.model_name(s.model), 0, s.seed)
    model.to(s.device).eval()
    if s.freeze_embeddings:
        freeze(model, is_embedding)
    return model, tok


def batches(s: LMSetup, tok, domain: str, split: str, n: int) -> list:
    data = T.load_domain(domain, split, n, n_test=s.n_test, seed=s.seed)
    return [P.to_device(b, s.device)
            for b in T.lm_batches(tok, data, batch_size=s.batch_size, max_len=s.max_len)]


def _cfg(s: LMSetup, domain: str) -> dict:
    data = (T.load_domain(domain, "train", s.n_train, n_test=s.n_test, seed=s.seed).fingerprint()
            if domain else None)
    return {"model": s.model, "domain": domain, "data": data, "steps": s.steps, "lr": s.lr,
            "bs": s.batch_size, "len": s.max_len, "freeze": s.freeze_embeddings, "seed": s.seed}


def table_cfg(s: LMSetup, exp: str) -> dict:
    """The cache key of a result table: the whole setup, the data and the registered methods."""
    domains = s.domains if exp == "lm-domains" else (s.remove, *s.domains)
    data = [T.load_domain(d, sp, n, n_test=s.n_test, seed=s.seed).fingerprint()
            for d in domains for sp, n in (("train", s.n_train), ("test", s.n_test))]
    return {"exp": exp, **asdict(s), "data": data, "methods": list(METHODS)}


def domain_size(s: LMSetup, domain: str) -> int:
    """N_t: the training texts of a domain actually available (at most s.n_train)."""
    return len(T.load_domain(domain, "train", s.n_train, n_test=s.n_test, seed=s.seed))


def finetune(s: LMSetup, domain: str, progress: bool = True) -> dict[str, Tensor]:
    """theta_t: the trainable part of the LM after `steps` AdamW steps on one domain (cached)."""
    def compute():
        model, tok = load(s)
        finetune_lm(model, batches(s, tok, domain, "train", s.n_train), steps=s.steps, lr=s.lr,
                    progress=progress, desc=f"fine-tune {domain}")
        return trainable(model)
    return cache.cached("language-ft", {"exp": "lm", **_cfg(s, domain)}, compute)


def fisher(s: LMSetup, domain: str | Sequence[str], params: StateDict | None, at: str) -> dict[str, Tensor]:
    """Token-level MC Fisher (per-sequence mean, fp32 accumulation per tensor) of the trainable
    parameters at `params` (None: theta_0) on the training texts of `domain` (or several, mixed)."""
    from ..curvature import fisher as estimate
    domains = [domain] if isinstance(domain, str) else list(domain)
    cfg = {"exp": "lm", "at": at, "domains": domains, "examples": s.fisher_examples,
           "data": [_cfg(s, d)["data"] for d in domains],
           **{k: v for k, v in _cfg(s, "").items() if k not in ("domain", "data")}}

    def compute():
        model, tok = load(s)
        if params is not None:
            model.load_state_dict(params, strict=False)
        per = math.ceil(s.fisher_examples / len(domains))
        bs = [b for d in domains for b in batches(s, tok, d, "train", per)]
        f = estimate(model, bs, "mc", task="causal_lm", seed=s.seed, progress=False,
                     max_examples=s.fisher_examples)
        return {k: v.cpu() for k, v in f.items()}
    return cache.cached("language-fisher", cfg, compute)


def domain_fisher(s: LMSetup, domain: str, progress: bool = True) -> dict[str, Tensor]:
    """F_t of the model fine-tuned on `domain`, at theta_t."""
    return fisher(s, domain, finetune(s, domain, progress), f"ft-{domain}")


def kept_fisher(s: LMSetup) -> dict[str, Tensor]:
    """F_0: the base model's Fisher on the kept domains (the prior of removal)."""
    return fisher(s, s.domains, None, "base-kept")


class Evaluator:
    """Perplexity of the LM with a given trainable part on each domain's test texts."""

    def __init__(self, s: LMSetup, domains: Sequence[str]):
        self.model, tok = load(s)
        self.base = trainable(self.model)
        self.tests = {d: batches(s, tok, d, "test", s.n_test) for d in domains}

    def __call__(self, params: StateDict | None = None) -> dict[str, float]:
        self.model.load_state_dict(self.base if params is None else params, strict=False)
        return {d: perplexity(self.model, b) for d, b in self.tests.items()}


def prepare(s: LMSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune the LM on every domain (and the one to remove) and estimate the Fishers (cached):
    the slow half of both LM benchmarks."""
    s = s or setup()
    if P.table_cached(table_cfg(s, "lm-domains")) and P.table_cached(table_cfg(s, "lm-remove")):
        return
    with quiet(s):
        for d in (*s.domains, s.remove):
            domain_fisher(s, d, progress)
        kept_fisher(s)


def fisher_totals(s: LMSetup) -> pd.DataFrame:
    """Per domain: summed Fisher of its fine-tuned model (one example = one sequence), the mean
    number of predicted tokens per sequence, and their ratio. With token-level Fishers summed over
    a sequence, domains of short texts get a smaller F_t per example, hence less weight."""
    rows = []
    with quiet(s):
        for d in s.domains:
            f = domain_fisher(s, d, progress=False)
            total = sum(float(v.double().sum()) for v in f.values())
            del f
            _, tok = hub.pretrained("causal_lm", tiny.model_name(s.model), 0, s.seed)
            data = T.load_domain(d, "train", s.fisher_examples, n_test=s.n_test, seed=s.seed)
            bs = T.lm_batches(tok, data, batch_size=s.batch_size, max_len=s.max_len)
            seqs = sum(len(b[0]["input_ids"]) for b in bs)
            tokens = sum(int((b[0]["attention_mask"].sum(1) - 1).clamp_min(0).sum()) for b in bs) / seqs
            rows.append({"domain": d, "sum F (per sequence)": total, "tokens per sequence": tokens,
                         "sum F per token": total / tokens})
    return pd.DataFrame(rows).set_index("domain")
