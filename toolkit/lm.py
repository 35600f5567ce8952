"""Causal language models: next-token loss, perplexity, fine-tuning with frozen parts.

Batches are `(inputs, None)` with `inputs` the tokenizer's dict (`toolkit.text.lm_batches`);
padding (attention_mask 0) is neither input nor target.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import MergeError


def token_nll(model: nn.Module, inputs: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood of a batch and the number of predicted tokens
    (padding, i.e. attention_mask 0, is neither input nor target)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target, valid = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
    nll = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), target.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), int(valid.sum())


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[tuple[Mapping[str, Tensor], Any]]) -> float:
    """exp(total next-token NLL / number of tokens) over all batches: ppl = exp(-1/K sum log p)."""
    model.eval()
    total, count = 0.0, 0
    for inputs, _ in batches:
        nll, n = token_nll(model, inputs)
        total, count = total + float(nll), count + n
    if count == 0:
        raise MergeError("perplexity: no tokens to predict (empty batches or sequences of length 1)")
    return math.exp(total / count)


def finetune_lm(model: nn.Module, batches: Sequence[tuple[Mapping[str, Tensor], Any]], *,
                steps: int, lr: float, progress: bool = False,
                desc: str = "fine-tune LM") -> nn.Module:
    """`steps` AdamW steps (cycling through `batches`) on the mean next-token NLL, in place;
    only parameters with requires_grad move (freeze the embeddings with `freeze`)."""
    if steps < 1 or not batches:
        raise MergeError(f"finetune_lm: need steps >= 1 and some batches, "
                         f"got steps={steps}, {len(batches)} batches")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        nll, n = token_nll(model, batches[step % len(batches)][0])
        opt.zero_grad(set_to_none=True)
        (nll / max(n, 1)).backward()
        opt.step()
    model.eval()
    return model


def freeze(model: nn.Module, frozen: Callable[[str], bool]) -> nn.Module:
    """Set requires_grad=False for the parameters whose name passes `frozen` (in place)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen(name))
    return model


def is_embedding(name: str) -> bool:
    """Token/position embeddings and a tied LM head (which shares the token embedding)."""
    return "embed" in name or name.startswith("lm_head.")
