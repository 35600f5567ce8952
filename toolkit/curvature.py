"""Diagonal Fisher estimators: the per-example mean Fisher F_t that the merge uses as H_t = N_t F_t.

    exact:         F = 1/N sum_n sum_y p(y|x_n) g_ny^2            (g_ny = grad log p(y|x_n))
    mc:            F = 1/N sum_n 1/S sum_s g_{n,y_s}^2, y_s ~ p(y|x_n)   (the paper's estimator)
    empirical:     F = 1/N sum_n g_{n,y_n}^2                      (true labels)
    batch_squared: F = 1/K sum_batches (1/B sum_{n in batch} g_{n,y_n})^2  (MergeLM/FusionBench)

Every kind is a sum of per-example squared gradients of -log p(y|x) for some labels y, so all
of them come from one routine: pick the gradient of the loss w.r.t. the logits (p - e_y, scaled),
then either run a backward pass per example ("loop", the reference) or one batched backward pass
whose layer hooks form the per-example squares ("hooks", `toolkit.persample`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batch import batch_size, logits as model_logits
from .errors import MergeError
from .persample import HookEngine

KINDS = ("exact", "mc", "empirical", "batch_squared")
BACKENDS = ("auto", "hooks", "loop")
TASKS = ("classification", "causal_lm")


def fisher(model: nn.Module, batches: Iterable[tuple[Any, Any]], kind: str = "mc", *,
           n_samples: int = 1, backend: str = "auto", task: str = "classification",
           params: Callable[[str], bool] | Sequence[str] | None = None, seed: int = 0,
           progress: bool = True, max_examples: int | None = None) -> dict[str, Tensor]:
    """Diagonal Fisher of `model` on `batches`, the MEAN over examples (multiply by N for H_t).

    kind: "exact" (classification only), "mc" (n_samples labels drawn from the model per example,
    or per token for causal_lm; seeded), "empirical" (true labels), "batch_squared" (square of the
    gradient of each batch's MEAN loss with true labels, averaged over batches: what MergeLM and
    FusionBench compute; it is biased and about batch-size times too small, kept for comparison).
    task: "classification" (logits [B, C], targets [B]) or "causal_lm" (inputs with input_ids and
    optional attention_mask, logits [B, L, V], next-token targets; one example = one sequence, its
    gradient summed over its tokens; targets None, or HF-style labels [B, L] with -100 ignored).
    backend: "hooks"/"auto" (per-example squares inside one backward pass) or "loop" (reference).
    params: a name filter or a list of names; a tied parameter is kept if any of its names passes.
    Returns {state_dict name: F} for each selected trainable parameter under every alias, float32
    (float64 for float64 parameters). The model is in eval mode meanwhile; nothing of it changes.
    """
    _check_options(kind, backend, task, n_samples, max_examples)
    chosen, aliases = select_params(model, params)
    acc = {k: torch.zeros_like(p, dtype=_acc_dtype(p)) for k, p in chosen.items()}
    gen = torch.Generator().manual_seed(seed)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = n_batches = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    hooks = backend in ("auto", "hooks") and kind != "batch_squared"
    try:
        with torch.enable_grad(), (HookEngine(model, chosen, acc) if hooks else nullcontext()) as eng:
            for batch in tqdm(batches, desc=f"fisher ({kind})", total=total, disable=not progress):
                inputs, targets = _unpack(batch)
                B = batch_size(inputs)
                if max_examples is not None:
                    if seen >= max_examples:
                        break
                    if seen + B > max_examples:
                        B = max_examples - seen
                        inputs, targets = _take(inputs, slice(0, B)), _take(targets, slice(0, B))
                if B == 0:
                    continue
                if kind == "batch_squared":
                    _batch_squared(model, chosen, acc, inputs, targets, task, backend)
                elif eng is not None:
                    _hooks_batch(eng, inputs, targets, kind, task, n_samples, gen)
                else:
                    _loop_batch(model, chosen, acc, inputs, targets, kind, task, n_samples, gen)
                seen += B
                n_batches += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if seen == 0:
        raise MergeError("fisher: no examples: the batches were empty")
    denom = n_batches if kind == "batch_squared" else seen
    out: dict[str, Tensor] = {}
    for k, v in acc.items():
        v = v / denom
        for i, a in enumerate(aliases[k]):
            out[a] = v if i == 0 else v.clone()
    return out


# --------------------------------------------------------------------------------------------
# Validation and parameter selection
# --------------------------------------------------------------------------------------------


def _check_options(kind: str, backend: str, task: str, n_samples: int, max_examples: int | None) -> None:
    if kind not in KINDS:
        raise MergeError(f"fisher: unknown kind {kind!r}; choose one of {KINDS}")
    if backend not in BACKENDS:
        raise MergeError(f"fisher: unknown backend {backend!r}; choose one of {BACKENDS}")
    if task not in TASKS:
        raise MergeError(f"fisher: unknown task {task!r}; choose one of {TASKS}")
    if kind == "exact" and task != "classification":
        raise MergeError("fisher: kind='exact' sums over every label and is only for "
                         "task='classification'; for causal_lm use kind='mc' or 'empirical'")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise MergeError(f"fisher: n_samples must be a positive integer, got {n_samples!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise MergeError(f"fisher: max_examples must be a positive integer or None, got {max_examples!r}")


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def select_params(model: nn.Module, params: Callable[[str], bool] | Sequence[str] | None
                  ) -> tuple[dict[str, nn.Parameter], dict[str, list[str]]]:
    """Trainable parameters chosen by `params` (canonical name -> parameter) and every
    state_dict name (alias) of each, e.g. both names of tied embeddings."""
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    by_id = {id(p): k for k, p in trainable.items()}
    aliases: dict[str, list[str]] = {k: [] for k in trainable}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in by_id:
            aliases[by_id[id(t)]].append(name)
    for k, names in aliases.items():
        if not names:
            names.append(k)
    if params is None:
        keep = set(trainable)
    elif callable(params):
        keep = {k for k in trainable if any(params(a) for a in aliases[k])}
    else:
        if isinstance(params, str):
            raise MergeError(f"fisher: params must be a list of names or a filter, got the string {params!r}")
        wanted = set(params)
        known = {a for names in aliases.values() for a in names}
        unknown = sorted(wanted - known)
        if unknown:
            raise MergeError(f"fisher: {unknown[:5]} are not trainable parameters of the model "
                             "(unknown names, buffers or requires_grad=False)")
        keep = {k for k in trainable if wanted & set(aliases[k])}
    if not keep:
        raise MergeError("fisher: no trainable parameters selected (all frozen or filtered out by params)")
    return {k: trainable[k] for k in trainable if k in keep}, {k: aliases[k] for k in trainable if k in keep}


def _unpack(batch: Any) -> tuple[Any, Any]:
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise MergeError("fisher: each batch must be a pair (inputs, targets), "
                         f"got {type(batch).__name__}") from None
    return inputs, targets


def _take(x: Any, sl: slice | int) -> Any:
    """Rows `sl` of a tensor or of every tensor in a dict (a batch slice)."""
    if isinstance(sl, int):
        sl = slice(sl, sl + 1)
    if isinstance(x, Tensor):
        return x[sl]
    if isinstance(x, dict):
        return {k: v[sl] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in x.items()}
    return x


# --------------------------------------------------------------------------------------------
# Labels and output gradients (shared by both backends)
# --------------------------------------------------------------------------------------------


def _labels(z: Tensor, inputs: Any, targets: Any, task: str) -> tuple[Tensor, Tensor | None]:
    """Labels per prediction and (causal_lm) which predictions count: [B] or [B, L-1]."""
    if task == "classification":
        if z.dim() != 2:
            raise MergeError(f"fisher: task='classification' needs logits [B, C], got {tuple(z.shape)}; "
                             "use task='causal_lm' for sequence logits")
        if not isinstance(targets, Tensor) or targets.shape != z.shape[:1]:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise MergeError(f"fisher: targets must be a tensor of shape {tuple(z.shape[:1])} "
                             f"(one class index per example), got {shape}")
        if targets.is_floating_point() or targets.is_complex():
            raise MergeError(f"fisher: targets must be integer class indices, got dtype {targets.dtype}")
        if len(targets) and (targets.min() < 0 or targets.max() >= z.shape[1]):
            raise MergeError(f"fisher: targets must lie in [0, {z.shape[1]}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        return targets.to(z.device), None
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise MergeError("fisher: task='causal_lm' needs inputs with integer input_ids of shape [B, L]")
    if z.dim() != 3 or z.shape[:2] != ids.shape:
        raise MergeError(f"fisher: causal_lm logits must be [B, L, V] = [{ids.shape[0]}, {ids.shape[1]}, V], "
                         f"got {tuple(z.shape)}")
    labels = ids
    if targets is not None:
        if not isinstance(targets, Tensor) or targets.shape != ids.shape:
            raise MergeError(f"fisher: causal_lm targets must be None or labels shaped like input_ids "
                             f"{tuple(ids.shape)}, got {getattr(targets, 'shape', type(targets).__name__)}")
        labels = targets
    labels = labels[:, 1:].to(z.device)
    valid = labels != -100
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is not None:
        mask = mask.to(z.device).bool()
        valid = valid & mask[:, :-1] & mask[:, 1:]
    return labels.clamp_min(0), valid


def _probs(z: Tensor, task: str) -> Tensor:
    z = z.detach()[:, :-1] if task == "causal_lm" else z.detach()
    return torch.softmax(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), -1)


def _draw(p: Tensor, n_samples: int, gen: torch.Generator) -> Tensor:
    """n_samples labels per prediction from p (inverse CDF of CPU-seeded uniforms): [S, *p.shape[:-1]]."""
    u = torch.rand((n_samples,) + p.shape[:-1], generator=gen, dtype=torch.float64)
    cdf = p.to(torch.float64).cumsum(-1)
    y = torch.searchsorted(cdf, u.movedim(0, -1).contiguous().to(p.device))
    return y.clamp_max(p.shape[-1] - 1).movedim(-1, 0)


def _minus_onehot(p: Tensor, y: Tensor) -> Tensor:
    """p - e_y: gradient of -log softmax(z)[y] w.r.t. the logits z."""
    minus_one = torch.full(y.shape + (1,), -1.0, dtype=p.dtype, device=p.device)
    return p.scatter_add(-1, y.unsqueeze(-1), minus_one)


def _output_grads(z: Tensor, p: Tensor, kind: str, labels: Tensor, valid: Tensor | None,
                  draws: Tensor | None) -> list[Tensor]:
    """Gradients of the summed per-example losses w.r.t. the logits, one per backward pass;
    the per-example squared parameter gradients of all passes add up to the estimator."""
    def full(d: Tensor) -> Tensor:
        if valid is None:
            return d.to(z.dtype)
        G = torch.zeros_like(z)
        G[:, :-1] = torch.where(valid.unsqueeze(-1), d, 0).to(z.dtype)
        return G

    if kind == "empirical":
        return [full(_minus_onehot(p, labels))]
    if kind == "mc":
        scale = 1 / math.sqrt(len(draws))
        return [full(_minus_onehot(p, y) * scale) for y in draws]
    C = p.shape[-1]  # exact: sum_c p_c g_c^2 = sum_c (sqrt(p_c) g_c)^2
    return [full(p[..., c:c + 1].sqrt() * _minus_onehot(p, torch.full_like(labels, c))) for c in range(C)]


# --------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------


def _hooks_batch(eng: HookEngine, inputs: Any, targets: Any, kind: str, task: str, n_samples: int,
                 gen: torch.Generator) -> None:
    z = eng.forward(inputs)
    labels, valid = _labels(z, inputs, targets, task)
    p = _probs(z, task)
    draws = _draw(p, n_samples, gen) if kind == "mc" else None
    for G in _output_grads(z, p, kind, labels, valid, draws):
        eng.backward(z, G)


def _loop_batch(model: nn.Module, chosen: dict[str, nn.Parameter], acc: dict[str, Tensor], inputs: Any,
                targets: Any, kind: str, task: str, n_samples: int, gen: torch.Generator) -> None:
    """Reference: one forward and backward pass per example (labels drawn from the batched forward,
    so a seed gives the same draws as the hooks backend)."""
    names, plist = list(chosen), list(chosen.values())
    draws = None
    if kind == "mc":
        with torch.no_grad():
            z = model_logits(model, inputs)
        _labels(z, inputs, targets, task)
        draws = _draw(_probs(z, task), n_samples, gen)
    for n in range(batch_size(inputs)):
        x_n, t_n = _take(inputs, n), _take(targets, n)
        z = model_logits(model, x_n)
        labels, valid = _labels(z, x_n, t_n, task)
        for G in _output_grads(z, _probs(z, task), kind, labels, valid,
                               None if draws is None else draws[:, n:n + 1]):
            grads = torch.autograd.grad(z, plist, G, retain_graph=True, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    g = g.to(acc[k].dtype)
                    acc[k] += g * g


def _batch_squared(model: nn.Module, chosen: dict[str, nn.Parameter], acc: dict[str, Tensor], inputs: Any,
                   targets: Any, task: str, backend: str) -> None:
    """acc += (grad of the batch-mean loss)^2; the loop backend forms it from per-example gradients."""
    names, plist = list(chosen), list(chosen.values())
    B = batch_size(inputs)
    if backend == "loop":
        total = {k: torch.zeros_like(a) for k, a in acc.items()}
        for n in range(B):
            x_n, t_n = _take(inputs, n), _take(targets, n)
            z = model_logits(model, x_n)
            labels, valid = _labels(z, x_n, t_n, task)
            (G,) = _output_grads(z, _probs(z, task), "empirical", labels, valid, None)
            for k, g in zip(names, torch.autograd.grad(z, plist, G, allow_unused=True)):
                if g is not None:
                    total[k] += g.to(total[k].dtype)
        grads = [total[k] / B for k in names]
    else:
        z = model_logits(model, inputs)
        labels, valid = _labels(z, inputs, targets, task)
        (G,) = _output_grads(z, _probs(z, task), "empirical", labels, valid, None)
        grads = torch.autograd.grad(z, plist, G / B, allow_unused=True)
    for k, g in zip(names, grads):
        if g is not None:
            g = g.to(acc[k].dtype)
            acc[k] += g * g
