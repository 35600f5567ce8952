"""Weight Scope Alignment (Xu, Li, Gan, Zhan, 2024): keep every layer's weight distribution ("scope")
where the other models' are, so that averaging-based merges combine like with like.

A layer's weights W (n entries, any tensor with >= 2 dims) are taken as N(mu, sigma^2) with
mu = mean W, sigma^2 = mean (W - mu)^2. During fine-tuning the regulariser

    R = sum_l KL(N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2))
      = sum_l [log(sigma*_l / sigma_l) + (sigma_l^2 + (mu_l - mu*_l)^2) / (2 sigma*_l^2) - 1/2]

pulls each scope toward a target (here: the base model's scope), with gradient
dR/dW = (mu - mu*) / (n sigma*^2) + (sigma / sigma*^2 - 1 / sigma) (W - mu) / (n sigma).
`attached` applies it inside any training loop (gradient hooks).
Fusion: several models' scopes become one, the scope of all their weights pooled (mean of the
means; variance = mean of sigma^2 + mu^2 minus the pooled mean squared), the target of a
next stage; `align` moves a model's layers onto a scope exactly (W -> mu* + sigma* (W - mu) / sigma).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .errors import MergeError

Scope = dict[str, tuple[float, float]]  # layer name -> (mu, sigma)


def is_layer(name: str, t: Tensor) -> bool:
    """Weights that get a scope: float tensors with >= 2 dims (linear and convolution weights)."""
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 1


def scope(sd: Mapping[str, Tensor]) -> Scope:
    """(mu, sigma) of every layer weight of a state dict (population standard deviation)."""
    out = {k: (float(v.detach().mean()), float(v.detach().std(correction=0))) for k, v in sd.items() if is_layer(k, v)}
    if not out:
        raise MergeError("scope: no layer weights (float tensors with >= 2 dims) in the state dict")
    return out


def regulariser(params: Mapping[str, Tensor], target: Scope) -> Tensor:
    """R = sum_l KL(N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2)) over the layers in `target` (differentiable)."""
    missing = [k for k in target if k not in params]
    if missing:
        raise MergeError(f"scope: the target names layers the model lacks, e.g. {missing[:3]}")
    total = None
    for k, (mu_t, sd_t) in target.items():
        if sd_t <= 0:
            raise MergeError(f"scope: target sigma of {k!r} must be > 0, got {sd_t}")
        w = params[k]
        mu = w.mean()
        sd = ((w - mu) ** 2).mean().sqrt()
        kl = math.log(sd_t) - torch.log(sd) + (sd ** 2 + (mu - mu_t) ** 2) / (2 * sd_t ** 2) - 0.5
        total = kl if total is None else total + kl
    return total


def regulariser_grad(params: Mapping[str, Tensor], target: Scope) -> dict[str, Tensor]:
    """dR/dW in closed form (the module docstring's equation), per layer in `target`."""
    out = {}
    for k, (mu_t, sd_t) in target.items():
        w = params[k].detach()
        n, mu = w.numel(), w.mean()
        sd = ((w - mu) ** 2).mean().sqrt()
        out[k] = (mu - mu_t) / (n * sd_t ** 2) + (sd / sd_t ** 2 - 1 / sd) * (w - mu) / (n * sd)
    return out


@contextlib.contextmanager
def attached(model: torch.nn.Module, target: Scope, strength: float) -> Iterator[None]:
    """Inside: every backward pass adds strength * dR/dW to each target layer's gradient (parameter
    hooks with the closed form), so any training loop fine-tunes with WSA unchanged."""
    params = dict(model.named_parameters())
    missing = [k for k in target if k not in params]
    if missing:
        raise MergeError(f"scope: the target names layers the model lacks, e.g. {missing[:3]}")

    def hook(k: str):
        return lambda g: g + strength * regulariser_grad({k: params[k]}, {k: target[k]})[k].to(g.dtype)
    handles = [params[k].register_hook(hook(k)) for k in target]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fuse(scopes: Sequence[Scope], weights: Sequence[float] | None = None) -> Scope:
    """One scope for several models: the (weighted) pooled distribution's mean and std per layer."""
    if not scopes:
        raise MergeError("scope: no scopes to fuse")
    w = [1.0] * len(scopes) if weights is None else [float(x) for x in weights]
    if len(w) != len(scopes) or any(x < 0 for x in w) or sum(w) <= 0:
        raise MergeError(f"scope: need one non-negative weight per scope with a positive sum, got {weights}")
    keys = set(scopes[0])
    if any(set(s) != keys for s in scopes):
        raise MergeError("scope: the scopes to fuse cover different layers")
    z = sum(w)
    out = {}
    for k in scopes[0]:
        mu = sum(a * s[k][0] for a, s in zip(w, scopes)) / z
        second = sum(a * (s[k][1] ** 2 + s[k][0] ** 2) for a, s in zip(w, scopes)) / z
        out[k] = (mu, math.sqrt(max(second - mu ** 2, 0.0)))
    return out


def align(sd: Mapping[str, Tensor], target: Scope) -> dict[str, Tensor]:
    """A copy of `sd` whose layers in `target` have exactly the target scope: mu* + sigma* (W - mu) / sigma."""
    out = {k: v.clone() for k, v in sd.items()}
    for k, (mu_t, sd_t) in target.items():
        w = sd[k]
        mu, s = w.mean(), w.std(correction=0)
        if s == 0:
            raise MergeError(f"scope: {k!r} is constant (sigma = 0) and cannot be rescaled")
        out[k] = (mu_t + sd_t * (w - mu) / s).to(w.dtype)
    return out
