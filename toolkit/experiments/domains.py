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
from ..lm import Skip, TopLM, finetune_lm, freeze, hidden_below, is_embedding, perplexity, with_hidden
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
    n_val: int                   # validation sequences per domain: lm-domains picks alpha there
    n_test: int
    max_len: int
    batch_size: int
    steps: int
    lr: float
    freeze_embeddings: bool      # embeddings (and a tied LM head) stay at theta_0: memory and time
    top_layers: int | None       # only the top layers are fine-tuned and merged (None: every layer)
    fisher_examples: int         # sequences per Fisher (token-level MC, one sample per token)
    fisher_tokens: int | None    # per-token Fisher: tokens drawn per sequence (None: every token)
    fisher_pers: tuple[str, ...] = ("sequence", "token")  # what one example of F_t and N_t is
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
        n_train=p(16, 32, 4000), n_val=p(4, 6, 100), n_test=p(8, 12, 200), max_len=p(32, 32, 256),
        batch_size=p(8, 8, 16), steps=p(2, 8, 250), lr=p(1e-3, 1e-3, 5e-5), freeze_embeddings=True,
        top_layers=p(1, 2, None), fisher_examples=p(8, 16, 256), fisher_tokens=p(4, 2, 32),
        alphas=p((0.5, 1.0), (0.5, 1.0), (0.3, 0.5, 0.7, 1.0)), delta=p(1e-4, 1e-4, 1e-4),
        removal_alphas=p((-0.5, -1.0), (-0.5, -1.0, -2.0), (-0.25, -0.5, -0.75, -1.0, -1.5, -2.0)),
        base_sizes=p((3.0,), (3.0, 30.0), (1.0, 3.0, 30.0)), device=P.default_device())
    return replace(s, **overrides)


def quiet(s: LMSetup):
    """hub.quiet with one thread at tiny scale (tests), the machine's threads otherwise."""
    return hub.quiet(1 if s.scale == "tiny" else None)


def load(s: LMSetup):
    """theta_0: a fresh copy of the pretrained LM (embeddings frozen when the setup says so); with
    `top_layers`, a `TopLM`: the top layers fed with the hidden states below them (`batches`)."""
    name = tiny.model_name(s.model)
    n = hub.pristine("causal_lm", name, 0, s.seed)[0].config.num_hidden_layers
    low = n - s.top_layers if s.top_layers else 0
    # the skipped layers are never copied, the frozen embedding (and tied head) is shared
    share = ["model.embed_tokens.weight"] if s.freeze_embeddings and s.device == "cpu" else []
    model, tok = hub.pretrained("causal_lm", name, 0, s.seed,
                                replace={f"model.layers.{i}": Skip() for i in range(low)}, share=share)
    model.to(s.device).eval()
    below = tuple(f"model.layers.{i}." for i in range(low))
    freeze(model, lambda k: (s.freeze_embeddings and is_embedding(k)) or k.startswith(below))
    return (TopLM(model, s.top_layers).eval() if s.top_layers else model), tok


_HIDDEN: dict[tuple, dict[str, Tensor]] = {}  # (model, top, max_len) -> {text: hidden states}


def texts(s: LMSetup) -> list[str]:
    """Every text the two LM experiments read: training texts of every domain, validation texts
    of the merged domains, test texts of all."""
    out = [t for d in (*s.domains, s.remove) for t in data(s, d, "train").texts + data(s, d, "test").texts]
    return out + [t for d in s.domains for t in data(s, d, "val").texts]


def hidden(s: LMSetup, texts_: Sequence[str]) -> list[Tensor]:
    """Per text, the hidden states entering the top `top_layers` layers at theta_0 (the frozen
    lower layers), each computed once per process; the first call computes those of every text of
    `texts(s)` too (one pass of the lower layers)."""
    memo = _HIDDEN.setdefault((s.model, s.top_layers, s.max_len), {})
    todo = list(dict.fromkeys(t for t in texts_ if t not in memo))
    if todo:
        todo = list(dict.fromkeys(todo + [t for t in texts(s) if t not in memo]))
        lm, tok = hub.pretrained("causal_lm", tiny.model_name(s.model), 0, s.seed)
        memo.update(zip(todo, hidden_below(lm, s.top_layers, tok, todo, s.max_len)))
    return [memo[t] for t in texts_]


def forget() -> None:
    """Drop the hidden states held in memory."""
    _HIDDEN.clear()


def data(s: LMSetup, domain: str, split: str, n: int | None = None) -> T.TextSet:
    """A domain's texts: `n` (default: all of the split) of its train, val or test split."""
    n = n or {"train": s.n_train, "val": s.n_val, "test": s.n_test}[split]
    return T.load_domain(domain, split, n, n_test=s.n_test, n_val=s.n_val, seed=s.seed)


def batches(s: LMSetup, tok, domain: str, split: str, n: int | None = None) -> list:
    """Token batches of a domain's split (with the hidden states below the top layers when the
    setup trains only those)."""
    data_ = data(s, domain, split, n)
    bs = T.lm_batches(tok, data_, batch_size=s.batch_size, max_len=s.max_len)
    if s.top_layers:
        bs = with_hidden(bs, hidden(s, data_.texts))
    return [P.to_device(b, s.device) for b in bs]


def _cfg(s: LMSetup, domain: str) -> dict:
    fp = data(s, domain, "train").fingerprint() if domain else None
    return {"model": s.model, "domain": domain, "data": fp, "steps": s.steps, "lr": s.lr,
            "bs": s.batch_size, "len": s.max_len, "freeze": s.freeze_embeddings, "seed": s.seed,
            **({"top": s.top_layers} if s.top_layers else {})}


def table_cfg(s: LMSetup, exp: str) -> dict:
    """The cache key of a result table: the whole setup, the data, and the registered methods with
    their knob defaults (e.g. the removal guard)."""
    domains = s.domains if exp == "lm-domains" else (s.remove, *s.domains)
    fps = [data(s, d, sp).fingerprint() for d in domains for sp in ("train", "val", "test")]
    return {"exp": exp, **asdict(s), "data": fps, "methods": {k: m.defaults for k, m in METHODS.items()}}


def domain_size(s: LMSetup, domain: str, per: str = "sequence") -> int:
    """N_t: the training texts of a domain actually available (at most s.n_train), or with
    per="token" the next-token predictions in them (texts cut to max_len tokens)."""
    texts = data(s, domain, "train")
    if per == "sequence":
        return len(texts)
    _, tok = hub.pristine("causal_lm", tiny.model_name(s.model), 0, s.seed)
    return sum(int((b[0]["attention_mask"].sum(1) - 1).clamp_min(0).sum())
               for b in T.lm_batches(tok, texts, batch_size=64, max_len=s.max_len))


def finetune(s: LMSetup, domain: str, progress: bool = True) -> dict[str, Tensor]:
    """theta_t: the trainable part of the LM after `steps` AdamW steps on one domain (cached)."""
    def compute():
        model, tok = load(s)
        finetune_lm(model, batches(s, tok, domain, "train", s.n_train), steps=s.steps, lr=s.lr,
                    progress=progress, desc=f"fine-tune {domain}")
        return trainable(model)
    return cache.cached("language-ft", {"exp": "lm", **_cfg(s, domain)}, compute)


def fisher(s: LMSetup, domain: str | Sequence[str], params: StateDict | None, at: str,
           per: str = "sequence") -> dict[str, Tensor]:
    """Token-level MC Fisher (fp32 accumulation per tensor) of the trainable parameters at
    `params` (None: theta_0) on the training texts of `domain` (or several, mixed), per="sequence":
    mean over sequences of the squared summed gradient, or per="token": mean over next-token
    predictions (then N_t is counted in tokens, `domain_size(..., per="token")`)."""
    from ..curvature import fisher as estimate
    domains = [domain] if isinstance(domain, str) else list(domain)
    cfg = {"exp": "lm", "at": at, "domains": domains, "examples": s.fisher_examples,
           "data": [_cfg(s, d)["data"] for d in domains],
           **{k: v for k, v in _cfg(s, "").items() if k not in ("domain", "data")},
           **({"per": per, "tokens": s.fisher_tokens} if per != "sequence" else {})}

    def compute():
        model, tok = load(s)
        if params is not None:
            model.load_state_dict(params, strict=False)
        n = math.ceil(s.fisher_examples / len(domains))
        bs = [b for d in domains for b in batches(s, tok, d, "train", n)]
        f = estimate(model, bs, "mc", task="causal_lm", per=per, seed=s.seed, progress=False,
                     max_examples=s.fisher_examples,
                     tokens_per_sequence=s.fisher_tokens if per == "token" else None)
        return {k: v.cpu() for k, v in f.items()}
    return cache.cached("language-fisher", cfg, compute)


def domain_fisher(s: LMSetup, domain: str, progress: bool = True, per: str = "sequence") -> dict[str, Tensor]:
    """F_t of the model fine-tuned on `domain`, at theta_t (per sequence or per token)."""
    return fisher(s, domain, finetune(s, domain, progress), f"ft-{domain}", per)


def kept_fisher(s: LMSetup) -> dict[str, Tensor]:
    """F_0: the base model's Fisher on the kept domains (the prior of removal)."""
    return fisher(s, s.domains, None, "base-kept")


class Evaluator:
    """Perplexity of the LM with a given trainable part on each domain's test (or val) texts."""

    def __init__(self, s: LMSetup, domains: Sequence[str], splits: Sequence[str] = ("test",)):
        self.model, tok = load(s)
        self.base = trainable(self.model)
        self.sets = {sp: {d: batches(s, tok, d, sp) for d in domains} for sp in splits}

    def __call__(self, params: StateDict | None = None, split: str = "test",
                 domains: Sequence[str] | None = None) -> dict[str, float]:
        """Perplexity per domain (all, or `domains`) with `params` (None: theta_0)."""
        self.model.load_state_dict(self.base if params is None else params, strict=False)
        sets = self.sets[split]
        return {d: perplexity(self.model, sets[d]) for d in (domains or sets)}


def prepare(s: LMSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune the LM on every domain (and the one to remove) and estimate the Fishers (cached):
    the slow half of both LM benchmarks."""
    s = s or setup()
    if P.table_cached(table_cfg(s, "lm-domains")) and P.table_cached(table_cfg(s, "lm-remove")):
        return
    with quiet(s):
        for d in s.domains:
            for per in s.fisher_pers:
                domain_fisher(s, d, progress, per)
        domain_fisher(s, s.remove, progress)
        kept_fisher(s)


def fisher_totals(s: LMSetup) -> pd.DataFrame:
    """Per domain: predicted tokens per training text and sum over elements of H_t = N_t F_t under
    each normalisation of `fisher_pers` (per sequence: N_t texts; per token: N_t tokens), with
    each domain's share of the total. E[F_seq] = tokens per text * F_tok, so the shares agree up
    to Monte-Carlo noise."""
    rows = []
    with quiet(s):
        for d in s.domains:
            row = {"domain": d, "tokens per sequence": domain_size(s, d, "token") / domain_size(s, d)}
            for per in s.fisher_pers:
                f = domain_fisher(s, d, progress=False, per=per)
                row[f"sum H ({per})"] = domain_size(s, d, per) * sum(float(v.double().sum()) for v in f.values())
                del f
            rows.append(row)
    tab = pd.DataFrame(rows).set_index("domain")
    for per in s.fisher_pers:
        tab[f"share of sum H ({per})"] = tab[f"sum H ({per})"] / tab[f"sum H ({per})"].sum()
    return tab
