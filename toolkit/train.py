"""Training and evaluation loops for the small classifiers of the book (models at the edge).

Batches are `(inputs, targets)` as in `toolkit.batch`. Losses follow the paper's convention where
it matters: `loss_gradient` returns the gradient of the SUMMED loss lbar_t over a data set.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batch import batch_size, logits

Batches = Iterable[tuple[object, Tensor]]


def train(model: nn.Module, batches: Callable[[], Batches] | Batches, *, epochs: int = 1,
          lr: float = 1e-3, weight_decay: float = 0.0, prior: dict[str, Tensor] | None = None,
          prior_precision: float = 0.0, progress: bool = False, desc: str = "train") -> nn.Module:
    """Fine-tune `model` in place with AdamW on cross-entropy (mean over the batch).

    prior/prior_precision add (delta/2) ||theta - theta_0||^2 per example, i.e. the
    Gaussian prior of the paper's per-task objective, centred at `prior` (theta_0).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    params = dict(model.named_parameters())
    model.train()
    for _ in range(epochs):
        data = batches() if callable(batches) else batches
        for x, y in tqdm(data, desc=desc, disable=not progress, leave=False):
            loss = F.cross_entropy(logits(model, x), y)
            if prior is not None and prior_precision > 0:
                loss = loss + 0.5 * prior_precision * sum(
                    ((params[k] - prior[k]) ** 2).sum() for k in params if k in prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier over `batches`."""
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        z = logits(model, x)
        loss += F.cross_entropy(z, y, reduction="sum").item()
        correct += (z.argmax(-1) == y).sum().item()
        total += batch_size(x)
    if total == 0:
        raise ValueError("evaluate: no examples in the batches")
    return {"accuracy": correct / total, "loss": loss / total}


def loss_gradient(model: nn.Module, batches: Batches,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """grad of the summed loss lbar(theta) = sum_i l(y_i, f(x_i; theta)) over all batches,
    keyed by parameter name; model parameters and their .grad are left as they were."""
    loss_fn = loss_fn or (lambda z, y: F.cross_entropy(z, y, reduction="sum"))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(logits(model, x), y), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g
    model.train(was_training)
    return dict(zip(names, total))


def trainable(model: nn.Module, exclude: Callable[[str], bool] = lambda n: False) -> dict[str, Tensor]:
    """Detached CPU copies of the trainable parameters (the part that is fine-tuned and merged)."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters()
            if p.requires_grad and not exclude(k)}
