"""Sums of per-example squared gradients, sum_n (dl_n/dtheta)^2, built layer by layer inside ONE
backward pass (the "hooks" backend of `toolkit.curvature.fisher`).

For a layer y = f(x; W) the per-example gradient of W depends only on the layer input x_n and the
output gradient g_n = dl_n/dy_n, e.g. nn.Linear: dW_n = sum_t g_nt x_nt^T, so for 2-D inputs
sum_n dW_n^2 = (g^2)^T (x^2) is one matmul. A forward hook stores x and puts a tensor hook on y;
the tensor hook turns (x, g) into squared per-example gradients while the backward pass runs, so
the whole model's per-example gradients never exist at once.

Fast rules: nn.Linear, nn.Conv1d/2d (a matmul per kernel offset), nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
nn.BatchNorm1d/2d/3d (running or batch statistics: y = xhat w + b, dw_n = sum g_n xhat_n), and
look-alikes (subclasses with their own forward such as timm's LayerNorm; RMSNorm classes such as
transformers' LlamaRMSNorm) once their first output matches the rule's formula. Leading-dim-1
tensors broadcast over the batch (ViT cls_token, pos_embed) are replaced by p + z with z = 0 of
shape [B, ...], so z.grad holds their per-example gradients; likewise a covered layer's output
shared by the whole batch (leading dim 1, e.g. position embeddings of position ids [1, L]) is
expanded to one copy per example (once per model the logits are checked to be unchanged). Anything else gets a per-example loop
of backward passes through the batched graph, over just those parameters; parameters the logits do
not depend on are skipped.

Checked, once per model and parameter selection, on the first batch of two or more examples: one
backward pass of a random output gradient for the last example alone. Each hooked layer's input must
hold the B examples on dimension 0, or on dimension 1 (sequence-first, `batch_first=False`), or
flattened into dimension 0 ([B*L, D], example-major or token-major): the layout is read off where
that gradient is non-zero, and a layer where it is none of these falls back to the loop. Then each
hooked parameter's per-example gradient from its rule must equal the true gradient of that pass
(catches a parameter also used outside its module, e.g. a tied head `h @ emb.weight.T`, layers that
mix examples, and a broadcast parameter the z trick gets wrong); a mismatch falls back to the loop.
Each fallback warns once, naming the layer or parameter. The values are never partial.
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .batch import batch_size, logits as model_logits

CHUNK_ELEMS = 2**24  # per-example gradients formed at most this many numbers at a time
BATCHED_ELEMS = 2**26  # output gradients held at once by a batched backward (exact, several samples)
LAYOUTS = ("first", "second", "flat", "flat_t")
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {selection: Probe}
_LOOKS_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # look-alike layer -> passed its check
_BATCHED_FAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> vmap backward failed
_EXPAND_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> expanding shared outputs is safe


class Rule(NamedTuple):
    """prep(m, x): what grads/sq use instead of x (e.g. the normalised input); grads(m, x, g):
    per-example grads {attr: [B, *shape]}; sq(m, x, g): sum_n grads^2 directly, or None;
    many(m, x, gs): sum_k sum_n grads(x, gs[k])^2 for K output gradients gs [K, B, ...]."""
    grads: Callable
    sq: Callable | None = None
    prep: Callable | None = None
    many: Callable | None = None


# --------------------------------------------------------------------------------------------
# Per-layer rules: (module, input x, output grad g) -> per-example grads {attr: [B, *shape]}
# --------------------------------------------------------------------------------------------


def linear_grads(m: nn.Linear, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """dW_n = sum_t g_nt x_nt^T, db_n = sum_t g_nt (t runs over any sequence dims)."""
    B = x.shape[0]
    x, g = x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
    out = {"weight": torch.bmm(g.transpose(1, 2), x)}
    if m.bias is not None:
        out["bias"] = g.sum(1)
    return out


def linear_sq(m: nn.Linear, x: Tensor, g: Tensor, g2: Tensor | None = None) -> dict[str, Tensor] | None:
    """2-D inputs: sum_n (g_n x_n^T)^2 = (g^2)^T (x^2), one matmul; else None (use chunks).
    g2, if given, replaces g^2 (the sum of g^2 over several output gradients)."""
    if x.dim() != 2:
        return None
    g2 = g * g if g2 is None else g2
    out = {"weight": g2.T @ (x * x)}
    if m.bias is not None:
        out["bias"] = g2.sum(0)
    return out


def linear_many(m: nn.Linear, x: Tensor, gs: Tensor) -> dict[str, Tensor]:
    """K output gradients at once: 2-D inputs (sum_k g_k^2)^T x^2; else one einsum per chunk of
    examples, sum_kn (sum_t g_knt x_nt^T)^2."""
    if x.dim() == 2:
        return linear_sq(m, x, None, (gs * gs).sum(0))
    K, B = gs.shape[0], x.shape[0]
    x, gs = x.reshape(B, -1, x.shape[-1]), gs.reshape(K, B, -1, gs.shape[-1])
    step = max(1, CHUNK_ELEMS // max(1, K * m.weight.numel()))
    out = {"weight": 0}
    for i in range(0, B, step):
        out["weight"] = out["weight"] + torch.einsum("kbto,bti->kboi", gs[:, i:i + step], x[i:i + step]
                                                     ).square_().sum((0, 1))
    if m.bias is not None:
        out["bias"] = gs.sum(2).square().sum((0, 1))
    return out


def _conv_weight(m: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example dW_n = sum over output positions of g_n times the input patch, as one batched
    matmul per kernel offset over strided views of the padded input (no im2col copy):
    [*lead, B, *weight.shape], and g summed over positions [*lead, B, C_out]. g [*lead, B, C_out, ...]."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    k, d, s = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if isinstance(m, nn.Conv1d):
        x, g, k, d, s = x.unsqueeze(2), g.unsqueeze(-2), (1,) + k, (1,) + d, (1,) + s
    B, G, (Ho, Wo) = x.shape[0], m.groups, g.shape[-2:]
    lead = g.shape[:-4]
    K = math.prod(lead)
    x = x.reshape(B, G, -1, *x.shape[2:])
    g = g.reshape(K, B, G, -1, Ho * Wo)
    gk = g.permute(1, 2, 0, 3, 4).reshape(B, G, -1, Ho * Wo) if K > 1 else g[0]  # K folded into O
    out = None
    for p in range(k[0]):
        for q in range(k[1]):
            xs = x[..., p * d[0]:p * d[0] + (Ho - 1) * s[0] + 1:s[0], q * d[1]:q * d[1] + (Wo - 1) * s[1] + 1:s[1]]
            v = torch.matmul(gk, xs.reshape(B, G, -1, Ho * Wo).transpose(-1, -2))  # [B, G, K*O/G, I/G]
            if out is None:
                out = v.new_empty(*v.shape, *k)
            out[..., p, q] = v
    out = out.reshape(B, G, K, -1, *out.shape[3:]).permute(2, 0, 1, 3, 4, 5, 6) if K > 1 else out.unsqueeze(0)
    return out.reshape(*lead, B, *m.weight.shape), g.sum(-1).reshape(*lead, B, -1)


def conv_grads(m: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """dW_n = sum_l g_nl patch_nl^T per group, db_n = sum_l g_nl (l: output positions)."""
    w, b = _conv_weight(m, x, g)
    return {"weight": w, "bias": b} if m.bias is not None else {"weight": w}


def conv_many(m: nn.Conv1d | nn.Conv2d, x: Tensor, gs: Tensor) -> dict[str, Tensor]:
    """K output gradients gs [K, B, ...] at once, chunked over examples."""
    K, B = gs.shape[0], x.shape[0]
    step = max(1, CHUNK_ELEMS // max(1, K * m.weight.numel()))
    out: dict[str, Tensor] = {}
    for i in range(0, B, step):
        w, b = _conv_weight(m, x[i:i + step], gs[:, i:i + step])
        parts = {"weight": w.square_().sum((0, 1))}
        if m.bias is not None:
            parts["bias"] = b.square_().sum((0, 1))
        for a, v in parts.items():
            out[a] = out[a] + v if a in out else v
    return out


def embedding_grads(m: nn.Embedding, ids: Tensor, g: Tensor) -> dict[str, Tensor]:
    """dW_n[v] = sum of g_nt over the positions t where token v occurs (row padding_idx stays 0)."""
    B, V, D = ids.shape[0], m.num_embeddings, m.embedding_dim
    keys = (torch.arange(B, device=ids.device)[:, None] * V + ids.reshape(B, -1)).flatten()
    out = g.new_zeros(B * V, D).index_add_(0, keys, g.reshape(-1, D)).reshape(B, V, D)
    if m.padding_idx is not None:
        out[:, m.padding_idx] = 0
    return {"weight": out}


def embedding_sq(m: nn.Embedding, ids: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Sparse: sum the rows per (example, token) pair, square, scatter into [V, D]."""
    B, V, D = ids.shape[0], m.num_embeddings, m.embedding_dim
    keys = (torch.arange(B, device=ids.device)[:, None] * V + ids.reshape(B, -1)).flatten()
    uniq, inv = keys.unique(return_inverse=True)
    rows = g.new_zeros(len(uniq), D).index_add_(0, inv, g.reshape(-1, D))
    out = g.new_zeros(V, D).index_add_(0, uniq % V, rows * rows)
    if m.padding_idx is not None:
        out[m.padding_idx] = 0
    return {"weight": out}


# Normalisation layers, y = xhat * w + b with xhat formed in the forward hook (`prep`): the
# per-example gradients are sums of g * xhat and of g over the dimensions w does not span.


def _affine(m: nn.Module, xhat: Tensor, g: Tensor, red: tuple[int, ...]) -> dict[str, Tensor]:
    out = {}
    if getattr(m, "weight", None) is not None:
        out["weight"] = (g * xhat).sum(red) if red else g * xhat
    if getattr(m, "bias", None) is not None:
        out["bias"] = g.sum(red) if red else g
    return out


def trailing_grads(m: nn.Module, xhat: Tensor, g: Tensor) -> dict[str, Tensor]:
    """LayerNorm, RMSNorm (w over the last dims): dw_n = sum_t g_nt xhat_nt, db_n = sum_t g_nt."""
    return _affine(m, xhat, g, tuple(range(1, xhat.dim() - m.weight.dim())))


def channel_grads(m: nn.Module, xhat: Tensor, g: Tensor) -> dict[str, Tensor]:
    """BatchNorm, GroupNorm (w over channels, dim 1): sums over the positions, dims 2 and on."""
    return _affine(m, xhat, g, tuple(range(2, xhat.dim())))


def layernorm_xhat(m: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, m.normalized_shape, eps=m.eps)


def groupnorm_xhat(m: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x, m.num_groups, eps=m.eps)


def batchnorm_xhat(m: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + eps) per channel: running statistics in eval mode, else the batch's
    (biased variance, as the layer normalises; the running statistics are not touched)."""
    use_batch = m.training or m.running_mean is None
    rm = None if use_batch else m.running_mean.to(x.dtype)
    rv = None if use_batch else m.running_var.to(x.dtype)
    return F.batch_norm(x, rm, rv, training=use_batch, eps=m.eps)


def rms_xhat(m: nn.Module, x: Tensor) -> Tensor:
    eps = getattr(m, "eps", None)
    eps = getattr(m, "variance_epsilon", eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-m.weight.dim(), 0))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


_BN = nn.modules.batchnorm._BatchNorm
# module type -> rule
RULES: dict[type, Rule] = {
    nn.Linear: Rule(linear_grads, linear_sq, many=linear_many),
    nn.Conv1d: Rule(conv_grads, many=conv_many),
    nn.Conv2d: Rule(conv_grads, many=conv_many),
    nn.Embedding: Rule(embedding_grads, embedding_sq),
    nn.LayerNorm: Rule(trailing_grads, prep=layernorm_xhat),
    nn.RMSNorm: Rule(trailing_grads, prep=rms_xhat),
    nn.GroupNorm: Rule(channel_grads, prep=groupnorm_xhat),
    _BN: Rule(channel_grads, prep=batchnorm_xhat),
}


def _rms_like(m: nn.Module) -> bool:
    """Duck-typed RMSNorm (e.g. transformers' LlamaRMSNorm): one weight vector, an eps."""
    own = dict(m.named_parameters(recurse=False))
    return (type(m).__name__.endswith("RMSNorm") and list(own) == ["weight"]
            and (hasattr(m, "eps") or hasattr(m, "variance_epsilon")))


def rule_for(m: nn.Module) -> tuple[Rule, Callable | None] | None:
    """(rule, reference) for a covered layer, or None. reference(m, x) is the output the rule
    assumes; given for look-alike classes, whose first output must match it before they count."""
    for cls, rule in RULES.items():
        if isinstance(m, cls):
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
                return None
            own = type(m).forward is cls.forward or (cls is _BN and type(m).forward is _BN.forward)
            if not own and cls is _BN and m.training:  # its reference would update running stats
                return None
            return rule, (None if own else cls.forward)
    if _rms_like(m):
        return RULES[nn.RMSNorm], rms_reference
    return None


def rms_reference(m: nn.Module, x: Tensor) -> Tensor:
    """w * x / rms(x), normalised in at least float32 as transformers does."""
    return m.weight * rms_xhat(m, x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def squared_sum(m: nn.Module, rule: Rule, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """sum_n (per-example grad)^2 per parameter of `m`, chunked over examples to bound memory."""
    if rule.sq is not None and (out := rule.sq(m, x, g)) is not None:
        return out
    numel = sum(p.numel() for p in m.parameters(recurse=False))
    step = max(1, CHUNK_ELEMS // max(numel, 1))
    out: dict[str, Tensor] = {}
    for i in range(0, x.shape[0], step):
        for k, v in rule.grads(m, x[i:i + step], g[i:i + step]).items():
            s = (v.square_() if v._base is None else v * v).sum(0)  # in place when not a view of x or g
            out[k] = out[k] + s if k in out else s
    return out


def squared_sum_many(m: nn.Module, rule: Rule, x: Tensor, gs: Tensor) -> dict[str, Tensor]:
    """sum_k sum_n (per-example grad for output gradient gs[k])^2."""
    if rule.many is not None:
        return rule.many(m, x, gs)
    out: dict[str, Tensor] = {}
    for g in gs:
        for a, v in squared_sum(m, rule, x, g).items():
            out[a] = out[a] + v if a in out else v
    return out


# --------------------------------------------------------------------------------------------
# Where the examples are in a layer's input: dim 0, dim 1 (sequence-first) or flattened into dim 0
# --------------------------------------------------------------------------------------------


def fits(layout: str, shape: torch.Size, B: int) -> bool:
    if layout == "first":
        return len(shape) >= 1 and shape[0] == B
    if layout == "second":
        return len(shape) >= 2 and shape[1] == B
    return len(shape) >= 1 and shape[0] > B and shape[0] % B == 0  # flat, flat_t


def examples(t: Tensor, layout: str, B: int) -> Tensor:
    """t with the B examples on dimension 0: [B, ...]."""
    if layout == "first":
        return t
    if layout == "second":
        return t.movedim(1, 0)
    if layout == "flat":  # [B*L, ...], example-major
        return t.reshape(B, -1, *t.shape[1:])
    return t.reshape(-1, B, *t.shape[1:]).movedim(1, 0)  # flat_t: [L*B, ...], token-major


def find_layout(x_shape: torch.Size, g: Tensor | None, B: int, n: int) -> str | None:
    """The layout under which the output gradient g of example n's loss alone is zero outside
    example n (None: no candidate fits)."""
    cands = [lay for lay in LAYOUTS if fits(lay, x_shape, B) and (g is None or fits(lay, g.shape, B))]
    scale = 0.0 if g is None else float(g.abs().max())
    if scale == 0:  # no signal here; the value check decides
        return cands[0] if cands else None
    for lay in cands:
        ge = examples(g, lay, B)
        rest = max(float(ge[:n].abs().max()) if n else 0.0, float(ge[n + 1:].abs().max()) if n + 1 < B else 0.0)
        if rest <= 1e-6 * scale:
            return lay
    return None


def reachable(t: Tensor, params: list[Tensor]) -> set[int]:
    """ids of the leaf tensors among `params` that t's autograd graph reaches."""
    want, found, seen = {id(p) for p in params}, set(), set()
    stack = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        v = getattr(fn, "variable", None)
        if v is not None and id(v) in want:
            found.add(id(v))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


# --------------------------------------------------------------------------------------------
# The engine: hooks on covered layers, the z trick, the check, and the per-example loop fallback
# --------------------------------------------------------------------------------------------


class Probe(NamedTuple):
    """What the check found for one model and parameter selection."""
    layouts: dict  # module -> layout
    loop: frozenset  # parameter names that must go through the loop
    no_z: frozenset  # leading-dim-1 parameters the z trick gets wrong


class HookEngine:
    """Adds sum_n g_n^2 into `acc[name]` for each backward(logits, G) call; use as a context manager.

    G is the gradient of the summed per-example losses w.r.t. the logits, so that each example's
    share of it yields that example's gradient; backward_many(logits, Gs) does the same for a
    stack of K output gradients [K, *logits.shape] in one batched backward pass.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]):
        self.model, self.params, self.acc = model, params, acc
        self.acc_dtype = {k: v.dtype for k, v in acc.items()}
        ids = {id(p): k for k, p in params.items()}
        self.layers: dict[nn.Module, tuple[Rule, dict[str, str]]] = {}
        self.names = {m: name for name, m in model.named_modules()}
        self.pending: dict[nn.Module, Callable] = {}  # look-alike layers, checked on first call
        unsafe: set[str] = set()  # held by a layer we have no rule for
        for m in model.modules():
            own = {a: ids[id(p)] for a, p in m.named_parameters(recurse=False) if id(p) in ids}
            if not own:
                continue
            found = rule_for(m)
            if found is None:
                unsafe.update(own.values())
                continue
            self.layers[m] = (found[0], own)
            if found[1] is not None and not _LOOKS_OK.get(m, False):
                self.pending[m] = found[1]
        self.hookable = {k for _, own in self.layers.values() for k in own.values()} - unsafe
        rest = [k for k in params if k not in self.hookable]
        self.zparams = [k for k in rest if params[k].dim() >= 2 and params[k].shape[0] == 1]
        self.loop = [k for k in rest if k not in self.zparams]
        self.key = frozenset(params)
        self.probe: Probe | None = _PROBED.get(model, {}).get(self.key)
        if self.probe is not None:
            self._apply(self.probe)
        self.handles: list = []
        self.hooking = self.expand = False
        self.mode: str | None = None  # None (hooks idle), "acc" (accumulate), "probe" (record g)

    def __enter__(self) -> "HookEngine":
        self.handles = [m.register_forward_hook(self._forward_hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _apply(self, probe: Probe) -> None:
        self.hookable -= probe.loop
        self.zparams = [k for k in self.zparams if k not in probe.no_z]
        self.loop += [k for k in sorted(probe.loop | probe.no_z) if k not in self.loop]

    # forward -------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> Tensor:
        """Hooked forward of the batch; leading-dim-1 parameters replaced by p + z."""
        self.B = batch_size(inputs)
        self.dummy = torch.zeros((), requires_grad=True, device=next(iter(self.params.values())).device)
        self.z = {}
        if self.zparams:
            self.z = {k: torch.zeros((self.B,) + self.params[k].shape[1:], dtype=self.params[k].dtype,
                                     device=self.params[k].device, requires_grad=True)
                      for k in self.zparams}
            over = {k: self.params[k] + z for k, z in self.z.items()}
            call = lambda *a, **kw: functional_call(self.model, over, a, kw)  # noqa: E731
            try:
                return self._reached(self._run(call, inputs))
            except (RuntimeError, ValueError, IndexError):  # model cannot take a batch-expanded copy
                self.loop += self.zparams
                self.zparams, self.z = [], {}
        return self._reached(self._run(self.model, inputs))

    def _run(self, call: Callable, inputs: Any) -> Tensor:
        """The hooked forward; layer outputs shared by the whole batch are expanded to one copy per
        example, once verified (on the model's first such forward) to leave the logits unchanged."""
        expand = _EXPAND_OK.get(self.model, True)
        for attempt in (expand, False) if expand else (False,):
            self.calls, self.records, self.relayout, self.expand, self.expanded = Counter(), [], False, attempt, False
            self.hooking = True  # the forward hooks act only inside forward()
            try:
                logits = model_logits(call, inputs)
            except (RuntimeError, ValueError, IndexError):
                if not self.expanded:
                    raise
                logits = None
            finally:
                self.hooking = False
            if not self.expanded or self.model in _EXPAND_OK:
                return logits
            ok = logits is not None
            if ok:
                with torch.no_grad():
                    ref = model_logits(self.model, inputs)
                tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(ref.dtype, 1e-2)
                ok = ref.shape == logits.shape and bool(torch.allclose(
                    logits.detach(), ref, rtol=tol, atol=tol * float(ref.abs().max())))
            _EXPAND_OK[self.model] = ok
            if ok:
                return logits
        raise AssertionError("unreachable")

    def _reached(self, logits: Tensor) -> Tensor:
        """Note which looped or idle parameters the logits depend on at all (the rest get zeros)."""
        maybe = [k for k in self.params if k in self.loop or (k in self.hookable and self.calls[k] == 0)]
        hit = reachable(logits, [self.params[k] for k in maybe]) if maybe else set()
        self.unused = {k for k in maybe if id(self.params[k]) not in hit}
        return logits

    def _forward_hook(self, m: nn.Module, args: tuple, out: Any) -> Any:
        if not self.hooking or not isinstance(out, Tensor) or not out.requires_grad or not args:
            return None
        rule, own = self.layers[m]
        x = args[0].detach()
        if m in self.pending:
            _LOOKS_OK[m] = self._matches(out, m, x, self.pending.pop(m))
            if not _LOOKS_OK[m]:
                self.hookable -= set(own.values())
                self.loop += [k for k in own.values() if k not in self.loop]
        if not self.hookable & set(own.values()):
            return None
        if (self.expand and self.B > 1 and x.shape[:1] == out.shape[:1] == (1,)
                and not (x.dim() > 1 and x.shape[1] == self.B)):  # shared by the batch, e.g. positions [1, L]
            x, out = x.expand(self.B, *x.shape[1:]), out.expand(self.B, *out.shape[1:])
            self.expanded = True
        if self.probe is not None:
            lay = self.probe.layouts.get(m)
            if lay is None or not (fits(lay, x.shape, self.B) and fits(lay, out.shape, self.B)):
                self.relayout = True  # not called when checked, or its shapes contradict the layout: check again
        for k in own.values():
            self.calls[k] += 1
        x = x.to(self._dtype(m)) if x.is_floating_point() else x
        if rule.prep is not None:
            with torch.no_grad():
                x = rule.prep(m, x)
        self.records.append((m, x, out))  # out itself: later in-place ops change only what we return
        out = out + self.dummy.to(out.dtype)  # adds 0; puts every hooked output on the path to `dummy`
        out.register_hook(partial(self._tensor_hook, len(self.records) - 1))
        return out

    @staticmethod
    def _matches(out: Tensor, m: nn.Module, x: Tensor, reference: Callable) -> bool:
        """Does a look-alike layer compute what its rule assumes? (checked on its first call)"""
        with torch.no_grad():
            ref = reference(m, x)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(out.dtype, 1e-2)
        out = out.detach()
        atol = tol * float(out.abs().max())
        return out.shape == ref.shape and torch.allclose(out, ref, rtol=tol, atol=atol)

    # backward ------------------------------------------------------------------------------
    def _mine(self, m: nn.Module) -> dict[str, str]:
        own = self.layers[m][1]
        return {a: k for a, k in own.items() if k in self.hookable and self.calls[k] > 0}

    def _tensor_hook(self, cid: int, g: Tensor) -> None:
        if self.mode is None:
            return
        if self.mode == "probe":
            self.probe_g[cid] = g.detach()
            return
        self._take(cid, g)

    def _take(self, cid: int, g: Tensor, many: bool = False) -> None:
        """Add one layer call's share: squares now, or deferred for parameters used by several calls.
        many: g holds K output gradients [K, ...] (only for layers called once)."""
        m, x, _ = self.records[cid]
        mine = self._mine(m)
        if not mine:
            return
        rule, lay, dt = self.layers[m][0], self.probe.layouts.get(m, "first"), self._dtype(m)
        xe = examples(x, lay, self.B)
        if many:
            g = g.detach().to(dt)
            gs = g if lay == "first" else torch.stack([examples(gk, lay, self.B) for gk in g])
            got = squared_sum_many(m, rule, xe, gs)
        elif all(self.calls[k] == 1 for k in mine.values()):
            got = squared_sum(m, rule, xe, examples(g.detach().to(dt), lay, self.B))
        else:  # a parameter used by several calls (tied weights): square the per-example SUM later
            ge = examples(g.detach().to(dt), lay, self.B)
            for a, k in mine.items():
                self.deferred.setdefault(k, []).append((m, rule, a, xe, ge))
            return
        for a, v in got.items():
            if a in mine:
                self.acc[mine[a]] += v

    def _dtype(self, m: nn.Module) -> torch.dtype:
        """Accumulation dtype of a layer (float32, or float64 for float64 parameters)."""
        return self.acc_dtype[next(iter(self.layers[m][1].values()))]

    def _add_deferred(self) -> None:
        """sum_n (sum over calls of g_n)^2 for shared parameters, chunked over examples."""
        for k, calls in self.deferred.items():
            step = max(1, CHUNK_ELEMS // self.params[k].numel())
            for i in range(0, self.B, step):
                total = sum(rule.grads(m, x[i:i + step], g[i:i + step])[a] for m, rule, a, x, g in calls)
                self.acc[k] += total.square_().sum(0)
        self.deferred = {}

    def _ready(self, logits: Tensor) -> bool:
        """Run the check if this batch needs it; False for a one-example batch (then exact by
        squaring the batch gradient)."""
        if self.probe is None or self.relayout:
            if self.B < 2:
                return False
            self._check(logits)
        return True

    def backward(self, logits: Tensor, G: Tensor) -> None:
        """One backward pass of the per-example losses with output gradient G: acc += sum_n g_n^2."""
        if not self._ready(logits):
            return self._single(logits, G)
        self.deferred: dict[str, list] = {}
        zs = list(self.z.values())
        self.mode = "acc"
        try:
            got = torch.autograd.grad(logits, [self.dummy] + zs, G, retain_graph=True, allow_unused=True)
        finally:
            self.mode = None
        self._add_deferred()
        self._add_z(dict(zip(self.z, got[1:])))
        self._loop(self._looped(), logits, G)

    def backward_many(self, logits: Tensor, Gs: Tensor) -> None:
        """backward(logits, G) for each G in Gs [K, *logits.shape], as batched backward passes
        (torch.autograd.grad with is_grads_batched) over chunks of the K output gradients."""
        if len(Gs) == 1 or not self._ready(logits) or _BATCHED_FAILS.get(self.model, False):
            for G in Gs:
                self.backward(logits, G)
            return
        live = [cid for cid, (m, _, _) in enumerate(self.records) if self._mine(m)]
        outs = [self.records[cid][2] for cid in live]
        zs = [z for k, z in self.z.items() if k in self.zparams]
        per = sum(o.numel() for o in outs) + sum(z.numel() for z in zs) + logits.numel()
        step = max(1, BATCHED_ELEMS // max(per, 1))
        for i in range(0, len(Gs), step):
            chunk = Gs[i:i + step]
            try:
                got = torch.autograd.grad(logits, outs + zs, chunk, retain_graph=True, allow_unused=True,
                                          is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one pass per output gradient
                _BATCHED_FAILS[self.model] = True
                for G in Gs[i:]:
                    self.backward(logits, G)
                return
            shared = set()
            for cid, g in zip(live, got):
                if g is not None and not self._once(cid):
                    shared.add(cid)
                elif g is not None:
                    self._take(cid, g, many=True)
            for c in range(len(chunk) if shared else 0):
                self.deferred = {}
                for cid, g in zip(live, got):
                    if cid in shared:
                        self._take(cid, g[c])
                self._add_deferred()
            self._add_z({k: None if g is None else g.flatten(0, 1)  # [K * B, ...]
                         for k, g in zip([k for k in self.z if k in self.zparams], got[len(outs):])})
            for G in chunk:
                self._loop(self._looped(), logits, G)

    def _once(self, cid: int) -> bool:
        """Are this call's parameters used by this call only?"""
        return all(self.calls[k] == 1 for k in self._mine(self.records[cid][0]).values())

    def _add_z(self, zgrads: dict[str, Tensor | None]) -> None:
        for k, v in zgrads.items():
            if k in self.zparams and v is not None:
                v = v.to(self.acc_dtype[k])
                self.acc[k] += (v * v).sum(0, keepdim=True)

    def _looped(self) -> list[str]:
        """Parameters for the per-example loop: no rule, failed the check, or their layer idle."""
        idle = [k for k in self.hookable if self.calls[k] == 0 and k not in self.loop]
        return [k for k in self.loop + idle if k not in self.unused]

    def _single(self, logits: Tensor, G: Tensor) -> None:
        """One example: its gradient is the batch gradient; square it."""
        names = [k for k in self.params if k not in self.unused]
        gs = torch.autograd.grad(logits, [self.params[k] for k in names], G, retain_graph=True, allow_unused=True)
        for k, g in zip(names, gs):
            if g is not None:
                g = g.to(self.acc_dtype[k])
                self.acc[k] += g * g

    def _example_grads(self, names: list[str], logits: Tensor, G: Tensor, n: int) -> list[Tensor]:
        Gn = torch.zeros_like(G)
        Gn[n] = G[n]
        gs = torch.autograd.grad(logits, [self.params[k] for k in names], Gn, retain_graph=True,
                                 allow_unused=True)
        return [torch.zeros_like(self.params[k]) if g is None else g for k, g in zip(names, gs)]

    def _loop(self, names: list[str], logits: Tensor, G: Tensor) -> None:
        """Fallback: one backward pass per example through the batched graph, just for `names`."""
        if not names:
            return
        for n in range(G.shape[0]):
            if not G[n].any():
                continue
            for k, g in zip(names, self._example_grads(names, logits, G, n)):
                g = g.to(self.acc_dtype[k])
                self.acc[k] += g * g

    # the check -----------------------------------------------------------------------------
    def _check(self, logits: Tensor) -> None:
        """One backward pass of a random output gradient for the last example alone: find each
        hooked layer's layout, then compare every hooked and z-trick parameter's per-example
        gradient with the true one. Failures go to the loop, each with one warning."""
        B, n = self.B, self.B - 1
        gen = torch.Generator().manual_seed(0)
        Gn = torch.zeros_like(logits)
        Gn[n] = torch.randn(logits.shape[1:], generator=gen, dtype=torch.float64).to(logits)
        hooked = [k for k in self.params if k in self.hookable and self.calls[k] > 0]
        zs = [k for k in self.zparams if k in self.z]
        self.probe_g: dict[int, Tensor] = {}
        self.mode = "probe"
        try:
            got = torch.autograd.grad(logits, [self.params[k] for k in hooked] + [self.z[k] for k in zs], Gn,
                                      retain_graph=True, allow_unused=True)
        finally:
            self.mode = None
        true = {k: torch.zeros_like(self.params[k]) if g is None else g for k, g in zip(hooked, got)}
        layouts: dict[nn.Module, str | None] = {}
        for cid, (m, x, out) in enumerate(self.records):
            lay = find_layout(x.shape, self.probe_g.get(cid), B, n)
            layouts[m] = lay if layouts.get(m, lay) == lay else None  # calls of one module must agree
        loop: set[str] = set()
        for m, lay in layouts.items():
            if lay is None and self._mine(m):
                shape = next(tuple(x.shape) for mm, x, _ in self.records if mm is m)
                self._warn(f"layer {self.names.get(m, '?')!r} ({type(m).__name__}), input {shape}: one "
                           f"example's gradient is not confined to that example's rows, whether the {B} examples "
                           "are on dimension 0, 1 or flattened into 0 (another layout, or a later layer that "
                           "mixes examples such as BatchNorm in training mode); its parameters go through "
                           "the per-example loop")
                loop.update(self._mine(m).values())
        mine = {}  # name -> per-example gradient of example n from the rules
        for cid, (m, x, out) in enumerate(self.records):
            lay = layouts[m]
            if lay is None:
                continue
            g = self.probe_g.get(cid, torch.zeros_like(out))
            xe, ge = examples(x, lay, B)[n:n + 1], examples(g, lay, B)[n:n + 1].to(self._dtype(m))
            for a, v in self.layers[m][0].grads(m, xe, ge).items():
                k = self._mine(m).get(a)
                if k is not None and k not in loop:
                    mine[k] = mine[k] + v[0] if k in mine else v[0]
        scale = max((float(v.abs().max()) for v in true.values() if v.numel()), default=0.0)
        for k in hooked:
            if k not in loop and not _close(mine.get(k, torch.zeros_like(true[k])), true[k], scale):
                owner = next((self.names.get(m, "?") for m, (_, own) in self.layers.items() if k in own.values()), "?")
                self._warn(f"parameter {k!r}: the per-example gradients its layer {owner!r} sees do not add up to "
                           "its gradient (it is also used outside that layer, e.g. a tied `h @ emb.weight.T` "
                           "head, or the layer mixes examples); it goes through the per-example loop")
                loop.add(k)
        no_z = set()
        ztrue = self._example_grads(zs, logits, Gn, n) if zs else []
        for k, zg, ref in zip(zs, got[len(hooked):], ztrue):
            if not _close(torch.zeros_like(ref) if zg is None else zg[n:n + 1], ref):
                no_z.add(k)
        old = self.probe or Probe({}, frozenset(), frozenset())
        self.probe = Probe({**old.layouts, **{m: lay for m, lay in layouts.items() if lay is not None}},
                           frozenset(loop) | old.loop, frozenset(no_z) | old.no_z)
        _PROBED.setdefault(self.model, {})[self.key] = self.probe
        self._apply(self.probe)
        self.relayout = False

    @staticmethod
    def _warn(msg: str) -> None:
        warnings.warn(f"fisher (hooks backend): {msg}", stacklevel=6)


def _close(got: Tensor, ref: Tensor, scale: float = 0.0) -> bool:
    """got == ref up to the dtype's tolerance, relative to ref's largest entry or, for a gradient
    that is zero up to rounding (an attention key bias, whose shift the softmax cancels), to
    `scale`, the largest gradient entry of the whole pass, times the tolerance."""
    tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(ref.dtype, 5e-2)
    got = got.to(ref.dtype)
    floor = max(float(ref.abs().max()), tol * scale)
    return bool(torch.allclose(got, ref, rtol=tol, atol=tol * floor + 1e-30))
