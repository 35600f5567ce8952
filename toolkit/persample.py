"""Sums of per-example squared gradients, sum_n (dl_n/dtheta)^2, built layer by layer inside ONE
backward pass (the "hooks" backend of `toolkit.curvature.fisher`).

For a layer y = f(x; W) the per-example gradient of W depends only on the layer input x_n and the
output gradient g_n = dl_n/dy_n, e.g. nn.Linear: dW_n = sum_t g_nt x_nt^T, so for 2-D inputs
sum_n dW_n^2 = (g^2)^T (x^2) is one matmul. A forward hook stores x and puts a tensor hook on y;
the tensor hook turns (x, g) into squared per-example gradients while the backward pass runs, so
the whole model's per-example gradients never exist at once. Covered: nn.Linear, nn.Conv1d/2d
(unfold), nn.LayerNorm, nn.Embedding, nn.RMSNorm, and look-alikes (subclasses with their own
forward such as timm's LayerNorm; RMSNorm classes such as transformers' LlamaRMSNorm) once their
first output matches the rule's formula. Other parameters: leading-dim-1 tensors broadcast over the
batch (ViT cls_token, pos_embed) are replaced by p + z with z = 0 of shape [B, ...], so z.grad
holds their per-example gradients; anything else gets a per-example loop of backward passes
through the batched graph, over just those parameters.

Assumes examples do not interact in the forward pass (true in eval mode) and that a covered
layer's parameters are used only through that layer's forward.
"""
from __future__ import annotations

import weakref
from collections import Counter
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .batch import batch_size, logits as model_logits

CHUNK_ELEMS = 2**24  # per-example gradients formed at most this many numbers at a time
_Z_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> z names that passed
_LOOKS_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # look-alike layer -> passed its check


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


def linear_sq(m: nn.Linear, x: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    """2-D inputs: sum_n (g_n x_n^T)^2 = (g^2)^T (x^2), one matmul; else None (use chunks)."""
    if x.dim() != 2:
        return None
    g2 = g * g
    out = {"weight": g2.T @ (x * x)}
    if m.bias is not None:
        out["bias"] = g2.sum(0)
    return out


def conv_grads(m: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """dW_n = g_n unfold(x_n)^T per group (im2col); padding done first exactly as the layer does."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    k, d, s = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if isinstance(m, nn.Conv1d):
        x, g, k, d, s = x.unsqueeze(2), g.unsqueeze(2), (1,) + k, (1,) + d, (1,) + s
    B, G = x.shape[0], m.groups
    cols = F.unfold(x, k, dilation=d, stride=s)  # [B, C*kh*kw, L]
    cols = cols.reshape(B, G, cols.shape[1] // G, cols.shape[2])
    g = g.reshape(B, G, g.shape[1] // G, -1)
    out = {"weight": torch.einsum("bgol,bgil->bgoi", g, cols).reshape(B, *m.weight.shape)}
    if m.bias is not None:
        out["bias"] = g.sum(-1).reshape(B, -1)
    return out


def layernorm_grads(m: nn.LayerNorm, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """y = xhat * w + b: dw_n = sum_t g_nt xhat_nt, db_n = sum_t g_nt."""
    xhat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
    red = tuple(range(1, x.dim() - len(m.normalized_shape)))
    out = {}
    if m.weight is not None:
        out["weight"] = (g * xhat).sum(red) if red else g * xhat
    if m.bias is not None:
        out["bias"] = g.sum(red) if red else g
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


def rms_xhat(m: nn.Module, x: Tensor) -> Tensor:
    eps = getattr(m, "eps", None)
    eps = getattr(m, "variance_epsilon", eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-m.weight.dim(), 0))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


def rmsnorm_grads(m: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """y = w * x / rms(x): dw_n = sum_t g_nt xhat_nt."""
    red = tuple(range(1, x.dim() - m.weight.dim()))
    gx = g * rms_xhat(m, x)
    return {"weight": gx.sum(red) if red else gx}


# module type -> (per-example grads, optional fast sum of squares)
RULES: dict[type, tuple[Callable, Callable | None]] = {
    nn.Linear: (linear_grads, linear_sq),
    nn.Conv1d: (conv_grads, None),
    nn.Conv2d: (conv_grads, None),
    nn.LayerNorm: (layernorm_grads, None),
    nn.Embedding: (embedding_grads, embedding_sq),
    nn.RMSNorm: (rmsnorm_grads, None),
}


def _rms_like(m: nn.Module) -> bool:
    """Duck-typed RMSNorm (e.g. transformers' LlamaRMSNorm): one weight vector, an eps."""
    own = dict(m.named_parameters(recurse=False))
    return (type(m).__name__.endswith("RMSNorm") and list(own) == ["weight"]
            and (hasattr(m, "eps") or hasattr(m, "variance_epsilon")))


def rule_for(m: nn.Module) -> tuple[tuple[Callable, Callable | None], Callable | None] | None:
    """(rule, reference) for a covered layer, or None. reference(m, x) is the output the rule
    assumes; given for look-alike classes, whose first output must match it before they count."""
    for cls, rule in RULES.items():
        if isinstance(m, cls):
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
                return None
            return rule, (None if type(m).forward is cls.forward else cls.forward)
    if _rms_like(m):
        return RULES[nn.RMSNorm], rms_reference
    return None


def rms_reference(m: nn.Module, x: Tensor) -> Tensor:
    """w * x / rms(x), normalised in at least float32 as transformers does."""
    return m.weight * rms_xhat(m, x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def squared_sum(m: nn.Module, rule: tuple[Callable, Callable | None], x: Tensor, g: Tensor
                ) -> dict[str, Tensor]:
    """sum_n (per-example grad)^2 per parameter of `m`, chunked over examples to bound memory."""
    grads, fast = rule
    if fast is not None and (out := fast(m, x, g)) is not None:
        return out
    numel = sum(p.numel() for p in m.parameters(recurse=False))
    step = max(1, CHUNK_ELEMS // max(numel, 1))
    out: dict[str, Tensor] = {}
    for i in range(0, x.shape[0], step):
        for k, v in grads(m, x[i:i + step], g[i:i + step]).items():
            s = (v.square_() if v._base is None else v * v).sum(0)  # in place when not a view of x or g
            out[k] = out[k] + s if k in out else s
    return out


# --------------------------------------------------------------------------------------------
# The engine: hooks on covered layers, the z trick, and the per-example loop fallback
# --------------------------------------------------------------------------------------------


class HookEngine:
    """Adds sum_n g_n^2 into `acc[name]` for each backward(logits, G) call; use as a context manager.

    G is the gradient of the summed per-example losses w.r.t. the logits, so that each example's
    share of it yields that example's gradient.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]):
        self.model, self.params, self.acc = model, params, acc
        self.acc_dtype = {k: v.dtype for k, v in acc.items()}
        ids = {id(p): k for k, p in params.items()}
        self.layers: dict[nn.Module, tuple[tuple, dict[str, str]]] = {}
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
        self.zchecked = set(self.zparams) <= _Z_CHECKED.get(model, set())
        self.handles: list = []
        self.on = False

    def __enter__(self) -> "HookEngine":
        self.handles = [m.register_forward_hook(self._forward_hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # forward -------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> Tensor:
        """Hooked forward of the batch; leading-dim-1 parameters replaced by p + z."""
        self.calls: Counter = Counter()
        self.dummy = torch.zeros((), requires_grad=True, device=next(iter(self.params.values())).device)
        self.z = {}
        if self.zparams:
            B = batch_size(inputs)
            self.z = {k: torch.zeros((B,) + self.params[k].shape[1:], dtype=self.params[k].dtype,
                                     device=self.params[k].device, requires_grad=True)
                      for k in self.zparams}
            over = {k: self.params[k] + z for k, z in self.z.items()}
            call = lambda *a, **kw: functional_call(self.model, over, a, kw)  # noqa: E731
            try:
                return model_logits(call, inputs)
            except (RuntimeError, ValueError, IndexError):  # model cannot take a batch-expanded copy
                self.loop += self.zparams
                self.zparams, self.z, self.calls = [], {}, Counter()
        return model_logits(self.model, inputs)

    def _forward_hook(self, m: nn.Module, args: tuple, out: Any) -> Any:
        if not isinstance(out, Tensor) or not out.requires_grad or not args:
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
        for k in own.values():
            self.calls[k] += 1
        out = out + self.dummy.to(out.dtype)  # adds 0; puts every hooked output on the path to `dummy`
        out.register_hook(partial(self._tensor_hook, m, x))
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
    def _tensor_hook(self, m: nn.Module, x: Tensor, g: Tensor) -> None:
        if not self.on:
            return
        rule, own = self.layers[m]
        mine = {a: k for a, k in own.items() if k in self.hookable and self.calls[k] > 0}
        if not mine:
            return
        dt = self.acc_dtype[next(iter(mine.values()))]
        x = x.to(dt) if x.is_floating_point() else x
        g = g.detach().to(dt)
        if all(self.calls[k] == 1 for k in mine.values()):
            for a, v in squared_sum(m, rule, x, g).items():
                if a in mine:
                    self.acc[mine[a]] += v
        else:  # a parameter used by several calls (tied weights): square the per-example SUM later
            for a, k in mine.items():
                self.deferred.setdefault(k, []).append((m, rule, a, x, g))

    def _add_deferred(self) -> None:
        """sum_n (sum over calls of g_n)^2 for shared parameters, chunked over examples."""
        for k, calls in self.deferred.items():
            B = calls[0][3].shape[0]
            step = max(1, CHUNK_ELEMS // self.params[k].numel())
            for i in range(0, B, step):
                total = sum(rule[0](m, x[i:i + step], g[i:i + step])[a] for m, rule, a, x, g in calls)
                self.acc[k] += total.square_().sum(0)
        self.deferred = {}

    def backward(self, logits: Tensor, G: Tensor) -> None:
        """One backward pass of the per-example losses with output gradient G: acc += sum_n g_n^2."""
        self.deferred: dict[str, list] = {}
        zs = list(self.z.values())
        self.on = True
        try:
            got = torch.autograd.grad(logits, [self.dummy] + zs, G, retain_graph=True, allow_unused=True)
        finally:
            self.on = False
        self._add_deferred()
        zgrads = dict(zip(self.z, got[1:]))
        if zgrads and not self.zchecked:
            self._check_z(zgrads, logits, G)
        for k, v in zgrads.items():
            if k in self.zparams and v is not None:
                v = v.to(self.acc_dtype[k])
                self.acc[k] += (v * v).sum(0, keepdim=True)
        idle = [k for k in self.hookable if self.calls[k] == 0 and k not in self.loop]  # layer not called
        self._loop(self.loop + idle, logits, G)

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
            for k, g in zip(names, self._example_grads(names, logits, G, n)):
                g = g.to(self.acc_dtype[k])
                self.acc[k] += g * g

    def _check_z(self, zgrads: dict[str, Tensor], logits: Tensor, G: Tensor) -> None:
        """Once per model: z.grad of the last example must equal that example's gradient of p
        (through the batched graph; catches models that index or reduce p over its first dim)."""
        names, n = list(zgrads), G.shape[0] - 1
        if n == 0:  # one example: nothing to mix up, check on a later batch
            return
        for k, ref in zip(names, self._example_grads(names, logits, G, n)):
            zg = zgrads[k]
            got = torch.zeros_like(ref) if zg is None else zg[n:n + 1]
            tol = 1e-4 * float(ref.abs().max()) + 1e-30
            if k in self.zparams and not torch.allclose(got, ref, rtol=1e-4, atol=tol):
                self.zparams.remove(k)
                self.loop.append(k)
        self.zchecked = True
        _Z_CHECKED[self.model] = _Z_CHECKED.get(self.model, set()) | set(self.zparams)
