"""Causal language models: next-token loss, perplexity, fine-tuning with frozen parts, and the
top of a decoder fed with the hidden states its frozen lower layers give once per text.

Batches are `(inputs, None)` with `inputs` the tokenizer's dict (`toolkit.text.lm_batches`),
plus `inputs_embeds` (the hidden states entering the lowest kept layer) for a `TopLM`;
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
    target, valid = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
    if isinstance(model, TopLM):  # input_ids are only the targets; logits only where they count
        z = model(inputs_embeds=inputs.get("inputs_embeds"), attention_mask=mask, logits_at=valid).logits
        return F.cross_entropy(z.float(), target[valid], reduction="sum"), int(valid.sum())
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
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


# ---------------------------------------------------------------------------------------------
# the top of a decoder: lower layers at theta_0, their output computed once per text
# ---------------------------------------------------------------------------------------------

class Skip(nn.Module):
    """Stands in for a frozen lower decoder layer: its output is already the input."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise MergeError(f"top LM: expected a Llama-style causal LM (model.layers, lm_head), "
                         f"got {type(model).__name__}")
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:  # older decoder layers return tuples
        raise MergeError("top LM: needs transformers >= 5 (decoder layers that return a tensor)")
    return layers


class TopLM(nn.Module):
    """A causal LM whose lower layers are skipped: fed with `inputs_embeds`, the hidden states
    entering its top `top` layers (`hidden_below`), it gives the full model's logits. Its
    state-dict names are the full model's (`model.layers.{i}...`, `lm_head.weight`), so its
    parameters merge, cache and load like the full model's."""

    def __init__(self, lm: nn.Module, top: int):
        super().__init__()
        layers = _decoder_layers(lm)
        if not 1 <= top <= len(layers):
            raise MergeError(f"top LM: top must be between 1 and the {len(layers)} layers, got {top}")
        for i in range(len(layers) - top):
            layers[i] = Skip()
        self.model, self.lm_head, self.config, self.top = lm.model, lm.lm_head, lm.config, top

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, logits_at: Tensor | None = None, **_: Any):
        """Logits [B, L, V]; with `logits_at` (bool [B, L - 1]: the positions whose next token
        counts) only those rows, [n, V]: the output layer is most of the cost of a small top."""
        from transformers.modeling_outputs import CausalLMOutput
        if inputs_embeds is None:
            raise MergeError("TopLM: needs inputs_embeds, the hidden states entering its top layers "
                             "(toolkit.lm.hidden_below); input_ids are only the targets")
        h = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(h if logits_at is None else h[:, :-1][logits_at]))


@torch.no_grad()
def hidden_below(lm: nn.Module, top: int, tok, texts: Sequence[str], max_len: int,
                 batch_size: int = 16) -> list[Tensor]:
    """Per text, the hidden states [tokens, width] entering the top `top` layers of `lm`
    (texts cut to `max_len` tokens, the tokenizer's own truncation). `lm` is consumed: its top
    layers and final norm are replaced. Right padding and causal attention make a text's states
    independent of its batch, so texts are batched by length (little padding)."""
    layers = _decoder_layers(lm)
    n = len(layers)
    for i in range(n - top, n):
        layers[i] = Skip()
    lm.model.norm = nn.Identity()
    body = lm.model.eval()
    lengths = [len(x) for x in tok(list(texts), truncation=True, max_length=max_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[Tensor | None] = [None] * len(texts)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        if tok.padding_side != "right" and not bool(enc["attention_mask"].all()):
            raise MergeError("hidden_below: needs a tokenizer that pads on the right")
        h = body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        for j, row, m in zip(idx, h, enc["attention_mask"]):
            out[j] = row[: int(m.sum())].clone()
    return out  # type: ignore[return-value]


def with_hidden(batches: Sequence[tuple[Mapping[str, Tensor], Any]], hidden: Sequence[Tensor]) -> list:
    """`lm_batches` with `inputs_embeds` added: the texts' hidden states (in batch order),
    zero-padded like the ids (padding is masked out)."""
    out, k = [], 0
    for inputs, targets in batches:
        ids = inputs["input_ids"]
        x = torch.zeros(*ids.shape, hidden[k].shape[-1], dtype=hidden[k].dtype)
        for r in range(len(ids)):
            h = hidden[k + r]
            if len(h) != int(inputs["attention_mask"][r].sum()):
                raise MergeError("with_hidden: hidden states and tokens disagree in length")
            x[r, : len(h)] = h
        k += len(ids)
        out.append(({**inputs, "inputs_embeds": x.to(ids.device)}, targets))
    return out
