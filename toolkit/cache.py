"""On-disk cache of trained models and Fishers, keyed by a hash of their configuration.

`cached(kind, config, compute)` returns the stored value when a file for sha256(config) exists,
else computes it, writes it atomically (temporary file, then rename) and returns it. Any change of
the configuration (or of VERSION) gives a new key, so stale entries are never read. The folder is
$TOOLKIT_CACHE, else ~/.cache/toolkit; deleting it is always safe. TOOLKIT_CACHE=off disables it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .atomic import atomic_file
from .errors import MergeError

VERSION = 2  # bump when the code that makes cached values changes meaning
T = TypeVar("T")


def cache_dir() -> Path | None:
    """$TOOLKIT_CACHE, else ~/.cache/toolkit; None when TOOLKIT_CACHE is 'off'."""
    env = os.environ.get("TOOLKIT_CACHE", "")
    if env.strip().lower() in ("off", "0", "none"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "toolkit"


def key(config: Any) -> str:
    """sha256 of the configuration as canonical JSON (sorted keys), plus the cache VERSION."""
    try:
        text = json.dumps({"v": VERSION, "config": config}, sort_keys=True, default=_plain)
    except TypeError as e:
        raise MergeError(f"cache key: the configuration is not plain data ({e})") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def path_for(kind: str, config: Any, root: Path | None = None) -> Path | None:
    root = root if root is not None else cache_dir()
    return None if root is None else root / kind / f"{key(config)[:24]}.pt"


def cached(kind: str, config: Any, compute: Callable[[], T], *, root: Path | None = None) -> T:
    """compute() once per (kind, config): later calls load the torch.save'd result from disk."""
    path = path_for(kind, config, root)
    if path is None:
        return compute()
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute and overwrite it
            pass
    value = compute()
    with atomic_file(path) as tmp:
        torch.save(value, tmp)
    return value
