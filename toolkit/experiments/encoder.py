"""A pretrained encoder whose lower layers stay at theta_0: their hidden states are computed once
per text, and only the top layers (with pooler and head) are fine-tuned, Fisher-estimated and
merged. Exact: the top model fed with those hidden states gives the full model's logits.

On 2 CPU cores this makes a forward pass several times cheaper, which pays for seeds, validation
splits and larger test sets; `top = number of layers` fine-tunes the whole encoder above the
embeddings.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import hub, text as T, tiny
from ..errors import MergeError

_FEATURES: dict[tuple, list[Tensor]] = {}  # (model, top, max_len, data fingerprint) -> hidden states


class _Given(nn.Module):
    """Stands in for the embedding layer: the input already is the lowest trained layer's input."""

    def forward(self, inputs_embeds: Tensor | None = None, **_) -> Tensor:
        return inputs_embeds


def _layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.base_model.encoder.layer
    except AttributeError:
        raise MergeError(f"encoder: expected a BERT-style classifier (base_model.encoder.layer), "
                         f"got {type(model).__name__}") from None


def classifier(name: str, n_classes: int, seed: int, top: int):
    """(top model, tokenizer): the pretrained encoder `name` with a fresh `n_classes` head
    (initialised from `seed`) keeping only its top `top` layers, pooler and head."""
    full, tok = hub.pretrained("classifier", tiny.model_name(name), n_classes, seed)
    n = len(_layers(full))
    if not 1 <= top <= n:
        raise MergeError(f"encoder: top must be between 1 and the {n} layers of {name}, got {top}")
    full.base_model.embeddings = _Given()
    full.base_model.encoder.layer = nn.ModuleList(list(_layers(full))[n - top:])
    return full.eval(), tok


@torch.no_grad()
def features(name: str, top: int, max_len: int, data: T.TextSet, batch_size: int = 64) -> list[Tensor]:
    """Per text, the hidden states [tokens, width] that enter the top `top` layers (texts cut to
    `max_len` tokens); computed once per process and data set."""
    key = (name, top, max_len, data.fingerprint())
    if key not in _FEATURES:
        full, tok = hub.pretrained("classifier", tiny.model_name(name), 2, 0)
        body = full.base_model.eval()
        body.encoder.layer = nn.ModuleList(list(_layers(full))[: len(_layers(full)) - top])
        body.pooler = None
        out = []
        for i in range(0, len(data), batch_size):
            enc = tok(list(data.texts[i:i + batch_size]), truncation=True, max_length=max_len,
                      padding=True, return_tensors="pt")
            h = body(**enc).last_hidden_state
            out += [h[j, : int(m.sum())].clone() for j, m in enumerate(enc["attention_mask"])]
        _FEATURES[key] = out
    return _FEATURES[key]


def forget() -> None:
    """Drop the hidden states held in memory."""
    _FEATURES.clear()


def batches(feats: Sequence[Tensor], labels: Sequence[int], batch_size: int,
            order: Sequence[int] | None = None, device: str = "cpu") -> list[tuple[dict, Tensor]]:
    """(inputs, labels) batches of hidden states in `order` (default: as given), padded per batch."""
    order = list(range(len(feats))) if order is None else list(order)
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        width, longest = feats[idx[0]].shape[1], max(len(feats[j]) for j in idx)
        x = torch.zeros(len(idx), longest, width)
        mask = torch.zeros(len(idx), longest, dtype=torch.long)
        for r, j in enumerate(idx):
            x[r, : len(feats[j])], mask[r, : len(feats[j])] = feats[j], 1
        y = torch.tensor([labels[j] for j in idx])
        out.append(({"inputs_embeds": x.to(device), "attention_mask": mask.to(device)}, y.to(device)))
    return out


def is_head(name: str) -> bool:
    return name.startswith("classifier.")
