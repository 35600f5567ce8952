"""WEMoE (Tang et al., ICML 2024): a weight-ensembling mixture of experts. NOT a single merged model:
its MLP weights depend on the input, and it keeps every task's MLP task vector.

Every parameter outside the MLPs is merged by task arithmetic, theta_0 + lam sum_t tau_t. Each MLP
(timm ViT blocks' `mlp`: fc1, activation, fc2) becomes

    MLP(x; W_0 + sum_t r_t(x) tau_t^MLP),   r(x) = mean over tokens of router(x),  router: C -> C -> T

with W_0 the pretrained MLP. The router's last layer starts at weight 0 and bias `init` (so at first
the MLP is task arithmetic with lam = init) and is trained at test time on unlabeled inputs by
minimising the entropy of each task's predictions (`adapt`). Each linear layer's output is
x W_b^T + b_b with W_b = W_0 + sum_t r_bt tau_W,t and b_b = b_0 + sum_t r_bt tau_b,t, formed per example.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable, Mapping, Sequence

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


class WEMoEMLP(nn.Module):
    """An MLP whose weights are W_0 + sum_t r_t(x) tau_t, r from a router on the MLP's input."""

    def __init__(self, mlp: nn.Module, taus: Sequence[Mapping[str, Tensor]], init: float = 0.3):
        super().__init__()
        T = len(taus)
        self.mlp = copy.deepcopy(mlp)
        for name, lin in list(self.mlp.named_children()):
            if isinstance(lin, nn.Linear):
                tw = torch.stack([t[f"{name}.weight"] for t in taus])
                tb = torch.stack([t[f"{name}.bias"] for t in taus]) if lin.bias is not None else None
                setattr(self.mlp, name, MoELinear(lin, tw, tb))
        for p in self.mlp.parameters():  # anything else inside (norms) stays fixed
            p.requires_grad_(False)
        C = mlp.fc1.in_features
        self.router = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, T))
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
        for m in self.mlp.modules():
            if isinstance(m, MoELinear):
                m.r = r
        return self.mlp(x)


def mlp_names(model: nn.Module) -> list[str]:
    """Module names of the MLPs WEMoE replaces: modules named `mlp` with Linear fc1 and fc2."""
    out = [n for n, m in model.named_modules()
           if n.split(".")[-1] == "mlp" and isinstance(getattr(m, "fc1", None), nn.Linear)
           and isinstance(getattr(m, "fc2", None), nn.Linear)]
    if not out:
        raise MergeError("WEMoE: the model has no `mlp` modules with fc1/fc2 (timm ViT blocks)")
    return out


def build(model: nn.Module, base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], *,
          lam: float = 0.3, init: float = 0.3) -> nn.Module:
    """A WEMoE model: a copy of `model` with task arithmetic (lam) outside the MLPs and a
    WEMoEMLP per MLP (pretrained MLP from `base`, task vectors from `models`). Inputs untouched."""
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
    for name in mlp_names(out):
        p = f"{name}."
        mlp = out.get_submodule(name)
        mlp.load_state_dict({k[len(p):]: v for k, v in base.items() if k.startswith(p)})
        taus = [{k[len(p):]: m[k] - base[k] for k in base if k.startswith(p)} for m in models]
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, WEMoEMLP(mlp, taus, init))
    for n, prm in out.named_parameters():
        prm.requires_grad_(".router." in f".{n}")
    return out.eval()


def routers(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".router." in f".{n}"]


def adapt(model: nn.Module, heads: Sequence[nn.Module], unlabeled: Sequence[Iterable[Tensor]], *,
          steps: int, lr: float = 1e-3, progress: bool = False) -> list[float]:
    """Test-time training of the routers only: each step, for each task t, one batch of its
    unlabeled inputs, loss = sum_t mean entropy of softmax(head_t(model(x_t))). Returns the losses."""
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
            logp = F.log_softmax(head(model(x)), -1)
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

