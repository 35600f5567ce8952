"""Tiny random transformers for tests and TOOLKIT_SCALE=tiny, saved once with save_pretrained
and read back through `toolkit.hub` like any pretrained model (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

from . import hub
from .errors import MergeError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # the tokenizer of the tiny BERT and Llama


def tiny_model_dir(kind: str, root: Path | None = None) -> str:
    """A random BERT ('bert') or Llama ('llama') with 2 layers of width 32 and MiniLM's tokenizer,
    saved with save_pretrained under <cache>/models/tiny-<kind> (atomically, once)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if kind not in ("bert", "llama"):
        raise MergeError(f"tiny_model_dir: kind must be 'bert' or 'llama', got {kind!r}")
    out = (root or hub.cache_root() / "models") / f"tiny-{kind}"
    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(hub.resolve(MINILM))
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id)
    if kind == "bert":
        model = BertModel(BertConfig(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                             eos_token_id=tok.sep_token_id,
                                             bos_token_id=tok.cls_token_id))
    hub.save_dir(out, model, tok)
    return str(out)


def model_name(name: str) -> str:
    """'tiny-bert' / 'tiny-llama' -> the tiny directories; anything else -> hub.resolve's input."""
    return tiny_model_dir(name[5:]) if name in ("tiny-bert", "tiny-llama") else name
