"""Tiny random Llama checkpoints (save_pretrained directories with a word-level tokenizer) for the
checkpoint, stream and Fisher-file tests; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch

TEXTS = [f"the {a} {b} merges models {c}" for a in ("small", "big", "red") for b in ("cat", "dog", "fish")
         for c in ("today", "again")]


def tokenizer(texts=TEXTS):
    """A word-level tokenizer over the words of `texts` (plus <unk>, <pad>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def make_llama(path, *, seed: int = 0, like=None, noise: float = 0.02, dtype=torch.float32,
               hidden: int = 16, layers: int = 2, tie: bool = False):
    """Save a tiny LlamaForCausalLM at `path`: random (seed), or `like` (a saved dir) + noise."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    if like is None:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
