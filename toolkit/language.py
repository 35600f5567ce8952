"""Merging pretrained language models: the paper's two headline experiments in miniature.

    python -m toolkit.experiments text-add   --scale small --out results/text_add.csv
    python -m toolkit.experiments lm-domains --scale small --out results/lm_domains.csv
    python -m toolkit.experiments lm-remove  --scale small --out results/lm_remove.csv

text-add (adding tasks): one encoder (MiniLM; roberta-base at full) fine-tuned per task with its own
head, the shared bodies merged with every method over an alpha grid; accuracy per task, normalised
accuracy, spread over alpha, and the gradient mismatch m(theta) against the test error.
lm-domains: a causal LM (SmolLM2-135M) fine-tuned per text domain (embeddings frozen), merged;
perplexity per domain against the individual models and the base.
lm-remove (removing data): the LM fine-tuned on a domain to forget, then subtracted with negative
alpha: task negation theta_0 + alpha tau_r, and gradient matching
theta_0 + (H_0 + alpha H_r)^{-1} alpha (H_0 + H_r) tau_r with H_0 = delta + N_0 F_0, F_0 the
base model's Fisher on the KEPT domains (the prior says what theta_0 must keep).
tiny: random BERT/Llama of a few layers saved in the cache (seconds; tests); small: 2 CPU cores,
minutes; full: GPU. Fine-tuned models, Fishers and each result table are cached by configuration.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import cache, hub, text as T
from .errors import MergeError
from .merge import merge_state_dicts
from .scale import SCALES, get_scale, pick

StateDict = Mapping[str, Tensor]
METHODS = ("average", "task_arithmetic", "ties", "dare", "fisher_average", "gradient_matching")
NO_ALPHA = ("average", "fisher_average")  # a common alpha cancels out of these
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------
# tiny random models (tests and TOOLKIT_SCALE=tiny): saved once, read back through toolkit.hub
# ---------------------------------------------------------------------------------------------

def tiny_model_dir(kind: str, root: Path | None = None) -> str:
    """A random BERT ('bert') or Llama ('llama') with 2 layers of width 32 and MiniLM's tokenizer,
    saved with save_pretrained under <cache>/models/tiny-<kind> (atomically, once)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if kind not in ("bert", "llama"):
        raise MergeError(f"tiny_model_dir: kind must be 'bert' or 'llama', got {kind!r}")
    out = (root or hub.cache_root() / "models") / f"tiny-{kind}"
    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(hub.resolve(MINILM))
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    if kind == "bert":
        model = BertModel(BertConfig(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                             eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id))
    hub.save_dir(out, model, tok)
    return str(out)


def model_name(name: str) -> str:
    """'tiny-bert' / 'tiny-llama' -> the tiny directories; anything else -> hub.resolve's input."""
    return tiny_model_dir(name[5:]) if name in ("tiny-bert", "tiny-llama") else name


@functools.lru_cache(maxsize=4)
def _pristine(kind: str, name: str, n_classes: int, seed: int):
    torch.manual_seed(seed)  # a new classification head is initialised from this seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        if kind == "classifier":
            return hub.load_classifier(model_name(name), n_classes)
        return hub.load_causal_lm(model_name(name))


def _load(kind: str, name: str, n_classes: int, seed: int):
    """A fresh copy of a pretrained model (loaded from disk once per process) and its tokenizer."""
    model, tok = _pristine(kind, name, n_classes, seed)
    return copy.deepcopy(model), tok


@contextmanager
def quiet_settings(threads: int | None = None) -> Iterator[None]:
    """Run quietly (no transformers load reports or progress bars, no oneDNN notes) with
    `threads` torch threads (None: $TOOLKIT_THREADS, else unchanged); restores everything on exit
    and forgets the pretrained models loaded meanwhile.
    On a shared CPU one thread is often faster than two that wait for each other."""
    from transformers.utils import logging as hf_logging
    env = os.environ.get("TOOLKIT_THREADS")
    threads = threads or (int(env) if env else None)
    old_threads, old_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*oneDNN.*")
            yield
    finally:
        _pristine.cache_clear()  # do not hold pretrained copies (SmolLM2: 0.5 GB) between stages
        torch.set_num_threads(old_threads)
        hf_logging.set_verbosity(old_verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# causal-LM helpers: loss, perplexity, fine-tuning
# ---------------------------------------------------------------------------------------------

def token_nll(model: nn.Module, inputs: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood of a batch and the number of predicted tokens
    (padding, i.e. attention_mask 0, is neither input nor target)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target, valid = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
    nll = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), target.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), int(valid.sum())


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[tuple[Mapping[str, Tensor], Any]]) -> float:
    """exp(total next-token NLL / number of tokens) over all batches: ppl = exp(-1/K sum log p)."""
    model.eval()
    total, count = 0.0, 0
    for inputs, _ in batches:
        nll, n = token_nll(model, inputs)
        total, count = total + float(nll), count + n
    if count == 0:
        raise MergeError("perplexity: no tokens to predict (empty batches or sequences of length 1)")
    return math.exp(total / count)


def finetune_lm(model: nn.Module, batches: Sequence[tuple[Mapping[str, Tensor], Any]], *, steps: int,
                lr: float, progress: bool = False, desc: str = "fine-tune LM") -> nn.Module:
    """`steps` AdamW steps (cycling through `batches`) on the mean next-token NLL, in place;
    only parameters with requires_grad move (freeze the embeddings with `freeze`)."""
    if steps < 1 or not batches:
        raise MergeError(f"finetune_lm: need steps >= 1 and some batches, got steps={steps}, {len(batches)} batches")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        nll, n = token_nll(model, batches[step % len(batches)][0])
        opt.zero_grad(set_to_none=True)
        (nll / max(n, 1)).backward()
        opt.step()
    model.eval()
    return model


def freeze(model: nn.Module, frozen: Callable[[str], bool]) -> nn.Module:
    """Set requires_grad=False for the parameters whose name passes `frozen` (in place)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen(name))
    return model


def is_embedding(name: str) -> bool:
    """Token/position embeddings and a tied LM head (which shares the token embedding)."""
    return "embed" in name or name.startswith("lm_head.")


def trainable(model: nn.Module, exclude: Callable[[str], bool] = lambda n: False) -> dict[str, Tensor]:
    """Detached CPU copies of the trainable parameters (the part that is fine-tuned and merged)."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad and not exclude(k)}


def _batches_for(steps: int, batches: list) -> list:
    return [batches[i % len(batches)] for i in range(steps)]


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextAddSetup:
    """Every number of the adding-tasks experiment (cache keys hash parts of it)."""
    scale: str
    seed: int
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
    alphas: tuple[float, ...]
    delta: float                 # H_0 = delta I of gradient matching (fine-tuning uses no explicit prior)
    deltas: tuple[float, ...]    # the delta sweep
    mismatch_examples: int
    ties_density: float = 0.2
    dare_p: float = 0.5
    fisher_floor: float = 1e-12
    device: str = "cpu"


def text_setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> TextAddSetup:
    """Adding tasks at a scale: tiny (random BERT, seconds), small (MiniLM, BBC/tweets/spam, CPU
    minutes), full (roberta-base on the paper's five sentiment sets through `datasets`, GPU)."""
    scale = _check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = TextAddSetup(
        scale=scale, seed=seed, model=p("tiny-bert", MINILM, "roberta-base"),
        tasks=p(("bbc", "tweets", "spam"), ("bbc", "tweets", "spam"),
                ("imdb", "yelp", "rotten_tomatoes", "sst2", "amazon")),
        n_train=p(32, 640, 8000), n_test=p(16, 150, 1000), max_len=p(32, 64, 256), batch_size=p(8, 16, 16),
        steps=p(4, 40, 500), lr=p(1e-3, 1e-4, 1e-5), fisher_kind="mc", fisher_examples=p(8, 96, 1000),
        alphas=p((0.5, 1.0), (0.25, 0.5, 0.75, 1.0), (0.2, 0.4, 0.6, 0.8, 1.0)),
        delta=p(1e-2, 1e-2, 1e-2), deltas=p((1.0,), (1e-4, 1.0, 1e2), (1e-4, 1e-2, 1.0, 1e2)),
        mismatch_examples=p(8, 32, 256), device=_device())
    return replace(s, **overrides)


@dataclass(frozen=True)
class LMSetup:
    """Every number of the two language-model experiments."""
    scale: str
    seed: int
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
    alphas: tuple[float, ...]
    delta: float
    removal_alphas: tuple[float, ...]
    base_sizes: tuple[float, ...]  # N_0 multiples of N_r for H_0 = delta + N_0 F_0 (removal)
    ties_density: float = 0.2
    dare_p: float = 0.5
    fisher_floor: float = 1e-12
    device: str = "cpu"


def lm_setup(scale: str | None = None, seed: int = 0, **overrides: Any) -> LMSetup:
    """LM experiments at a scale: tiny (random Llama), small (SmolLM2-135M, CPU), full (GPU)."""
    scale = _check_scale(scale)
    p = lambda tiny, small, full: pick(tiny, small, full, scale)  # noqa: E731
    s = LMSetup(
        scale=scale, seed=seed, model=p("tiny-llama", SMOLLM, SMOLLM),
        domains=("news", "code", "tweets"), remove="spam",
        n_train=p(16, 120, 4000), n_test=p(8, 16, 200), max_len=p(32, 64, 256), batch_size=p(8, 8, 16),
        steps=p(2, 15, 250), lr=p(1e-3, 2e-4, 5e-5), freeze_embeddings=True, fisher_examples=p(8, 16, 256),
        alphas=p((0.5, 1.0), (0.5, 1.0), (0.3, 0.5, 0.7, 1.0)), delta=p(1e-4, 1e-4, 1e-4),
        removal_alphas=p((-0.5, -1.0), (-0.25, -0.5, -1.0, -1.5), (-0.25, -0.5, -0.75, -1.0, -1.5, -2.0)),
        base_sizes=p((3.0,), (3.0, 30.0), (1.0, 3.0, 30.0)), device=_device())
    return replace(s, **overrides)


def _check_scale(scale: str | None) -> str:
    scale = scale or get_scale()
    if scale not in SCALES:
        raise MergeError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dev(x: Any, device: str) -> Any:
    from .batch import to_device
    return to_device(x, device)


# ---------------------------------------------------------------------------------------------
# merging (one place: the alpha conventions of every method)
# ---------------------------------------------------------------------------------------------

def merge(method: str, base: StateDict, models: Sequence[StateDict], alpha: float | Sequence[float], *,
          fishers: Sequence[StateDict] | None = None, sizes: Sequence[float] | None = None,
          delta: float = 1e-4, base_fisher: StateDict | None = None, base_size: float = 0.0,
          ties_density: float = 0.2, dare_p: float = 0.5, seed: int = 0,
          fisher_floor: float = 1e-12) -> dict[str, Tensor]:
    """merge_state_dicts with each method's knobs: alpha_t for the arithmetic methods, TIES's lam,
    Fishers and sizes N_t for the Fisher methods (H_0 = delta + base_size * base_fisher)."""
    T_ = len(models)
    alphas = [float(alpha)] * T_ if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    kw: dict[str, Any] = {}
    if method == "ties":
        kw = {"density": ties_density, "lam": alphas[0]}
        alphas = [1.0] * T_
    elif method == "dare":
        kw = {"p": dare_p, "seed": seed}
    elif method == "fisher_average":
        kw = {"fishers": fishers, "sizes": sizes, "fisher_floor": fisher_floor}
    elif method == "gradient_matching":
        kw = {"fishers": fishers, "sizes": sizes, "delta": delta, "fisher_floor": fisher_floor}
        if base_fisher is not None:
            kw.update(base_fisher=base_fisher, base_size=base_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gradient_matching: merged precision")
        return merge_state_dicts(method, base, models, alphas, **kw)


def removal_diagnostics(fisher_r: StateDict, size_r: float, alpha: float, delta: float,
                        base_fisher: StateDict | None, base_size: float) -> dict[str, float]:
    """Where gradient matching with alpha < 0 is ill-posed or amplifies the task vector:
    step = g tau_r with g = alpha (H_0 + H_r) / (H_0 + alpha H_r). Returns the fraction of elements
    whose merged precision is not positive (merge.py falls back to task arithmetic there) and the
    median, 99th percentile (of a sample) and maximum of |g| / |alpha| where it is positive
    (1 = task negation)."""
    gains, bad, total, gain_max = [], 0, 0, 0.0
    for k, f in fisher_r.items():
        h0 = torch.full_like(f, delta, dtype=torch.float64)
        if base_fisher is not None:
            h0 = h0 + base_size * base_fisher[k].double()
        hr = size_r * f.double()
        hbar = h0 + alpha * hr
        ok = hbar > 1e-6 * (h0 + abs(alpha) * hr)
        bad += int((~ok).sum())
        total += f.numel()
        g = ((h0 + hr) / hbar)[ok].flatten()
        gain_max = max(gain_max, float(g.max())) if len(g) else gain_max
        gains.append(g[torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:20000]].float())
    g = torch.cat(gains) if gains else torch.zeros(1)
    return {"not_positive": bad / max(total, 1), "gain_median": float(g.median()),
            "gain_p99": float(torch.quantile(g, 0.99)), "gain_max": gain_max}


# ---------------------------------------------------------------------------------------------
# experiment 1: adding tasks to an encoder
# ---------------------------------------------------------------------------------------------

def _task_data(s: TextAddSetup, name: str) -> tuple[T.TextSet, T.TextSet]:
    n_test = s.n_test
    return (T.load_task(name, "train", s.n_train, n_test=n_test, seed=s.seed),
            T.load_task(name, "test", s.n_test, n_test=n_test, seed=s.seed))


def _classifier(s: TextAddSetup, n_classes: int):
    """The base encoder with a fresh head (seeded: every task starts from the same theta_0)."""
    model, tok = _load("classifier", s.model, n_classes, s.seed)
    return model.to(s.device).eval(), tok


def _is_head(name: str) -> bool:
    return name.startswith("classifier.")


def finetune_classifier(s: TextAddSetup, name: str, train: T.TextSet, progress: bool = True) -> dict:
    """theta_t (body) and its head: AdamW on the task's cross-entropy from theta_0 (cached)."""
    from .train import train as fit
    cfg = {"exp": "text-add", "model": s.model, "task": name, "data": train.fingerprint(), "steps": s.steps,
           "lr": s.lr, "bs": s.batch_size, "len": s.max_len, "seed": s.seed}

    def compute():
        model, tok = _classifier(s, len(train.classes))
        batches = T.classification_batches(tok, train, batch_size=s.batch_size, max_len=s.max_len)
        fit(model, [_dev(b, s.device) for b in _batches_for(s.steps, batches)], lr=s.lr, progress=progress,
            desc=f"fine-tune {name}")
        sd = trainable(model)
        return {"body": {k: v for k, v in sd.items() if not _is_head(k)},
                "head": {k: v for k, v in sd.items() if _is_head(k)}}
    return cache.cached("language-ft", cfg, compute)


def classifier_fisher(s: TextAddSetup, name: str, ft: dict, train: T.TextSet) -> dict[str, Tensor]:
    """F_t of the body at theta_t: per-example mean diagonal Fisher (toolkit.curvature)."""
    from .curvature import fisher
    cfg = {"exp": "text-add", "model": s.model, "task": name, "data": train.fingerprint(), "steps": s.steps,
           "lr": s.lr, "bs": s.batch_size, "len": s.max_len, "seed": s.seed,
           "fisher": [s.fisher_kind, s.fisher_examples]}

    def compute():
        model, tok = _classifier(s, len(train.classes))
        model.load_state_dict({**ft["body"], **ft["head"]}, strict=False)
        batches = T.classification_batches(tok, train, batch_size=s.batch_size, max_len=s.max_len)
        f = fisher(model, (_dev(b, s.device) for b in batches), s.fisher_kind, seed=s.seed, progress=False,
                   max_examples=s.fisher_examples, params=lambda k: not _is_head(k))
        return {k: v.cpu() for k, v in f.items() if k in ft["body"]}
    return cache.cached("language-fisher", cfg, compute)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable) -> float:
    from .train import evaluate
    return evaluate(model, batches)["accuracy"]


def _text_table_cfg(s: TextAddSetup) -> dict:
    data = [T.load_task(t, sp, n, n_test=s.n_test, seed=s.seed).fingerprint()
            for t in s.tasks for sp, n in (("train", s.n_train), ("test", s.n_test))]
    return {"exp": "text-add", **asdict(s), "data": data}


def _table_cached(cfg: dict) -> bool:
    path = cache.path_for("language-table", cfg)
    return path is not None and path.is_file()


def prepare_text_add(s: TextAddSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune every task and estimate its Fisher (cached): the slow half of run_text_add, as its
    own step so a notebook cell stays short."""
    s = s or text_setup()
    if not _table_cached(_text_table_cfg(s)):
        text_fishers(s, progress)


def run_text_add(s: TextAddSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Adding tasks: one row per (study, method, alpha, delta, task) with accuracy, the individual
    model's accuracy, normalised accuracy (merged / individual) and, for the mismatch study,
    ||m(theta)|| of the merge. Cached as a whole by the setup."""
    s = s or text_setup()
    rows = cache.cached("language-table", _text_table_cfg(s), lambda: _text_add(s, progress))
    return pd.DataFrame(rows)


def _text_add(s: TextAddSetup, progress: bool) -> list[dict]:
    from .mismatch import gradient_mismatch, total_norm
    from .train import loss_gradient
    with quiet_settings(1 if s.scale == "tiny" else None):
        data = {t: _task_data(s, t) for t in s.tasks}
        fts = {t: finetune_classifier(s, t, data[t][0], progress) for t in s.tasks}
        fishers = {t: classifier_fisher(s, t, fts[t], data[t][0]) for t in s.tasks}
        models, tok = {}, None
        for t in s.tasks:
            models[t], tok = _classifier(s, len(data[t][0].classes))
        base = {k: v for k, v in trainable(models[s.tasks[0]]).items() if not _is_head(k)}
        for t in s.tasks:
            models[t].load_state_dict(fts[t]["head"], strict=False)
        tests = {t: [_dev(b, s.device) for b in T.classification_batches(
            tok, data[t][1], batch_size=64, max_len=s.max_len)] for t in s.tasks}
        bodies = [fts[t]["body"] for t in s.tasks]
        fs = [fishers[t] for t in s.tasks]
        sizes = [float(len(data[t][0])) for t in s.tasks]

        def evaluate(body: StateDict) -> dict[str, float]:
            out = {}
            for t in s.tasks:
                models[t].load_state_dict(body, strict=False)
                out[t] = accuracy(models[t], tests[t])
            return out

        rows: list[dict] = []

        def record(study, method, acc, **extra):
            rows.extend({"study": study, "method": method, "task": t, "accuracy": a, **extra} for t, a in acc.items())

        for t, b in zip(s.tasks, bodies):
            models[t].load_state_dict(b, strict=False)
            record("individual", "individual", {t: accuracy(models[t], tests[t])})
        record("base", "base body, task head", {t: a for t, a in evaluate(base).items()})
        jobs = [("merge", m, a, s.delta) for m in METHODS for a in ([1.0] if m in NO_ALPHA else s.alphas)]
        jobs += [("delta", "gradient_matching", a, d) for d in s.deltas if d != s.delta for a in s.alphas]
        merged_at = {}
        for study, m, a, d in tqdm(jobs, desc="text-add merges", disable=not progress, leave=False):
            sd = merge(m, base, bodies, a, fishers=fs, sizes=sizes, delta=d, ties_density=s.ties_density,
                       dare_p=s.dare_p, seed=s.seed, fisher_floor=s.fisher_floor)
            record(study, m, evaluate(sd), alpha=None if m in NO_ALPHA else a,
                   delta=d if m == "gradient_matching" else None)
            if study == "merge" and m in ("task_arithmetic", "gradient_matching", "average", "fisher_average"):
                merged_at[(m, a)] = sd

        # gradient mismatch m(theta) = sum_t alpha_t [grad lbar_t(theta) - grad lbar_t(theta_t)]
        def grad(t: str, body: StateDict) -> dict[str, Tensor]:
            models[t].load_state_dict(body, strict=False)
            sub = T.TextSet(t, data[t][0].texts[:s.mismatch_examples], data[t][0].labels[:s.mismatch_examples])
            bs = [_dev(b, s.device) for b in T.classification_batches(tok, sub, batch_size=s.batch_size,
                                                                       max_len=s.max_len)]
            g = loss_gradient(models[t], bs)
            return {k: v.cpu() * (len(data[t][0]) / len(sub)) for k, v in g.items() if k in base}

        at_task = [grad(t, b) for t, b in zip(s.tasks, bodies)]
        for (m, a), sd in tqdm(merged_at.items(), desc="mismatch", disable=not progress, leave=False):
            alpha = 1.0 if m in NO_ALPHA else a
            norm = total_norm(gradient_mismatch([grad(t, sd) for t in s.tasks], at_task, [alpha] * len(s.tasks)))
            for r in rows:
                if r["study"] == "merge" and r["method"] == m and (m in NO_ALPHA or r.get("alpha") == a):
                    r["mismatch"] = norm
    ind = {r["task"]: r["accuracy"] for r in rows if r["study"] == "individual"}
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, individual=ind[r["task"]],
                 normalised=r["accuracy"] / ind[r["task"]] if ind[r["task"]] else float("nan"))
    cols = ["scale", "seed", "study", "method", "alpha", "delta", "task", "accuracy", "individual", "normalised",
            "mismatch"]
    return [{c: r.get(c) for c in cols} for r in rows]


def text_fishers(s: TextAddSetup, progress: bool = False) -> tuple[list[dict[str, Tensor]], list[float]]:
    """The Fishers F_t and sizes N_t of the adding-tasks experiment (from the cache after a run)."""
    with quiet_settings(1 if s.scale == "tiny" else None):
        out = []
        for t in s.tasks:
            train, _ = _task_data(s, t)
            out.append((classifier_fisher(s, t, finetune_classifier(s, t, train, progress), train), float(len(train))))
    return [f for f, _ in out], [n for _, n in out]


def text_parts(s: TextAddSetup, progress: bool = False):
    """(theta_0 body, fine-tuned bodies, Fishers F_t, sizes N_t) of the adding-tasks experiment,
    from the cache after a run (computed otherwise)."""
    fishers, sizes = text_fishers(s, progress)
    with quiet_settings(1 if s.scale == "tiny" else None):
        model, _ = _classifier(s, 2)
        base = {k: v for k, v in trainable(model).items() if not _is_head(k)}
        bodies = [finetune_classifier(s, t, _task_data(s, t)[0], progress)["body"] for t in s.tasks]
    return base, bodies, fishers, sizes


def fisher_competition(base: StateDict, models: Sequence[StateDict], fishers: Sequence[StateDict],
                       sizes: Sequence[float], delta: float, names: Sequence[str]) -> pd.DataFrame:
    """Where gradient matching departs from task arithmetic, per task: its share of the summed
    Fisher sum_t N_t F_t, the share of ||tau_t||^2 in elements where H_t > delta (there the merge
    averages with Fisher weights instead of adding), and the share of ||tau_t||^2 in elements where
    another task's H is larger still (there that task's value wins)."""
    rows = []
    totals = [sum(float(f[k].double().sum()) * n for k in base) for f, n in zip(fishers, sizes)]
    for i, (theta, f, n) in enumerate(zip(models, fishers, sizes)):
        tot = strong = lost = 0.0
        for k, b in base.items():
            tau2 = (theta[k].double() - b.double()) ** 2
            h = n * f[k].double()
            other = torch.stack([m * g[k].double() for j, (g, m) in enumerate(zip(fishers, sizes)) if j != i]).amax(0)
            tot += float(tau2.sum())
            strong += float(tau2[h > delta].sum())
            lost += float(tau2[(h > delta) & (other > h)].sum())
        rows.append({"task": names[i], "share of sum H": totals[i] / sum(totals),
                     "tau^2 share where H > delta": strong / tot, "tau^2 share where another H is larger": lost / tot})
    return pd.DataFrame(rows).set_index("task")


def fisher_scale(fishers: Sequence[StateDict], sizes: Sequence[float], delta: float,
                 names: Sequence[str] | None = None) -> pd.DataFrame:
    """How H_t = N_t F_t compares with the prior delta, per model: quantiles of H_t / delta, the
    fraction of elements where H_t > delta, and the share of sum H_t held by the top 1% of elements
    (heavy tails: a few elements carry most of the Fisher)."""
    rows = []
    for i, (f, n) in enumerate(zip(fishers, sizes)):
        h = torch.cat([v.flatten().double() for v in f.values()]) * n
        top = torch.topk(h, max(1, h.numel() // 100)).values.sum() / h.sum().clamp_min(1e-300)
        q = torch.quantile(h[torch.randperm(h.numel(), generator=torch.Generator().manual_seed(0))[:200000]],
                           torch.tensor([0.5, 0.99], dtype=torch.float64))
        rows.append({"model": names[i] if names else i, "median H/delta": float(q[0]) / delta,
                     "p99 H/delta": float(q[1]) / delta, "share H > delta": float((h > delta).double().mean()),
                     "top 1% share of sum H": float(top)})
    return pd.DataFrame(rows).set_index("model")


def text_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method (main study): best alpha, mean accuracy and normalised accuracy there, and the
    spread max - min of the mean normalised accuracy over the alpha grid."""
    d = df[df["study"] == "merge"].copy()
    d["alpha"] = d["alpha"].fillna(1.0)
    g = d.groupby(["method", "alpha"], sort=False)[["accuracy", "normalised"]].mean().reset_index()
    best = g.loc[g.groupby("method", sort=False)["normalised"].idxmax()].set_index("method")
    spread = g.groupby("method", sort=False)["normalised"].agg(lambda x: x.max() - x.min())
    return pd.DataFrame({"best_alpha": best["alpha"], "accuracy": best["accuracy"],
                         "normalised": best["normalised"], "spread_over_alpha": spread})


# ---------------------------------------------------------------------------------------------
# experiments 2 and 3: causal LMs
# ---------------------------------------------------------------------------------------------

def _lm(s: LMSetup):
    model, tok = _load("causal_lm", s.model, 0, s.seed)
    model.to(s.device).eval()
    if s.freeze_embeddings:
        freeze(model, is_embedding)
    return model, tok


def _domain_batches(s: LMSetup, tok, domain: str, split: str, n: int) -> list:
    data = T.load_domain(domain, split, n, n_test=s.n_test, seed=s.seed)
    return [_dev(b, s.device) for b in T.lm_batches(tok, data, batch_size=s.batch_size, max_len=s.max_len)]


def _lm_cfg(s: LMSetup, domain: str) -> dict:
    data = T.load_domain(domain, "train", s.n_train, n_test=s.n_test, seed=s.seed).fingerprint() if domain else None
    return {"model": s.model, "domain": domain, "data": data, "steps": s.steps, "lr": s.lr, "bs": s.batch_size,
            "len": s.max_len, "freeze": s.freeze_embeddings, "seed": s.seed}


def _lm_table_cfg(s: LMSetup, exp: str) -> dict:
    domains = s.domains if exp == "lm-domains" else (s.remove, *s.domains)
    data = [T.load_domain(d, sp, n, n_test=s.n_test, seed=s.seed).fingerprint()
            for d in domains for sp, n in (("train", s.n_train), ("test", s.n_test))]
    return {"exp": exp, **asdict(s), "data": data}


def domain_size(s: LMSetup, domain: str) -> int:
    """N_t: the training texts of a domain actually available (at most s.n_train)."""
    return len(T.load_domain(domain, "train", s.n_train, n_test=s.n_test, seed=s.seed))


def finetune_domain(s: LMSetup, domain: str, progress: bool = True) -> dict[str, Tensor]:
    """theta_t: the trainable part of the LM after `steps` AdamW steps on one domain (cached)."""
    def compute():
        model, tok = _lm(s)
        finetune_lm(model, _domain_batches(s, tok, domain, "train", s.n_train), steps=s.steps, lr=s.lr,
                    progress=progress, desc=f"fine-tune {domain}")
        return trainable(model)
    return cache.cached("language-ft", {"exp": "lm", **_lm_cfg(s, domain)}, compute)


def lm_fisher(s: LMSetup, domain: str | Sequence[str], params: StateDict | None, at: str) -> dict[str, Tensor]:
    """Token-level MC Fisher (per-sequence mean, fp32 accumulation per tensor) of the trainable
    parameters at `params` (None: theta_0) on the training texts of `domain` (or several, mixed)."""
    from .curvature import fisher
    domains = [domain] if isinstance(domain, str) else list(domain)
    cfg = {"exp": "lm", "at": at, "domains": domains, "examples": s.fisher_examples,
           "data": [_lm_cfg(s, d)["data"] for d in domains],
           **{k: v for k, v in _lm_cfg(s, "").items() if k not in ("domain", "data")}}

    def compute():
        model, tok = _lm(s)
        if params is not None:
            model.load_state_dict(params, strict=False)
        per = math.ceil(s.fisher_examples / len(domains))
        batches = [b for d in domains for b in _domain_batches(s, tok, d, "train", per)]
        f = fisher(model, batches, "mc", task="causal_lm", seed=s.seed, progress=False,
                   max_examples=s.fisher_examples)
        return {k: v.cpu() for k, v in f.items()}
    return cache.cached("language-fisher", cfg, compute)


class LMEvaluator:
    """Perplexity of the LM with a given trainable part on each domain's test texts."""

    def __init__(self, s: LMSetup, domains: Sequence[str]):
        self.model, tok = _lm(s)
        self.base = trainable(self.model)
        self.tests = {d: _domain_batches(s, tok, d, "test", s.n_test) for d in domains}

    def __call__(self, params: StateDict | None = None) -> dict[str, float]:
        self.model.load_state_dict(self.base if params is None else params, strict=False)
        return {d: perplexity(self.model, b) for d, b in self.tests.items()}


def prepare_lm(s: LMSetup | None = None, *, progress: bool = True) -> None:
    """Fine-tune the LM on every domain (and the one to remove) and estimate the Fishers (cached):
    the slow half of run_lm_domains and run_lm_remove."""
    s = s or lm_setup()
    if _table_cached(_lm_table_cfg(s, "lm-domains")) and _table_cached(_lm_table_cfg(s, "lm-remove")):
        return
    with quiet_settings(1 if s.scale == "tiny" else None):
        for d in (*s.domains, s.remove):
            lm_fisher(s, d, finetune_domain(s, d, progress), f"ft-{d}")
        lm_fisher(s, s.domains, None, "base-kept")


def lm_fisher_totals(s: LMSetup) -> pd.DataFrame:
    """Per domain: summed Fisher of its fine-tuned model (one example = one sequence), the mean
    number of predicted tokens per sequence, and their ratio. With token-level Fishers summed over
    a sequence, domains of short texts get a smaller F_t per example, hence less weight."""
    rows = []
    with quiet_settings(1 if s.scale == "tiny" else None):
        for d in s.domains:
            f = lm_fisher(s, d, finetune_domain(s, d, progress=False), f"ft-{d}")
            total = sum(float(v.double().sum()) for v in f.values())
            del f
            _, tok = _load("causal_lm", s.model, 0, s.seed)
            batches = T.lm_batches(tok, T.load_domain(d, "train", s.fisher_examples, n_test=s.n_test, seed=s.seed),
                                   batch_size=s.batch_size, max_len=s.max_len)
            seqs = sum(len(b[0]["input_ids"]) for b in batches)
            tokens = sum(int((b[0]["attention_mask"].sum(1) - 1).clamp_min(0).sum()) for b in batches) / seqs
            rows.append({"domain": d, "sum F (per sequence)": total, "tokens per sequence": tokens,
                         "sum F per token": total / tokens})
    return pd.DataFrame(rows).set_index("domain")


def run_lm_domains(s: LMSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Multi-domain LM merging: one row per (study, method, alpha, domain) with the perplexity,
    the base's and the domain's own fine-tuned model's perplexity. Cached as a whole."""
    s = s or lm_setup()
    rows = cache.cached("language-table", _lm_table_cfg(s, "lm-domains"), lambda: _lm_domains(s, progress))
    return pd.DataFrame(rows)


def _lm_domains(s: LMSetup, progress: bool) -> list[dict]:
    with quiet_settings(1 if s.scale == "tiny" else None):
        fts = [finetune_domain(s, d, progress) for d in s.domains]
        ev = LMEvaluator(s, s.domains)
        base = ev.base
        fs = [lm_fisher(s, d, ft, f"ft-{d}") for d, ft in zip(s.domains, fts)]
        sizes = [float(domain_size(s, d)) for d in s.domains]
        rows: list[dict] = []

        def record(study, method, ppl, **extra):
            rows.extend({"study": study, "method": method, "domain": d, "perplexity": v, **extra}
                        for d, v in ppl.items())

        record("base", "base", ev())
        for d, ft in zip(s.domains, fts):
            record("individual", f"fine-tuned on {d}", ev(ft), trained_on=d)
        jobs = [(m, a) for m in METHODS for a in ([1.0] if m in NO_ALPHA else s.alphas)]
        for m, a in tqdm(jobs, desc="lm-domains merges", disable=not progress, leave=False):
            sd = merge(m, base, fts, a, fishers=fs, sizes=sizes, delta=s.delta, ties_density=s.ties_density,
                       dare_p=s.dare_p, seed=s.seed, fisher_floor=s.fisher_floor)
            record("merge", m, ev(sd), alpha=None if m in NO_ALPHA else a,
                   delta=s.delta if m == "gradient_matching" else None)
    base_ppl = {r["domain"]: r["perplexity"] for r in rows if r["study"] == "base"}
    own = {r["trained_on"]: r["perplexity"] for r in rows if r.get("trained_on") == r["domain"]}
    cols = ["scale", "seed", "study", "method", "alpha", "delta", "domain", "perplexity", "base", "individual"]
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, base=base_ppl[r["domain"]], individual=own[r["domain"]])
    return [{c: r.get(c) for c in cols} for r in rows]


def removal_gains(s: LMSetup, alpha: float, multiple: float) -> dict[str, float]:
    """removal_diagnostics for the removal run's own Fishers (from the cache after a run), with
    N_0 = multiple * N_r."""
    with quiet_settings(1 if s.scale == "tiny" else None):
        f_r = lm_fisher(s, s.remove, finetune_domain(s, s.remove, progress=False), f"ft-{s.remove}")
        f_0 = lm_fisher(s, s.domains, None, "base-kept")
    n_r = float(domain_size(s, s.remove))
    return removal_diagnostics(f_r, n_r, alpha, s.delta, f_0, multiple * n_r)


def run_lm_remove(s: LMSetup | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Removing a domain: one row per (method, alpha, N_0) with perplexity on the removed domain,
    the mean log-perplexity ratio over the kept domains (merged / base), and for gradient matching
    the diagnostics of `removal_diagnostics`. Cached as a whole."""
    s = s or lm_setup()
    rows = cache.cached("language-table", _lm_table_cfg(s, "lm-remove"), lambda: _lm_remove(s, progress))
    return pd.DataFrame(rows)


def _lm_remove(s: LMSetup, progress: bool) -> list[dict]:
    with quiet_settings(1 if s.scale == "tiny" else None):
        ft = finetune_domain(s, s.remove, progress)
        ev = LMEvaluator(s, (s.remove, *s.domains))
        base = ev.base
        f_r = lm_fisher(s, s.remove, ft, f"ft-{s.remove}")
        f_0 = lm_fisher(s, s.domains, None, "base-kept")
        n_r = float(domain_size(s, s.remove))
        rows: list[dict] = []

        def record(method, alpha, ppl, **extra):
            kept = [ppl[d] for d in s.domains]
            rows.append({"method": method, "alpha": alpha, "removed": ppl[s.remove],
                         "kept": math.exp(sum(math.log(v) for v in kept) / len(kept)),
                         **{f"ppl_{d}": v for d, v in ppl.items()}, **extra})

        record("base", 0.0, ev())
        record("fine-tuned", 1.0, ev(ft))
        jobs = [("task_arithmetic", a, None) for a in s.removal_alphas]
        jobs += [("gradient_matching", a, k) for k in s.base_sizes for a in s.removal_alphas]
        for m, a, k in tqdm(jobs, desc="lm-remove merges", disable=not progress, leave=False):
            if m == "task_arithmetic":
                record(m, a, ev(merge(m, base, [ft], a)))
                continue
            n0 = k * n_r
            sd = merge(m, base, [ft], a, fishers=[f_r], sizes=[n_r], delta=s.delta, base_fisher=f_0, base_size=n0,
                       fisher_floor=s.fisher_floor)
            record(m, a, ev(sd), base_size=n0, **removal_diagnostics(f_r, n_r, a, s.delta, f_0, n0))
    base_row = rows[0]
    for r in rows:
        r.update(scale=s.scale, seed=s.seed, removed_vs_base=r["removed"] / base_row["removed"],
                 kept_vs_base=r["kept"] / base_row["kept"])
    return rows


# ---------------------------------------------------------------------------------------------
# command line (registered by toolkit.experiments)
# ---------------------------------------------------------------------------------------------

EXPERIMENTS = {
    "text-add": ("merge encoders fine-tuned on several text classification tasks", text_setup, run_text_add),
    "lm-domains": ("merge a causal LM fine-tuned on several text domains", lm_setup, run_lm_domains),
    "lm-remove": ("remove a text domain from a causal LM (negative alpha)", lm_setup, run_lm_remove),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands text-add, lm-domains and lm-remove to an argparse subparsers object."""
    for name, (help_, _, _) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--scale", choices=SCALES, default=None, help="default: $TOOLKIT_SCALE or small")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=f"results/{name.replace('-', '_')}.csv")
        p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Run the experiment named by args.experiment and write its CSV atomically."""
    from .experiments import write_csv
    _, make_setup, run = EXPERIMENTS[args.experiment]
    t0 = time.time()
    try:
        df = run(make_setup(args.scale, args.seed), progress=not args.no_progress)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_csv(df, args.out)
    if args.experiment == "text-add":
        print(text_summary(df).to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {len(df)} rows to {args.out} in {time.time() - t0:.1f} s")
    return 0
