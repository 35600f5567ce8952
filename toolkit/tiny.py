"""Tiny random transformers, saved with save_pretrained and read back like any pretrained model
(nothing is downloaded): the BERT and Llama of TOOLKIT_SCALE=tiny (MiniLM's tokenizer), and
Llama checkpoint families with a word-level tokenizer for the checkpoint, stream and Fisher-file
tests and the chapter "Scaling up"."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


# ---------------------------------------------------------------------------------------------
# Llama checkpoints with a word-level tokenizer (tests, chapter "Scaling up")
# ---------------------------------------------------------------------------------------------

TEXTS = [f"the {a} {b} merges models {c}" for a in ("small", "big", "red")
         for b in ("cat", "dog", "fish") for c in ("today", "again")]


def word_tokenizer(words: Sequence[str]):
    """A word-level tokenizer over `words` (ids in that order after <unk>, <pad>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")


def tokenizer(texts: Sequence[str] = TEXTS):
    """The word-level tokenizer over the (sorted) words of `texts`."""
    return word_tokenizer(sorted({w for t in texts for w in t.split()}))


def llama_config(vocab_size: int, hidden: int, layers: int, *, intermediate: int | None = None,
                 max_positions: int = 64, tie: bool = False):
    """A LlamaConfig of 4 heads (2 key/value heads), pad id 1 and eos id 2."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                       intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie,
                       pad_token_id=1, eos_token_id=2)


def make_llama(path, *, seed: int = 0, like=None, noise: float = 0.02, dtype=torch.float32,
               hidden: int = 16, layers: int = 2, tie: bool = False) -> Path:
    """Save a tiny LlamaForCausalLM at `path`: random (seed), or `like` (a saved dir) + noise."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    if like is None:
        model = LlamaForCausalLM(llama_config(len(tok), hidden, layers, tie=tie))
    else:
        model = AutoModelForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_family(root: Path, hidden: int, layers: int, n_models: int, shard_size: str,
                words: Sequence[str], noise: float = 0.01) -> tuple[Path, list[Path]]:
    """Save a random Llama base and `n_models` copies perturbed by `noise` * N(0, 1) as sharded
    HF model directories root/base, root/task0, ... (torch's global random state: seed it first)."""
    from transformers import LlamaForCausalLM

    tok = word_tokenizer(words)
    cfg = llama_config(len(tok), hidden, layers, intermediate=int(8 * hidden / 3),
                       max_positions=128)
    base = LlamaForCausalLM(cfg)
    paths = [root / "base"] + [root / f"task{t}" for t in range(n_models)]
    base.save_pretrained(paths[0], max_shard_size=shard_size)
    tok.save_pretrained(paths[0])
    for path in paths[1:]:
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict({k: v + noise * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(path, max_shard_size=shard_size)
        tok.save_pretrained(path)
    return paths[0], paths[1:]
