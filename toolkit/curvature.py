"""Diagonal Fisher estimators: the per-example mean Fisher F_t that the merge uses as H_t = N_t F_t.

    exact:         F = 1/N sum_n sum_y p(y|x_n) g_ny^2            (g_ny = grad log p(y|x_n))
    mc:            F = 1/N sum_n 1/S sum_s g_{n,y_s}^2, y_s ~ p(y|x_n)   (the paper's estimator)
    empirical:     F = 1/N sum_n g_{n,y_n}^2                      (true labels)
    batch_squared: F = 1/K sum_batches (1/B sum_{n in batch} g_{n,y_n})^2  (MergeLM/FusionBench)

Every kind is a sum of per-example squared gradients of -log p(y|x) for some labels y, so all
of them come from one routine: pick the gradient of the loss w.r.t. the logits (p - e_y, scaled),
then hand them to a backend (`toolkit.backends`): one backward pass per example ("loop", the
reference), batched backward passes whose layer hooks form the per-example squares ("hooks",
`toolkit.persample`, the default), torch.func ("vmap") or BackPACK ("backpack").
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backends import BACKENDS, get_backend  # noqa: F401 (BACKENDS: the names fisher accepts)
from .batch import batch_size, logits as model_logits, take as _take
from .errors import MergeError

KINDS = ("exact", "mc", "empirical", "batch_squared")
TASKS = ("classification", "causal_lm")
PER = ("sequence", "token")


class FisherDiag(dict):
    """{state_dict name: F} and the counts behind the mean: `n` (its denominator: examples, or
    counted tokens for per="token"; use it as N_t), `n_examples` (examples with at least one counted
    prediction), `n_tokens` (counted next-token predictions, causal_lm; else None)."""
    n: int
    n_examples: int
    n_tokens: int | None


def fisher(model: nn.Module, batches: Iterable[tuple[Any, Any]], kind: str = "mc", *,
           n_samples: int = 1, backend: str = "auto", task: str = "classification", per: str = "sequence",
           params: Callable[[str], bool] | Sequence[str] | None = None, seed: int = 0,
           progress: bool = True, max_examples: int | None = None,
           tokens_per_sequence: int | None = None) -> FisherDiag:
    """Diagonal Fisher of `model` on `batches`, the MEAN over examples (multiply by N for H_t).

    kind: "exact" (classification only), "mc" (n_samples labels drawn from the model per example,
    or per token for causal_lm; seeded), "empirical" (true labels), "batch_squared" (square of the
    gradient of each batch's MEAN loss with true labels, averaged over batches: what MergeLM and
    FusionBench compute; it is biased and about batch-size times too small, kept for comparison).
    task: "classification" (logits [B, C], targets [B]) or "causal_lm" (inputs with input_ids and
    optional attention_mask, logits [B, L, V], next-token targets; targets None, or HF-style labels
    [B, L] with -100 ignored). per (causal_lm): "sequence" (default; one example = one sequence,
    F = 1/N sum_n (sum_t g_nt)^2 over the N sequences with a counted token) or "token" (every counted
    next-token prediction is an example, F = 1/T sum_nt g_nt^2 over the T counted tokens; one
    batched backward pass per token position, so about L times the cost). tokens_per_sequence
    (per="token"): average over at most this many counted tokens per sequence, drawn at random
    (seeded), instead of all of them: an unbiased estimate of the same mean at a fraction of the
    cost (each backward pass takes one drawn token of every sequence). The result's `.n` is N or T
    (all counted tokens, drawn or not): use it as N_t.
    backend: a name in toolkit.backends.BACKENDS: "hooks"/"auto" (per-example squares inside
    batched backward passes; the exact Fisher's C output gradients in one batched pass), "loop"
    (reference), "vmap", "backpack" (optional package).
    params: a name filter or a list of names; a tied parameter is kept if any of its names passes.
    Returns a FisherDiag {state_dict name: F} for each selected trainable parameter under every
    alias, float32 (float64 for float64 parameters). The model is in eval mode meanwhile; nothing of
    it changes. Non-finite logits (e.g. NaN inputs) raise MergeError.

    Hooks backend, what is fast and what is checked: per-example rules for nn.Linear, Conv1d/2d,
    Embedding, LayerNorm, RMSNorm (and look-alikes that pass a first-call output check), GroupNorm,
    BatchNorm1d/2d/3d; leading-dim-1 parameters broadcast over the batch (ViT cls_token, pos_embed)
    by a batch-expanded copy p + z, as are layer outputs shared by the batch (position embeddings of
    ids [1, L]). Checked once per model and selection on a batch of >= 2 examples
    (one extra backward pass): where each layer's examples lie (dim 0, dim 1 as in sequence-first
    attention, or flattened [B*L, D]) and that each hooked parameter's per-example gradient equals
    the true one (fails for weights also used outside their layer, e.g. a `h @ emb.weight.T` head).
    Everything else, and whatever fails the check (one warning naming it), gets a per-example loop
    of backward passes; parameters the logits do not depend on are skipped (zeros).
    """
    _check_options(kind, task, per, n_samples, max_examples, tokens_per_sequence)
    Backend = get_backend(backend)
    chosen, aliases = select_params(model, params)
    acc = {k: torch.zeros_like(p, dtype=_acc_dtype(p)) for k, p in chosen.items()}
    gen = torch.Generator().manual_seed(seed)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    rows = examples = tokens = drawn = n_batches = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with torch.enable_grad(), Backend(model, chosen, acc) as be:
            for i, batch in enumerate(tqdm(batches, desc=f"fisher ({kind})", total=total, disable=not progress)):
                inputs, targets = _unpack(batch)
                B = batch_size(inputs)
                if max_examples is not None:
                    if rows >= max_examples:
                        break
                    if rows + B > max_examples:
                        B = max_examples - rows
                        inputs, targets = _take(inputs, slice(0, B)), _take(targets, slice(0, B))
                rows += B
                if B == 0:
                    continue
                if kind == "batch_squared":
                    counted = _batch_squared(model, chosen, acc, inputs, targets, task, backend == "loop", i)
                    n_batches += counted > 0
                    examples += counted
                    continue
                z = be.forward(inputs)
                _finite(z, i)
                labels, valid = _labels(z, inputs, targets, task)
                examples += B if valid is None else int(valid.any(1).sum())
                tokens += 0 if valid is None else int(valid.sum())
                if kind == "exact" and hasattr(be, "exact"):
                    be.exact(inputs, z)
                    continue
                p = _probs(z, task)
                draws = _draw(p, n_samples, gen) if kind == "mc" else None
                Gs = _output_grads(z, p, kind, labels, valid, draws)
                if per == "token":
                    slots = _token_slots(valid, tokens_per_sequence, gen)
                    drawn += sum(len(s) for s in slots)
                    for chunk in _per_token(Gs, slots):
                        be.backward(inputs, z, chunk)
                else:
                    be.backward(inputs, z, Gs)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    n = n_batches if kind == "batch_squared" else tokens if per == "token" else examples
    mean_over = drawn if per == "token" else n
    if n == 0:
        raise MergeError("fisher: no examples: the batches were empty" + (
            " or had no counted token (all padding or -100 labels, or length 1)" if task == "causal_lm" else ""))
    out = FisherDiag()
    for k, v in acc.items():
        if not torch.isfinite(v).all():
            raise MergeError(f"fisher: the Fisher of {k!r} is not finite (overflow in the squared gradients)")
        v = v / mean_over
        for j, a in enumerate(aliases[k]):
            out[a] = v if j == 0 else v.clone()
    out.n, out.n_examples, out.n_tokens = n, examples, tokens if task == "causal_lm" else None
    return out


def _finite(z: Tensor, i: int) -> None:
    if not torch.isfinite(z).all():
        raise MergeError(f"fisher: the model's outputs on batch {i} are not finite (NaN or inf in the inputs "
                         "or the weights)")


def _token_slots(valid: Tensor, per_sequence: int | None, gen: torch.Generator) -> list[Tensor]:
    """Per sequence, the counted positions whose squared gradients are taken: all of them, or
    `per_sequence` drawn without replacement (CPU-seeded)."""
    slots = []
    for row in valid.cpu():
        pos = row.nonzero().flatten()
        if per_sequence is not None and len(pos) > per_sequence:
            pos = pos[torch.randperm(len(pos), generator=gen)[:per_sequence]].sort().values
        slots.append(pos)
    return slots


def _per_token(Gs: Tensor, slots: Sequence[Tensor]) -> Iterable[Tensor]:
    """The output gradients split into single-token parts: part j keeps, of every sequence b, only
    its j-th position slots[b][j], so one batched backward pass gives each sequence's squared
    gradient of one token's loss. Yielded in chunks [K * parts, ...] of bounded size."""
    parts = max((len(s) for s in slots), default=0)
    step = max(1, 2**24 // max(1, Gs.numel()))
    for i in range(0, parts, step):
        js = range(i, min(parts, i + step))
        out = Gs.new_zeros((len(js),) + Gs.shape)
        for j, part in enumerate(js):
            for b, pos in enumerate(slots):
                if part < len(pos):
                    t = int(pos[part])
                    out[j, :, b, t] = Gs[:, b, t]
        yield out.flatten(0, 1)


# --------------------------------------------------------------------------------------------
# Validation and parameter selection
# --------------------------------------------------------------------------------------------


def _check_options(kind: str, task: str, per: str, n_samples: int, max_examples: int | None,
                   tokens_per_sequence: int | None = None) -> None:
    if kind not in KINDS:
        raise MergeError(f"fisher: unknown kind {kind!r}; choose one of {KINDS}")
    if task not in TASKS:
        raise MergeError(f"fisher: unknown task {task!r}; choose one of {TASKS}")
    if per not in PER:
        raise MergeError(f"fisher: unknown per {per!r}; choose one of {PER}")
    if per == "token" and (task != "causal_lm" or kind == "batch_squared"):
        raise MergeError("fisher: per='token' is for task='causal_lm' with kind='mc' or 'empirical'")
    if kind == "exact" and task != "classification":
        raise MergeError("fisher: kind='exact' sums over every label and is only for "
                         "task='classification'; for causal_lm use kind='mc' or 'empirical'")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise MergeError(f"fisher: n_samples must be a positive integer, got {n_samples!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or isinstance(max_examples, bool)
                                     or max_examples < 1):
        raise MergeError(f"fisher: max_examples must be a positive integer or None, got {max_examples!r}")
    if tokens_per_sequence is not None:
        if per != "token":
            raise MergeError("fisher: tokens_per_sequence is for per='token'")
        if not isinstance(tokens_per_sequence, int) or isinstance(tokens_per_sequence, bool) \
                or tokens_per_sequence < 1:
            raise MergeError(f"fisher: tokens_per_sequence must be a positive integer or None, "
                             f"got {tokens_per_sequence!r}")


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


# --------------------------------------------------------------------------------------------
# Labels and output gradients (shared by every backend)
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
                  draws: Tensor | None) -> Tensor:
    """Gradients of the summed per-example losses w.r.t. the logits, stacked [K, *z.shape]; the
    per-example squared parameter gradients of all K add up to the estimator."""
    def full(d: Tensor) -> Tensor:
        if valid is None:
            return d.to(z.dtype)
        G = torch.zeros_like(z)
        G[:, :-1] = torch.where(valid.unsqueeze(-1), d, 0).to(z.dtype)
        return G

    if kind == "empirical":
        return full(_minus_onehot(p, labels)).unsqueeze(0)
    if kind == "mc":
        scale = 1 / math.sqrt(len(draws))
        return torch.stack([full(_minus_onehot(p, y) * scale) for y in draws])
    # exact: sum_c p_c g_c^2 = sum_c (sqrt(p_c) (p - e_c))^2, the C square-root factors of the
    # softmax Hessian diag(p) - p p^T
    C = p.shape[-1]
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    return full(p.sqrt().T.unsqueeze(-1) * (p.unsqueeze(0) - eye.unsqueeze(1)))


# --------------------------------------------------------------------------------------------
# The squared batch gradient
# --------------------------------------------------------------------------------------------


def _batch_squared(model: nn.Module, chosen: dict[str, nn.Parameter], acc: dict[str, Tensor], inputs: Any,
                   targets: Any, task: str, loop: bool, i: int) -> int:
    """acc += (grad of the batch-mean loss)^2, the mean over the examples with a counted prediction;
    the loop backend forms it from per-example gradients. Returns that number of examples."""
    names, plist = list(chosen), list(chosen.values())
    z = model_logits(model, inputs)
    _finite(z, i)
    labels, valid = _labels(z, inputs, targets, task)
    counted = batch_size(inputs) if valid is None else int(valid.any(1).sum())
    if counted == 0:
        return 0
    (G,) = _output_grads(z, _probs(z, task), "empirical", labels, valid, None)
    if loop:
        total = {k: torch.zeros_like(a) for k, a in acc.items()}
        for n in range(batch_size(inputs)):
            if not G[n].any():
                continue
            z_n = model_logits(model, _take(inputs, n))
            for k, g in zip(names, torch.autograd.grad(z_n, plist, G[n:n + 1], allow_unused=True)):
                if g is not None:
                    total[k] += g.to(total[k].dtype)
        grads = [total[k] / counted for k in names]
    else:
        grads = torch.autograd.grad(z, plist, G / counted, allow_unused=True)
    for k, g in zip(names, grads):
        if g is not None:
            g = g.to(acc[k].dtype)
            acc[k] += g * g
    return counted
