"""Atomic writes: a temporary file or directory next to the destination, renamed over it only when
complete, so a crash or a killed process never leaves a half-written output.

Temporaries are named `.NAME.tmp-PID@HOST-XXXXXXXX`. A `kill -9` cannot run any clean-up, so the
next write of the same destination removes the temporaries whose process is gone (same host, pid
no longer running) and warns about any it cannot vouch for (another host, an older naming).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from .errors import MergeError


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _prefix(dest: Path, kind: str = "tmp") -> str:
    return f".{dest.name}.{kind}-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `dest` left by dead processes of this host; warn about the ones
    left by processes this host cannot check. Returns the removed paths."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed, unsure = [], []
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:tmp|old)-(?:(\d+)@([^-]*)-)?[^/]+")
    for p in dest.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        pid, host = m.group(1), m.group(2)
        if pid is not None and host == _host() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
        elif pid is None or host != _host():
            unsure.append(p)
    if unsure:
        warnings.warn(f"{len(unsure)} temporary file(s) of {dest.name} from an interrupted write on another host "
                      f"or an older version, e.g. {unsure[0]}: delete them if no write is running", stacklevel=3)
    return removed


def _parent(path: Path) -> None:
    """Create `path`'s folder, or say in one line why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [path.parent, *path.parent.parents] if p.exists())
        raise MergeError(f"cannot write {path}: {blocker} is a file, not a folder") from None
    except OSError as e:
        raise MergeError(f"cannot create the folder {path.parent}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write {path}: the folder {path.parent} is not writable")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success rename it to `path`, on error remove it."""
    path = Path(path)
    if path.is_dir():
        raise MergeError(f"{path} is a folder; name a file to write")
    _parent(path)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `dest`; on success rename it to `dest`
    (replacing an old `dest` only if `overwrite`), on any error remove it. A killed process leaves
    at most a hidden `.NAME.tmp-*` directory, never a half-written `dest`; the next call removes it."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise MergeError(f"output {dest} already exists; choose another path or pass overwrite")
    _parent(dest)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise MergeError(f"output {dest} appeared while merging; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=_prefix(dest, "old"), dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
