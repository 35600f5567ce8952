"""Curvature backends: acc[name] += sum_k sum_n (d <z_n, G_kn> / d theta)^2, selectable by name.

`toolkit.curvature.fisher` forms the output gradients G_k (gradients of the summed per-example
losses w.r.t. the logits z: one for the empirical Fisher, one per sample for MC, one per class for
the exact Fisher) and hands them to a backend, which adds each example's squared parameter gradient:

    hooks     per-example squares inside batched backward passes (`toolkit.persample`); the default
    loop      one forward and backward pass per example: the reference
    vmap      torch.func.vmap(grad) over the examples (tensor or dict-of-tensor inputs)
    backpack  BackPACK (optional package backpack-for-pytorch) SumGradSquared, and DiagGGNExact for
              the exact Fisher of a classifier; only for the layers BackPACK supports

A backend is a class registered with `@register_backend(name)`: built per `fisher` call as
Backend(model, params, acc) and used as a context manager, with `forward(inputs) -> logits` and
`backward(inputs, logits, Gs)` for Gs [K, *logits.shape]; it may define `exact(inputs, logits)`
(the exact Fisher's sum without the K = C output gradients).
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .batch import batch_size, logits as model_logits, take
from .errors import MergeError
from .persample import CHUNK_ELEMS, HookEngine

BACKENDS: dict[str, type] = {}


class Backend(Protocol):
    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]): ...
    def __enter__(self) -> "Backend": ...
    def __exit__(self, *exc) -> None: ...
    def forward(self, inputs: Any) -> Tensor: ...
    def backward(self, inputs: Any, logits: Tensor, Gs: Tensor) -> None: ...


def register_backend(name: str):
    """Class decorator: make a backend selectable as fisher(..., backend=name)."""
    def deco(cls: type) -> type:
        BACKENDS[name] = cls
        cls.name = name
        return cls
    return deco


def get_backend(name: str) -> type:
    if name == "auto":
        name = "hooks"
    if name not in BACKENDS:
        raise MergeError(f"fisher: unknown backend {name!r}; choose one of {('auto', *BACKENDS)}")
    return BACKENDS[name]


def _add_squares(acc: dict[str, Tensor], names: list[str], grads) -> None:
    for k, g in zip(names, grads):
        if g is not None:
            g = g.to(acc[k].dtype)
            acc[k] += g * g


class _Plain:
    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]):
        self.model, self.params, self.acc = model, params, acc

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def forward(self, inputs: Any) -> Tensor:
        with torch.no_grad():
            return model_logits(self.model, inputs)


@register_backend("hooks")
class Hooks:
    """Per-example squares inside batched backward passes (see toolkit.persample)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]):
        self.engine = HookEngine(model, params, acc)

    def __enter__(self):
        self.engine.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__exit__(*exc)

    def forward(self, inputs: Any) -> Tensor:
        return self.engine.forward(inputs)

    def backward(self, inputs: Any, logits: Tensor, Gs: Tensor) -> None:
        if len(Gs) == 1:
            self.engine.backward(logits, Gs[0])
        else:
            self.engine.backward_many(logits, Gs)


@register_backend("loop")
class Loop(_Plain):
    """Reference: one forward and one backward pass per example and output gradient."""

    def backward(self, inputs: Any, logits: Tensor, Gs: Tensor) -> None:
        names, plist = list(self.params), list(self.params.values())
        for n in range(batch_size(inputs)):
            if not Gs[:, n].any():  # nothing counted in this example
                continue
            z = model_logits(self.model, take(inputs, n))
            for G in Gs[:, n:n + 1]:
                _add_squares(self.acc, names, torch.autograd.grad(z, plist, G.to(z.dtype), retain_graph=True,
                                                                  allow_unused=True))


@register_backend("vmap")
class Vmap(_Plain):
    """torch.func.vmap(grad(<z_n, G_n>)) over the examples, in chunks of examples."""

    def backward(self, inputs: Any, logits: Tensor, Gs: Tensor) -> None:
        from torch.func import functional_call, grad, vmap
        from torch.utils._pytree import tree_map

        model, names = self.model, list(self.params)
        p = {k: v.detach() for k, v in self.params.items()}

        def one(p, x, G):
            x = tree_map(lambda t: t.unsqueeze(0), x)
            z = model_logits(lambda *a, **kw: functional_call(model, p, a, kw, strict=False), x)
            return (z[0] * G).sum()

        chunk = max(1, CHUNK_ELEMS // max(1, sum(v.numel() for v in p.values())))
        f = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk)
        for G in Gs:
            try:
                g = f(p, inputs, G.to(logits.dtype))
            except Exception as e:  # noqa: BLE001 - torch.func raises many kinds
                raise MergeError(f"fisher: backend='vmap' cannot run this model ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); use backend='hooks' or 'loop'") from None
            for k in names:
                self.acc[k] += g[k].to(self.acc[k].dtype).square().sum(0)


_BP_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its extended copy


@register_backend("backpack")
class Backpack:
    """BackPACK on an extended copy of the model (kept per model, weights refreshed per call)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, Tensor]):
        try:
            import backpack
        except ImportError:
            raise MergeError("fisher: backend='backpack' needs the optional package backpack-for-pytorch "
                             "(pip install backpack-for-pytorch)") from None
        self.bp, self.acc = backpack, acc
        if model not in _BP_COPIES:
            _BP_COPIES[model] = backpack.extend(copy.deepcopy(model))
        self.copy = _BP_COPIES[model]
        self.copy.load_state_dict(model.state_dict())
        self.copy.train(model.training)
        for a, b in zip(self.copy.modules(), model.modules()):
            a.training = b.training
        mine = dict(self.copy.named_parameters())
        self.params = {k: mine[k] for k in params}
        for k, p in self.copy.named_parameters():
            p.requires_grad_(k in self.params)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.copy.zero_grad(set_to_none=True)

    def forward(self, inputs: Any) -> Tensor:
        return model_logits(self.copy, inputs)

    def _run(self, ext, attr: str, loss: Tensor) -> None:
        from backpack.extensions import DiagGGNExact, SumGradSquared  # noqa: F401
        self.copy.zero_grad(set_to_none=True)
        with self.bp.backpack(ext, retain_graph=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            loss.backward(retain_graph=True)
        for k, p in self.params.items():
            v = getattr(p, attr, None)
            if v is None:
                if p.grad is not None:
                    raise MergeError(f"fisher: backend='backpack' does not support the layer of {k!r}; "
                                     "use backend='hooks'")
                continue
            self.acc[k] += v.to(self.acc[k].dtype)
            delattr(p, attr)

    def backward(self, inputs: Any, logits: Tensor, Gs: Tensor) -> None:
        from backpack.extensions import SumGradSquared
        for G in Gs:
            self._run(SumGradSquared(), "sum_grad_squared", (logits * G.to(logits.dtype)).sum())

    def exact(self, inputs: Any, logits: Tensor) -> None:
        """DiagGGNExact of the summed cross-entropy: N times the exact Fisher, for any labels."""
        from backpack.extensions import DiagGGNExact
        if logits.dim() != 2:
            raise MergeError("fisher: backend='backpack' computes kind='exact' only for classifiers")
        loss = self.bp.extend(nn.CrossEntropyLoss(reduction="sum"))
        self._run(DiagGGNExact(), "diag_ggn_exact", loss(logits, logits.detach().argmax(-1)))
