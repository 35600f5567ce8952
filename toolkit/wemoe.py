"""WEMoE (Tang et al., ICML 2024): a weight-ensembling mixture of experts. NOT a single merged model:
its MLP weights depend on the input, and it keeps every task's MLP task vector.

Every parameter outside the MLPs is merged by task arithmetic, theta_0 + lam sum_t tau_t. Each MLP
(`MLPS`: a timm ViT block's `mlp.fc1`/`mlp.fc2`; a BERT layer's `intermediate.dense`/`output.dense`,
the router on `intermediate`'s input, the attention block's output) becomes

    MLP(x; W_0 + sum_t r_t(x) tau_t^MLP),   r(x) = mean over tokens of router(x),  router: C -> C -> T

with W_0 the pretrained MLP. The router's last layer starts at weight 0 and bias `init` (so at first
the MLP is task arithmetic with lam = init) and is trained at test time on unlabeled inputs by
minimising the entropy of each task's predictions (`adapt`). Each linear layer's output is
x W_b^T + b_b with W_b = W_0 + sum_t r_bt tau_W,t and b_b = b_0 + sum_t r_bt tau_b,t, formed per example.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MergeError
from .merge import task_arithmetic


class MoELinear(nn.Module):
    """A linear layer W_0 + sum_t r_t tau_t with r [B, T] set by the enclosing WEMoEMLP.

    Each example's weights W_b = W_0 + sum_t r_bt tau_t are formed once and applied to all its
    tokens: T + tokens multiply-adds per weight instead of (1 + T) tokens for every expert on every
    token; `chunk` bounds the memory of the per-example weights (elements at a time)."""

    chunk = 2 ** 24

    def __init__(self, base: nn.Linear, taus_w: Tensor, taus_b: Tensor | None):
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("taus_w", taus_w)  # [T, out, in]
        self.register_buffer("taus_b", taus_b)  # [T, out] or None
        self.r: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T = self.r.shape
        out_f, in_f = self.weight.shape
        xs = x.reshape(B, -1, in_f)  # [B, tokens, in]
        if xs.shape[1] == 1:  # one token per example: the experts' outputs, no per-example weights
            return self._one_token(xs[:, 0]).view(*x.shape[:-1], out_f)
        flat = self.taus_w.reshape(T, -1).to(x.dtype)
        per = max(1, self.chunk // self.weight.numel())
        ys = []
        for i in range(0, B, per):
            r = self.r[i:i + per].to(x.dtype)
            w = (r @ flat).view(-1, out_f, in_f) + self.weight  # [b, out, in]
            y = torch.bmm(xs[i:i + per], w.transpose(1, 2))
            if self.taus_b is not None:
                y = y + (r @ self.taus_b.to(x.dtype)).unsqueeze(1)
            ys.append(y if self.bias is None else y + self.bias)
        return torch.cat(ys).view(*x.shape[:-1], out_f)

    def _one_token(self, x: Tensor) -> Tensor:
        """x W_0^T + b_0 + sum_t r_t (x tau_W,t^T + tau_b,t) for x [B, in]: the same multiply-adds
        as forming W_b (T + 1 per weight and example) without materialising B weight matrices
        (BERT's last layer here computes the [CLS] token alone)."""
        B, T = self.r.shape
        r = self.r.to(x.dtype)
        experts = (x @ self.taus_w.to(x.dtype).reshape(-1, x.shape[1]).T).view(B, T, -1)  # [B, T, out]
        y = F.linear(x, self.weight, self.bias) + torch.einsum("bt,bto->bo", r, experts)
        return y if self.taus_b is None else y + r @ self.taus_b.to(x.dtype)


@dataclass(frozen=True)
class MLPSpec:
    """Where one architecture's MLP is inside a layer: `routed` (relative to the layer) is the
    module whose input feeds the router and which is wrapped; `linears` (relative to the layer)
    hold the MLP's weights, the first one's input width is the router's."""
    is_layer: Callable[[nn.Module], bool]
    routed: str
    linears: tuple[str, ...]


def _get(m: nn.Module, name: str) -> nn.Module | None:
    try:
        return m.get_submodule(name)
    except AttributeError:
        return None


def _linear(m: nn.Module, *names: str) -> bool:
    return all(isinstance(_get(m, n), nn.Linear) for n in names)


MLPS: dict[str, MLPSpec] = {
    "timm": MLPSpec(lambda m: _linear(m, "mlp.fc1", "mlp.fc2"), "mlp", ("mlp.fc1", "mlp.fc2")),
    # BertLayer: intermediate (dense, activation) and output (dense, dropout, LayerNorm of x + a)
    "bert": MLPSpec(lambda m: _get(m, "attention") is not None and _linear(m, "intermediate.dense", "output.dense"),
                    "intermediate", ("intermediate.dense", "output.dense")),
}


class WEMoEMLP(nn.Module):
    """The routed module of an MLP (timm: the whole `mlp`; BERT: `intermediate`) whose linear
    layers' weights are W_0 + sum_t r_t(x) tau_t, r from a router on this module's input.
    `linears` are the MLP's MoELinear layers, inside this module or beside it (BERT's
    output.dense): each forward sets their r."""

    def __init__(self, mlp: nn.Module, linears: Sequence[MoELinear], width: int, init: float = 0.3):
        super().__init__()
        T = len(linears[0].taus_w)
        self.mlp = mlp
        self._linears = list(linears)  # plain list: registered where they live, not here
        for p in self.mlp.parameters():  # anything else inside (norms) stays fixed
            p.requires_grad_(False)
        self.router = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, T))
        nn.init.zeros_(self.router[2].weight)
        nn.init.constant_(self.router[2].bias, init)
        self.fixed: Tensor | None = None  # set to a [T] vector to bypass the router (tests, ablations)

    def routing(self, x: Tensor) -> Tensor:
        """r [B, T]: the router's per-token weights averaged over the tokens of each example."""
        if self.fixed is not None:
            return self.fixed.to(x.dtype).expand(x.shape[0], -1)
        r = self.router(x)
        return r.mean(dim=tuple(range(1, x.dim() - 1))) if x.dim() > 2 else r

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing(x)
        for m in self._linears:
            m.r = r
        return self.mlp(x)


def mlp_layers(model: nn.Module) -> list[tuple[str, MLPSpec]]:
    """(module name, spec) of every layer whose MLP WEMoE replaces (`MLPS`)."""
    out = [(n, spec) for n, m in model.named_modules() for spec in MLPS.values() if spec.is_layer(m)]
    if not out:
        raise MergeError("WEMoE: the model has no `mlp` modules (timm ViT blocks' mlp.fc1/fc2, "
                         "BERT layers' intermediate.dense/output.dense)")
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build(model: nn.Module, base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], *,
          lam: float = 0.3, init: float = 0.3) -> nn.Module:
    """A WEMoE model: a copy of `model` with task arithmetic (lam) outside the MLPs and the MLP
    of every layer (`mlp_layers`) routed: each linear W_0 + sum_t r_t(x) tau_t (W_0 from `base`,
    tau_t from `models`), r from a router on the routed module's input. Inputs untouched."""
    if not models:
        raise MergeError("WEMoE: no models to merge")
    keys = set(base)
    for i, m in enumerate(models):
        if set(m) != keys:
            raise MergeError(f"WEMoE: model {i} has other keys than the base")
    out = copy.deepcopy(model)
    static = {k: task_arithmetic(b, [m[k] for m in models], [lam] * len(models)) if b.is_floating_point()
              else b.clone() for k, b in base.items()}
    out.load_state_dict(static)
    for name, spec in mlp_layers(out):
        p = f"{name}." if name else ""
        moes = []
        for lin_name in spec.linears:
            full = f"{p}{lin_name}"
            lin = out.get_submodule(full)
            lin.load_state_dict({k[len(full) + 1:]: v for k, v in base.items() if k.startswith(f"{full}.")})
            taus = {k: torch.stack([m[f"{full}.{k}"] - base[f"{full}.{k}"] for m in models])
                    for k in ("weight", "bias") if f"{full}.{k}" in base}
            moes.append(MoELinear(lin, taus["weight"], taus.get("bias")))
            _swap(out, full, moes[-1])
        routed = f"{p}{spec.routed}"
        _swap(out, routed, WEMoEMLP(out.get_submodule(routed), moes, moes[0].weight.shape[1], init))
    for n, prm in out.named_parameters():
        prm.requires_grad_(".router." in f".{n}")
    return out.eval()


def routers(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".router." in f".{n}"]


def adapt(model: nn.Module, heads: Sequence[nn.Module], unlabeled: Sequence[Iterable[Tensor]], *,
          steps: int, lr: float = 1e-3, progress: bool = False) -> list[float]:
    """Test-time training of the routers only: each step, for each task t, one batch of its
    unlabeled inputs (a tensor, or a dict of them: model(**x)), loss = sum_t mean entropy of
    softmax(head_t(model(x_t))); a head is any callable on the model's output. Returns the losses."""
    params = routers(model)
    if not params:
        raise MergeError("WEMoE: the model has no routers (build it with toolkit.wemoe.build)")
    if len(heads) != len(unlabeled):
        raise MergeError(f"WEMoE: {len(heads)} heads for {len(unlabeled)} unlabeled data sets")
    opt = torch.optim.Adam(params, lr=lr)
    its = [itertools.cycle(u) for u in unlabeled]
    losses = []
    model.train()
    for _ in range(steps):
        loss = 0.0
        for head, it in zip(heads, its):
            x = next(it)
            x = x[0] if isinstance(x, (tuple, list)) else x
            logp = F.log_softmax(head(model(**x) if isinstance(x, dict) else model(x)), -1)
            loss = loss + (-(logp.exp() * logp).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def extra_parameters(model: nn.Module) -> dict[str, int]:
    """What WEMoE keeps beyond one merged model: the MLP task vectors and the routers."""
    taus = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("taus_w", "taus_b")))
    return {"task_vectors": taus, "routers": sum(p.numel() for p in routers(model))}


def forward_flops(model: nn.Module, tokens: int) -> dict[str, int]:
    """Multiply-adds per example of the MLPs with T experts vs one merged MLP (tokens per example):
    per linear layer, forming W_b costs T out in and applying it tokens out in; plus the routers."""
    plain = moe = 0
    for m in model.modules():
        if isinstance(m, MoELinear):
            T, o, i = m.taus_w.shape
            plain += tokens * o * i
            moe += (tokens + T) * o * i
        elif isinstance(m, WEMoEMLP):
            moe += tokens * sum(l.in_features * l.out_features for l in m.router if isinstance(l, nn.Linear))
    return {"merged_mlp": plain, "wemoe_mlp": moe}

