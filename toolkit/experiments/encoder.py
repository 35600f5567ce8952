"""A pretrained encoder whose lower layers stay at theta_0: their hidden states are computed once
per text, and only the top layers (with pooler and head) are fine-tuned, Fisher-estimated and
merged. Exact: the top model fed with those hidden states gives the full model's logits.

The classifier reads only the first ([CLS]) token of the last layer, so that layer computes its
query, attention output and feed-forward block for that token alone (keys and values still for
every token): `top = 1` costs about a tenth of a full layer per text. State-dict names are the
full model's, so merges, caches and the full-scale path (every layer) are one code path.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hub, text as T, tiny
from ..errors import MergeError

# (model, top, max_len) -> {text: hidden states [tokens, width] entering the top layers}
_FEATURES: dict[tuple, dict[str, Tensor]] = {}


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


def _first_token_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                         *args, **kwargs) -> Tensor:
    """A BERT layer's output for the first token only, [B, 1, D]: softmax(q_0 K^T / sqrt(d)) V
    with q_0 from token 0 and K, V from every token, then the layer's own output, intermediate
    and output blocks (dropout as in training). Equal to the full layer's output at token 0."""
    sa = self.attention.self
    B, L, _ = hidden_states.shape
    d = sa.attention_head_size
    x0 = hidden_states[:, :1]
    q = sa.query(x0).view(B, 1, -1, d).transpose(1, 2)
    k = sa.key(hidden_states).view(B, L, -1, d).transpose(1, 2)
    v = sa.value(hidden_states).view(B, L, -1, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * getattr(sa, "scaling", d ** -0.5)  # [B, heads, 1, L]
    if attention_mask is not None:  # bool (True = attend) or additive, [B, 1, L or 1, L]
        m = attention_mask[..., :1, :]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    p = F.dropout(scores.softmax(-1), sa.dropout.p, self.training)
    ctx = (p @ v).transpose(1, 2).reshape(B, 1, -1)
    a = self.attention.output(ctx, x0)
    return self.output(self.intermediate(a), a)


_FIRST_TOKEN_CLASSES: dict[type, type] = {}


def _first_token_only(layer: nn.Module) -> None:
    """Make `layer` compute its output for the first token only (same parameters and names)."""
    cls = type(layer)
    if cls not in _FIRST_TOKEN_CLASSES:
        _FIRST_TOKEN_CLASSES[cls] = type(f"FirstToken{cls.__name__}", (cls,), {"forward": _first_token_forward})
    layer.__class__ = _FIRST_TOKEN_CLASSES[cls]


def classifier(name: str, n_classes: int, seed: int, top: int):
    """(top model, tokenizer): the pretrained encoder `name` with a fresh `n_classes` head
    (initialised from `seed`) keeping only its top `top` layers, pooler and head; the last layer
    computes only the first token, all the pooler reads."""
    src, _ = hub.pristine("classifier", tiny.model_name(name), n_classes, seed)
    n = len(_layers(src))
    if not 1 <= top <= n:
        raise MergeError(f"encoder: top must be between 1 and the {n} layers of {name}, got {top}")
    pre = src.base_model_prefix
    skipped = {f"{pre}.embeddings": _Given(), **{f"{pre}.encoder.layer.{i}": nn.Identity() for i in range(n - top)}}
    full, tok = hub.pretrained("classifier", tiny.model_name(name), n_classes, seed, replace=skipped)
    full.base_model.encoder.layer = nn.ModuleList(list(_layers(full))[n - top:])  # names: 0..top-1
    _first_token_only(full.base_model.encoder.layer[-1])
    return full.eval(), tok


@torch.no_grad()
def features(name: str, top: int, max_len: int, data: T.TextSet, batch_size: int = 64,
             disk: bool = False) -> list[Tensor]:
    """Per text, the hidden states [tokens, width] that enter the top `top` layers (texts cut to
    `max_len` tokens); each text computed once per process, in batches of similar length.
    disk=True: a data set's states also go to the on-disk cache (`toolkit.cache`, keyed by the
    model and the texts), so other processes (chapter 7's seeds) read instead of recomputing."""
    memo = _FEATURES.setdefault((name, top, max_len), {})
    if disk and any(t not in memo for t in data.texts):
        from .. import cache
        cfg = {"model": name, "top": top, "len": max_len, "data": data.fingerprint()}
        got = cache.cached("language-features", cfg, lambda: features(name, top, max_len, data, batch_size))
        memo.update(zip(data.texts, got))
    todo = list(dict.fromkeys(t for t in data.texts if t not in memo))
    if todo:
        full, tok = hub.pretrained("classifier", tiny.model_name(name), 2, 0)
        body = full.base_model.eval()
        body.encoder.layer = nn.ModuleList(list(_layers(full))[: len(_layers(full)) - top])
        body.pooler = None
        lengths = tok(todo, truncation=True, max_length=max_len, return_length=True)["length"]
        todo = [t for _, t in sorted(zip(lengths, todo), key=lambda p: p[0])]  # little padding
        for i in range(0, len(todo), batch_size):
            texts = todo[i:i + batch_size]
            enc = tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            h = body(**enc).last_hidden_state
            for t, row, m in zip(texts, h, enc["attention_mask"]):
                memo[t] = row[: int(m.sum())].clone()
    return [memo[t] for t in data.texts]


def forget() -> None:
    """Drop the hidden states held in memory."""
    _FEATURES.clear()


def by_length(feats: Sequence[Tensor]) -> list[int]:
    """Indices of `feats` from the shortest to the longest text: evaluation batches with little
    padding (the order of an evaluation does not change its result)."""
    return sorted(range(len(feats)), key=lambda i: len(feats[i]))


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


def run_seeds(bench: Any, seeds: Sequence[int], scale: str | None, progress: bool, **overrides: Any):
    """The seeds loop of the text benchmarks: `bench.prepare` and `bench.run` for the setup of
    every seed (all cached), one table."""
    import pandas as pd
    tables = []
    for seed in seeds:
        s = bench.setup(scale, seed, **overrides)
        bench.prepare(s, progress=progress)
        tables.append(bench.run(s, progress=progress))
    return pd.concat(tables, ignore_index=True)


def is_head(name: str) -> bool:
    return name.startswith("classifier.")


def fisher(model: nn.Module, data: list, kind: str, seed: int, max_examples: int,
           params=lambda k: True) -> dict[str, Tensor]:
    """toolkit.curvature.fisher of the parameters passing `params`, as a plain dict on the CPU
    (what the cache stores)."""
    from ..curvature import fisher as estimate
    f = estimate(model, iter(data), kind, seed=seed, progress=False, max_examples=max_examples, params=params)
    return {k: v.cpu() for k, v in f.items()}
