"""Merge methods over state dicts (name -> tensor), one function per method, in a registry.

Every method is written for ONE tensor, so the same code merges a dict in memory
(`merge_state_dicts`), torch modules (`merge_models`) and checkpoints streamed tensor by
tensor (`toolkit.checkpoint`). Notation as in Daheim et al. (ICLR 2024):
theta_0 the base, theta_t the fine-tuned models, tau_t = theta_t - theta_0 the task vectors,
alpha_t their scaling factors, F_t per-example Fishers, N_t data-set sizes, H_t = N_t F_t,
H_0 = delta + N_0 F_0 the prior precision.

To add a method: write `def my_method(base, thetas, alphas, ...) -> Tensor` and decorate it
with `@register("my_method", ...)`; the decorator's flags (statistics such as Fishers, elementwise,
alpha cancels, scale knob, label, colour) are all the rest of the code knows about it, so the
method appears at once in the CLI, the streaming merge, every experiment table and the figures.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import validate
from .checkpoint.writer import all_finite
from .errors import MergeError

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Method:
    """Everything the rest of the code knows about a merge method (read it from here, never hard-code it)."""
    name: str
    fn: Callable[..., Tensor]
    options: tuple[str, ...]        # keyword knobs the method accepts, beyond base/thetas/alphas/statistics
    defaults: Mapping[str, Any]     # the knobs' default values (from the function's signature)
    stats: tuple[str, ...] = ()     # per-model statistics handed over by the dispatcher, e.g. ("fishers",)
    needs_sizes: bool = False       # N_t required (H_t = N_t F_t); else sizes default to 1
    elementwise: bool = False       # output element i reads only input elements i: streamable in chunks
    alpha_cancels: bool = False     # a common alpha_t = alpha cancels out: one alpha is enough
    scale_knob: str | None = None   # the knob that plays alpha's role (alphas fixed at 1), e.g. TIES' lam
    label: str = ""                 # name in tables and figures
    color: str | None = None        # colour in figures (matplotlib colour)
    ranges: Mapping[str, str] = field(default_factory=dict)  # knob -> "[0, 1) drop probability"

    @property
    def uses_fisher(self) -> bool:
        return "fishers" in self.stats

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def grid(self, alphas: Sequence[float]) -> list[float]:
        """The points of an alpha grid worth evaluating: one (alpha = 1) where alpha cancels."""
        return [1.0] if self.alpha_cancels else [float(a) for a in alphas]


METHODS: dict[str, Method] = {}
_DISPATCHED = ("fishers", "sizes", "base_fisher")  # handed over by the dispatcher, not options


def register(name: str, *, stats: Sequence[str] = (), uses_fisher: bool = False, needs_sizes: bool = False,
             elementwise: bool = False, alpha_cancels: bool = False, scale_knob: str | None = None,
             label: str | None = None, color: str | None = None,
             ranges: Mapping[str, str] | None = None) -> Callable:
    """Decorator: put a per-tensor merge function into the registry under `name`, with what the
    experiments, the streaming merge and the plots need to know about it (see `Method`).
    ranges: allowed interval of a numeric knob and what it is, e.g. {"p": "[0, 1) drop probability"}; every float knob
    is checked finite, and its default's type (int, bool, str) is enforced."""
    stats = tuple(stats) + (("fishers",) if uses_fisher and "fishers" not in stats else ())

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        sig = inspect.signature(fn).parameters
        options = tuple(p for p in list(sig)[3:] if p not in _DISPATCHED and p not in stats)
        if scale_knob is not None and scale_knob not in options:
            raise MergeError(f"register({name!r}): scale_knob {scale_knob!r} is not an option of {fn.__name__}")
        for k, spec in (ranges or {}).items():
            if k not in options:
                raise MergeError(f"register({name!r}): ranges name {k!r}, not an option of {fn.__name__}")
            validate.interval(spec)
        defaults = {p: sig[p].default for p in options if sig[p].default is not inspect.Parameter.empty}
        METHODS[name] = Method(name, fn, options, defaults, stats, needs_sizes, elementwise, alpha_cancels,
                               scale_knob, label or name.replace("_", " "), color, dict(ranges or {}))
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# The methods (per tensor; inputs already validated and in a float compute dtype)
# ---------------------------------------------------------------------------------------------

_LOCAL = threading.local()  # this thread's reusable scratch buffers (see reuse_scratch)


def reuse_scratch() -> None:
    """From now on this thread's merges reuse their scratch buffers instead of allocating new ones
    per call: for worker threads that merge many alike chunks, where fresh memory costs page faults."""
    _LOCAL.pool = {}


def scratch(like: Tensor, i: int) -> Tensor:
    """Uninitialised work buffer number i shaped like `like`: this thread's reused one after
    reuse_scratch(), else new memory. Never return it: the next call overwrites it."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        return torch.empty_like(like)
    key = (i, like.dtype, like.device)
    if key not in pool or pool[key].numel() < like.numel():
        pool[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return pool[key][:like.numel()].view(like.shape)


@register("average", elementwise=True, alpha_cancels=True, label="averaging", color="#0173b2")
def average(base: Tensor, thetas: list[Tensor], alphas: list[float]) -> Tensor:
    """Weighted averaging: sum_t alpha_t theta_t / sum_t alpha_t (equal alphas: plain mean)."""
    total = math.fsum(alphas)
    if total == 0:
        raise MergeError("average: the alphas sum to zero, so the weighted average is undefined")
    return sum(a * th for a, th in zip(alphas, thetas)) / total


@register("task_arithmetic", elementwise=True, label="task arithmetic", color="#de8f05")
def task_arithmetic(base: Tensor, thetas: list[Tensor], alphas: list[float]) -> Tensor:
    """Task arithmetic: theta_0 + sum_t alpha_t tau_t (alpha_t < 0 negates a task vector)."""
    tau, out = scratch(base, 0), None
    for a, th in zip(alphas, thetas):  # one scratch buffer for every tau_t; the first add makes out
        torch.sub(th, base, out=tau)
        out = torch.add(base, tau, alpha=a) if out is None else out.add_(tau, alpha=a)
    return base.clone() if out is None else out


def _trim(tau: Tensor, density: float) -> Tensor:
    """Keep the top `density` fraction of entries by magnitude (TIES step 1), zero the rest."""
    k = int(math.ceil(density * tau.numel()))
    if k >= tau.numel():
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    thresh = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))


@register("ties", scale_knob="lam", label="TIES", color="#ca9161",
          ranges={"density": "(0, 1] fraction of entries kept"})
def ties(base: Tensor, thetas: list[Tensor], alphas: list[float], density: float = 0.2,
         lam: float = 1.0) -> Tensor:
    """TIES (Yadav et al. 2023): trim each tau_t to its top `density` entries, elect the sign of
    sum_t alpha_t tau_t, average the entries that agree with it (weights alpha_t), scale by lam.
    Trimming is per tensor (as in mergekit), not over the whole model."""
    if not 0 < density <= 1:
        raise MergeError(f"ties: density must be in (0, 1], got {density}")
    trimmed = [a * _trim(th - base, density) for a, th in zip(alphas, thetas)]
    sign = torch.sign(sum(trimmed))
    agree = [((torch.sign(t) == sign) & (t != 0)).to(base.dtype) for t in trimmed]
    num = sum(t * m for t, m in zip(trimmed, agree))
    den = sum(abs(a) * m for a, m in zip(alphas, agree))
    return base + lam * torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def _tensor_seed(seed: int, name: str, tau: Tensor) -> int:
    """Seed from (seed, tensor name, task-vector content): masks do not depend on task order."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8)
    h.update(tau.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


@register("dare", label="DARE", color="#fbafe4", ranges={"p": "[0, 1) drop probability"})
def dare(base: Tensor, thetas: list[Tensor], alphas: list[float], p: float = 0.5, seed: int = 0,
         name: str = "") -> Tensor:
    """DARE (Yu et al. 2024) + task arithmetic: drop each entry of tau_t with probability p,
    rescale survivors by 1/(1-p) (unbiased), then theta_0 + sum_t alpha_t tau_t."""
    if not 0 <= p < 1:
        raise MergeError(f"dare: drop probability p must be in [0, 1), got {p}")
    out = base.clone()
    for a, th in zip(alphas, thetas):
        tau = th - base
        if p > 0:
            g = torch.Generator().manual_seed(_tensor_seed(seed, name, tau))
            keep = torch.rand(tau.shape, generator=g, dtype=torch.float64) >= p
            tau = torch.where(keep.to(tau.device), tau / (1 - p), torch.zeros_like(tau))
        out += a * tau
    return out


@register("fisher_average", stats=("fishers",), elementwise=True, alpha_cancels=True,
          label="Fisher averaging", color="#029e73", ranges={"fisher_floor": "[0, inf) lower bound on F_t"})
def fisher_average(base: Tensor, thetas: list[Tensor], alphas: list[float], fishers: list[Tensor],
                   sizes: list[float], fisher_floor: float = 0.0) -> Tensor:
    """Fisher-weighted averaging: sum_t alpha_t H_t theta_t / sum_t alpha_t H_t, H_t = N_t max(F_t, floor)."""
    if any(a < 0 for a in alphas):
        raise MergeError("fisher_average needs non-negative alphas; use gradient_matching to remove data")
    weights = [a * n * f.clamp_min(fisher_floor) for a, n, f in zip(alphas, sizes, fishers)]
    den = sum(weights)
    if (den == 0).any():
        raise MergeError(f"fisher_average: {int((den == 0).sum())} elements have zero total Fisher, "
                         "so the average is 0/0; pass fisher_floor > 0")
    return sum(w * th for w, th in zip(weights, thetas)) / den


@register("gradient_matching", stats=("fishers",), needs_sizes=True, elementwise=True,
          label="gradient matching", color="#cc78bc",
          ranges={"delta": "[0, inf) prior precision", "base_size": "[0, inf) N_0",
                  "fisher_floor": "[0, inf) lower bound on F_t",
                  "guard": "(0, 1] floor on Hbar as a fraction of H_0 + sum_t |alpha_t| H_t"})
def gradient_matching(base: Tensor, thetas: list[Tensor], alphas: list[float], fishers: list[Tensor],
                      sizes: list[float], base_fisher: Tensor | None = None, delta: float = 1e-12,
                      base_size: float = 0.0, fisher_floor: float = 0.0, guard: float = 0.1) -> Tensor:
    """Uncertainty-based gradient matching: theta_0 + Hbar^{-1} sum_t alpha_t (H_0 + H_t) tau_t.

    Hbar = H_0 + sum_t alpha_t H_t, H_0 = delta + N_0 F_0, H_t = N_t max(F_t, fisher_floor) (all diagonal).
    Removal guard: negative alphas can cancel Hbar, so it is floored at guard * S with
    S = H_0 + sum_t |alpha_t| H_t; then each gain |alpha_t| (H_0 + H_t) / Hbar <= max(1, |alpha_t|) / guard,
    the output is continuous in the inputs, and with non-negative alphas (Hbar = S) nothing changes.
    """
    if not 0 < guard <= 1:
        raise MergeError(f"gradient_matching: guard must be in (0, 1], got {guard}")
    h, tau = scratch(base, 0), scratch(base, 1)  # H_0 + H_t (up to a scale) and tau_t, one model at a time
    hbar = scratch(base, 2).fill_(float(delta))  # H_0, then Hbar
    h0 = None  # H_0 as a tensor, when there is a base Fisher
    if base_fisher is not None and base_size:  # H_0 = delta + N_0 max(F_0, fisher_floor)
        hbar.add_(torch.clamp_min(base_fisher, fisher_floor, out=h), alpha=base_size)
        h0 = scratch(base, 3).copy_(hbar)
    neg = any(a < 0 for a in alphas)
    s = scratch(base, 4).copy_(hbar) if neg else hbar  # S; equal to Hbar when no alpha is negative
    num = torch.zeros_like(base)  # sum_t alpha_t (H_0 + H_t) tau_t, then the output
    big = torch.finfo(base.dtype).max
    for a, n, f, th in zip(alphas, sizes, fishers, thetas):  # 4 passes a model, in place on scratch buffers
        if fisher_floor > 0:  # else F_t >= 0 is checked, so no floor to apply
            f = torch.clamp_min(f, fisher_floor, out=h)
        hbar.add_(f, alpha=a * n)
        if neg:
            s.add_(f, alpha=abs(a) * n)
        torch.sub(th, base, out=tau)
        if h0 is None and delta / n <= big:  # (H_0 + H_t) = N_t (F_t + delta / N_t)
            num.addcmul_(torch.add(f, delta / n, out=h), tau, value=a * n)
        else:
            num.addcmul_(torch.add(h0 if h0 is not None else torch.full_like(h, delta), f, alpha=n, out=h),
                         tau, value=a)
    if delta <= 0 and (s == 0).any():  # S >= delta, so only a zero prior can leave S = 0
        raise MergeError(f"gradient_matching: {int((s == 0).sum())} elements have zero precision "
                         "(delta = 0 and every Fisher is zero there): the merge is 0/0; "
                         "use delta > 0 or fisher_floor > 0")
    if neg:
        floor = s.mul_(guard)
        low = hbar < floor
        if low.any():
            warnings.warn(f"gradient_matching: merged precision Hbar made small by negative alphas in "
                          f"{int(low.sum())} of {low.numel()} elements; floored there at guard * (H_0 + "
                          f"sum_t |alpha_t| H_t) with guard = {guard}, so each task vector's gain stays "
                          f"<= {max(1.0, max(abs(a) for a in alphas)) / guard:g}", stacklevel=2)
            torch.maximum(hbar, floor, out=hbar)
    return torch.addcdiv(base, num, hbar, out=num)


# ---------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------


def check_alphas(alphas: Sequence[float] | None, n_models: int) -> list[float]:
    """Default alpha_t = 1; else a list of one finite number per model."""
    if n_models == 0:
        raise MergeError("no models to merge: the model list is empty")
    if alphas is None:
        return [1.0] * n_models
    return validate.numbers_list(alphas, "alphas", n_models)


def check_options(method: Method, options: Mapping[str, object]) -> dict[str, Any]:
    """Known knobs with values of the right type, finite and inside the method's `ranges`."""
    return validate.knobs(method, options)


def check_fisher(f: Tensor, ref: Tensor, what: str) -> None:
    """A Fisher must match its parameter's shape and be finite and non-negative."""
    if not isinstance(f, Tensor):
        raise MergeError(f"{what} is a {type(f).__name__}, not a tensor")
    if f.shape != ref.shape:
        raise MergeError(f"{what} has shape {tuple(f.shape)} but the parameter has shape {tuple(ref.shape)}")
    if not f.is_floating_point():
        raise MergeError(f"{what} has dtype {f.dtype}; Fishers must be floating point")
    if f.numel() == 0:
        return
    lo, hi = (x.item() for x in torch.aminmax(f))  # one pass; NaN propagates into both
    if not (lo >= 0 and hi < math.inf):
        if not torch.isfinite(f).all():
            raise MergeError(f"{what} has {int((~torch.isfinite(f)).sum())} non-finite values (NaN or inf)")
        raise MergeError(f"{what} has {int((f < 0).sum())} negative values; a diagonal Fisher is >= 0")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 are merged in fp32, fp64 in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_tensor(method: str | Method, name: str, base: Tensor, thetas: Sequence[Tensor],
                 alphas: Sequence[float] | None = None, fishers: Sequence[Tensor] | None = None,
                 sizes: Sequence[float] | None = None, base_fisher: Tensor | None = None,
                 stats: Mapping[str, Sequence[Tensor | None]] | None = None, **options) -> Tensor:
    """Merge one tensor with a registry method. Validates shapes, dtypes and Fishers, computes in
    fp32 (fp64 for fp64 inputs) and returns a new tensor in the input dtype. Non-float tensors
    (integer ids, masks) are copied from the base. `stats`: the method's other per-model
    statistics for this tensor (name -> one entry per model, None where a model has none)."""
    return prepare(method, len(thetas), alphas, sizes, **options)(name, base, thetas, fishers, base_fisher, stats)


def prepare(method: str | Method, n_models: int, alphas: Sequence[float] | None = None,
            sizes: Sequence[float] | None = None, **options) -> Callable[..., Tensor]:
    """merge_tensor with the checks that hold for a whole merge (method, knobs, alphas, sizes) done
    once: returns f(name, base, thetas, fishers=None, base_fisher=None, stats=None) that checks only
    the tensors it is given. The streaming merge calls it for every chunk."""
    m = method if isinstance(method, Method) else get_method(method)
    kw = check_options(m, options)
    alphas = check_alphas(alphas, n_models)
    fits: set[torch.dtype] = set()  # compute dtypes the alphas and knobs are known to fit
    checked_sizes: list[list[float]] = []  # filled on first use: the error order stays merge_tensor's

    def merge(name: str, base: Tensor, thetas: Sequence[Tensor], fishers: Sequence[Tensor] | None = None,
              base_fisher: Tensor | None = None, stats: Mapping[str, Sequence[Tensor | None]] | None = None) -> Tensor:
        if len(thetas) != n_models:
            raise MergeError(f"got {len(thetas)} models for a merge prepared for {n_models}")
        for i, th in enumerate(thetas):
            validate.check_like(name, base, th, f"model {i}")
        if not base.is_floating_point():
            return base.clone()
        cd = compute_dtype(base.dtype)
        if cd not in fits:
            _check_fits(name, cd, alphas, kw)
            fits.add(cd)
        call = dict(kw, name=name) if "name" in m.options and "name" not in kw else dict(kw)
        if m.uses_fisher:
            if fishers is None:
                raise MergeError(f"method {m.name!r} needs Fishers (one per model); none were given")
            if len(fishers) != len(thetas):
                raise MergeError(f"got {len(fishers)} Fishers for {len(thetas)} models")
            for i, f in enumerate(fishers):
                check_fisher(f, base, f"Fisher {i} for {name!r}")
            if base_fisher is not None:
                check_fisher(base_fisher, base, f"base Fisher for {name!r}")
            if not checked_sizes:
                checked_sizes.append(_check_sizes(m, sizes, len(thetas)))
            call["fishers"], call["sizes"] = [f.to(cd) for f in fishers], checked_sizes[0]
            if _takes(m.fn, "base_fisher"):
                call["base_fisher"] = None if base_fisher is None else base_fisher.to(cd)
        for stat in m.stats:
            if stat == "fishers":
                continue
            vals = (stats or {}).get(stat)
            if vals is None or len(vals) != len(thetas):
                raise MergeError(f"method {m.name!r} needs {stat!r} (one per model) for {name!r}; "
                                 f"got {'none' if vals is None else len(vals)}")
            call[stat] = [None if v is None else v.to(cd) for v in vals]
        out = m.fn(base.to(cd), [th.to(cd) for th in thetas], alphas, **call).to(base.dtype)
        check_finite(name, out)
        return out

    return merge


@functools.lru_cache(maxsize=None)
def _takes(fn: Callable, param: str) -> bool:
    """Whether `fn` has a parameter `param`; cached, as inspect.signature costs more than merging a chunk."""
    return param in inspect.signature(fn).parameters


def _check_fits(name: str, cd: torch.dtype, alphas: list[float], knobs: Mapping[str, Any]) -> None:
    """Alphas and float knobs representable in the compute dtype (1e39 is inf in float32)."""
    big = torch.finfo(cd).max
    for what, v in [*((f"alphas[{i}]", a) for i, a in enumerate(alphas)), *knobs.items()]:
        if isinstance(v, float) and abs(v) > big:
            raise MergeError(f"{what} = {v:g} does not fit the {str(cd).removeprefix('torch.')} computation "
                             f"of {name!r} (largest {big:g})")


def check_finite(name: str, t: Tensor) -> None:
    """A merged tensor must be finite: a NaN or inf is never written silently."""
    if t.is_floating_point() and t.numel() and not all_finite(t):
        raise MergeError(f"the merged {name!r} has {int((~torch.isfinite(t)).sum())} non-finite values "
                         f"(NaN or inf) in {str(t.dtype).removeprefix('torch.')}: an alpha or option too large "
                         "for the dtype, or non-finite inputs; nothing was written")


def _check_sizes(m: Method, sizes: Sequence[float] | None, n: int) -> list[float]:
    if sizes is None:
        if m.needs_sizes:
            raise MergeError(f"{m.name} needs the data-set sizes N_t (H_t = N_t F_t); pass "
                             "sizes=[...] (use 1.0 each if your Fishers are already summed over data)")
        return [1.0] * n
    return validate.numbers_list(sizes, "sizes", n, "(0, inf)")


def check_state_dicts(base: StateDict, models: Sequence[StateDict]) -> None:
    """State dicts of tensors with the base's keys, shapes and dtypes (checked before any arithmetic)."""
    validate.check_same(validate.state_dict(base, "base"), validate.state_dicts(models, "models"))


def merge_state_dicts(method: str, base: StateDict, models: Sequence[StateDict],
                      alphas: Sequence[float] | None = None,
                      fishers: Sequence[StateDict] | None = None,
                      sizes: Sequence[float] | None = None,
                      base_fisher: StateDict | None = None,
                      keep: Iterable[str] = (), stats: Mapping[str, Sequence[StateDict]] | None = None,
                      **options) -> dict[str, Tensor]:
    """Merge state dicts with a registry method; returns a new dict, inputs untouched.

    fishers: one state dict of per-example diagonal Fishers F_t per model (Fisher methods);
    sizes: data-set sizes N_t; base_fisher: F_0 (with option base_size=N_0);
    keep: names copied from the base unmerged (buffers such as BatchNorm statistics);
    stats: the method's other statistics, name -> one state dict per model (keys it lacks: None).
    """
    m = get_method(method)
    options = check_options(m, options)
    check_state_dicts(base, models)
    alphas = check_alphas(alphas, len(models))
    keep = set(keep)
    if m.uses_fisher:
        if fishers is None:
            raise MergeError(f"method {method!r} needs Fishers (one per model); none were given")
        fishers = validate.state_dicts(fishers, "fishers")
        if base_fisher is not None:
            validate.state_dict(base_fisher, "base_fisher")
        if len(fishers) != len(models):
            raise MergeError(f"got {len(fishers)} Fishers for {len(models)} models; give one per model")
        for i, f in enumerate(fishers):
            missing = [k for k, v in base.items() if k not in keep and v.is_floating_point() and k not in f]
            if missing:
                raise MergeError(f"Fisher {i} has no entry for {len(missing)} tensors, e.g. {missing[:3]}")
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if k in keep or not b.is_floating_point():
            out[k] = b.clone()
            continue
        fk = [f[k] for f in fishers] if m.uses_fisher else None
        bf = None
        if m.uses_fisher and base_fisher is not None:
            if k not in base_fisher:
                raise MergeError(f"the base Fisher has no entry for {k!r}")
            bf = base_fisher[k]
        st = {n: [sd.get(k) for sd in stats[n]] for n in (stats or {}) if n in m.stats}
        out[k] = merge_tensor(m, k, b, [sd[k] for sd in models], alphas, fk, sizes, bf, st, **options)
    return out


def merge_at(method: str, base: StateDict, models: Sequence[StateDict], alpha: float, *,
             fishers: Sequence[StateDict] | None = None, sizes: Sequence[float] | None = None,
             base_fisher: StateDict | None = None, stats: Mapping[str, Sequence[StateDict]] | None = None,
             keep: Iterable[str] = (), **knobs) -> dict[str, Tensor]:
    """One point of a method's alpha grid: alpha_t = alpha for every t or, for a method with a
    scale knob (TIES' lam), alpha_t = 1 and knob = alpha. Statistics and knobs the method does not
    take are dropped, so one set of knobs and statistics serves every method."""
    m = get_method(method)
    kw = {k: v for k, v in knobs.items() if k in m.options}
    alphas = [float(alpha)] * len(models)
    if m.scale_knob is not None:
        kw[m.scale_knob], alphas = float(alpha), [1.0] * len(models)
    if m.uses_fisher:
        kw.update(fishers=fishers, sizes=sizes)
        if base_fisher is not None and _takes(m.fn, "base_fisher"):
            kw["base_fisher"] = base_fisher
    if stats:
        kw["stats"] = {n: v for n, v in stats.items() if n in m.stats}
    return merge_state_dicts(m.name, base, models, alphas, keep=keep, **kw)


def merge_grid(method: str, base: StateDict, models: Sequence[StateDict], alphas: Sequence[float],
               **kw) -> Iterator[tuple[float, dict[str, Tensor]]]:
    """(alpha, merged state dict) over the points of `alphas` worth evaluating for `method`
    (one point where alpha cancels); arguments as in `merge_at`."""
    for a in get_method(method).grid(alphas):
        yield a, merge_at(method, base, models, a, **kw)


def merge_models(method: str, base: nn.Module, models: Sequence[nn.Module],
                 alphas: Sequence[float] | None = None,
                 fishers: Sequence[StateDict] | None = None, **options) -> nn.Module:
    """Merge torch modules (timm, transformers, ...) into a NEW module; inputs are untouched.
    Buffers and non-float tensors come from the base. Options as in `merge_state_dicts`."""
    if len(models) == 0:
        raise MergeError("no models to merge: the model list is empty")
    for i, mdl in enumerate(models):
        if type(mdl) is not type(base):
            raise MergeError(f"model {i} is a {type(mdl).__name__}, the base a {type(base).__name__}: "
                             "different architectures cannot be merged")
    for i, mdl in enumerate(models):
        if _tied(mdl) != _tied(base):
            raise MergeError(f"model {i} ties parameters differently from the base (base shares "
                             f"{sorted(map(sorted, _tied(base)))}, model {i} {sorted(map(sorted, _tied(mdl)))}): "
                             "the merged values of a shared parameter would overwrite each other; "
                             "tie or untie them the same way in every model")
    buffers = {n for n, _ in base.named_buffers()}
    merged = merge_state_dicts(method, base.state_dict(), [mdl.state_dict() for mdl in models],
                               alphas, fishers, keep=buffers, **options)
    out = copy.deepcopy(base)
    out.load_state_dict(merged)
    return out


def _tied(module: nn.Module) -> set[frozenset[str]]:
    """Groups of parameter names that share one tensor (e.g. tied embedding and lm_head)."""
    groups: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def methods_table() -> list[tuple[str, bool, str]]:
    """(name, uses Fishers, one-line summary) for every registered method."""
    return [(m.name, m.uses_fisher, m.summary) for m in METHODS.values()]
