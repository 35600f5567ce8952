"""IVON (Shen et al., ICML 2024) fine-tuning, whose posterior precision is free uncertainty for merging.

IVON learns a diagonal Gaussian q(theta) = N(m, diag(1 / (lambda (h + wd)))) with lambda = ess (the
effective sample size, N_t): m is theta_t, and h is its running estimate of the per-example
Hessian of the loss (Price's theorem on the weight noise). So gradient matching can take

    H_t = N_t h        (IVON's precision minus its own prior lambda wd)

with no Fisher pass after training. IVON's prior is wd centred at 0 (its weight decay), not at
theta_0: keep wd small; gradient matching adds its own H_0 = delta. The package is `ivon-opt`
(imported only when used).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batch import logits
from .errors import MergeError


def _ivon():
    try:
        import ivon
    except ImportError:
        raise MergeError("IVON needs the package ivon-opt: pip install ivon-opt==0.1.3") from None
    return ivon


def finetune(model: nn.Module, batches: Iterable[tuple[Any, Tensor]], *, steps: int, lr: float, ess: float,
             hess_init: float = 0.1, beta2: float = 0.99, weight_decay: float = 1e-6, mc_samples: int = 1,
             clip_radius: float = float("inf"),
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             params: Callable[[str], bool] | None = None, seed: int = 0, progress: bool = False,
             desc: str = "IVON") -> dict[str, Tensor]:
    """Train `model` in place with IVON for `steps` steps over `batches` (cycled) and return h, the
    per-example diagonal Hessian estimate, keyed by parameter name (H_t = ess * h). The model ends
    at the posterior mean m. params: a name filter for the trained parameters (others frozen).
    beta2 is IVON's Hessian averaging (its default 0.99999 suits long training; a short fine-tuning
    needs h to forget hess_init within `steps`, hence 0.99: an average over the last ~100 steps)."""
    ivon = _ivon()
    if steps < 1 or ess <= 0:
        raise MergeError(f"IVON: steps must be >= 1 and ess (N_t) > 0, got steps={steps}, ess={ess}")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad and (params is None or params(k))]
    if not named:
        raise MergeError("IVON: no trainable parameters selected")
    chosen = {id(p) for _, p in named}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    loss_fn = loss_fn or F.cross_entropy
    torch.manual_seed(seed)
    opt = ivon.IVON([p for _, p in named], lr=lr, ess=ess, hess_init=hess_init, beta2=beta2,
                    weight_decay=weight_decay, mc_samples=mc_samples, clip_radius=clip_radius)
    model.train()
    data = itertools.cycle(batches) if not hasattr(batches, "__next__") else batches
    try:
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            x, y = next(data)
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad(set_to_none=False)
                    loss_fn(logits(model, x), y).backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return hessian(opt, named)


def hessian(opt, named: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """IVON's flat per-example Hessian estimate h split into the parameters' shapes."""
    flat = torch.cat([g["hess"] for g in opt.param_groups])
    out, i = {}, 0
    for k, p in named:
        out[k] = flat[i:i + p.numel()].view_as(p).detach().clone()
        i += p.numel()
    if i != flat.numel():
        raise MergeError(f"IVON: the optimiser holds {flat.numel()} Hessian entries for {i} parameters")
    return out
