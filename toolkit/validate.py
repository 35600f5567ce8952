"""Typed checks of configs, options and inputs, shared by the YAML config, the CLI and the API.

Each check names the key it checks and raises `MergeError`; none coerces: a quoted 'false' is
not a boolean, '0.5' is not a number, 1e39 is not a float32. Ranges are written as intervals,
"[0, inf)" or "(0, 1]". `check_same` is the one key/shape/dtype check of a merge's inputs
(state dicts in memory, checkpoints on disk), `check_output` keeps an output off its inputs.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .checkpoint.reader import parse_dtype
from .errors import MergeError

_INTERVAL = re.compile(r"\s*(([\[(])\s*(-?inf|[-+0-9.eE]+)\s*,\s*(-?inf|[-+0-9.eE]+)\s*([\])]))\s*(.*)")


@functools.lru_cache(maxsize=None)  # parsed once: in-memory merges check options for every tensor
def split_range(spec: str) -> tuple[str, str]:
    """A registry range '(0, 1] fraction kept' -> ('(0, 1]', 'fraction kept')."""
    m = _INTERVAL.fullmatch(spec)
    if not m:
        raise MergeError(f"bad interval {spec!r}; write e.g. '[0, inf)' or '(0, 1] what it is'")
    return m.group(1), m.group(6).strip()


@functools.lru_cache(maxsize=None)
def interval(spec: str) -> tuple[float, float, bool, bool]:
    """'(0, 1]' -> (lo, hi, lo closed, hi closed)."""
    m = _INTERVAL.fullmatch(split_range(spec)[0])
    return float(m.group(3)), float(m.group(4)), m.group(2) == "[", m.group(5) == "]"


def _show(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    text = repr(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def _say(lo: float, hi: float, lo_closed: bool, hi_closed: bool, within: str) -> str:
    if hi == math.inf:
        named = {(0.0, False): "positive", (0.0, True): "non-negative"}
        return named.get((lo, lo_closed), f">{'=' * lo_closed} {lo:g}")
    return f"in {within}"


def boolean(value: Any, key: str) -> bool:
    """true / false only (YAML's true, false, yes, no unquoted): a quoted 'false' is an error."""
    if isinstance(value, bool):
        return value
    raise MergeError(f"{key} must be true or false, got {_show(value)}")


def number(value: Any, key: str, within: str | None = None, *, integer: bool = False) -> Any:
    """A finite real number (an int if `integer`) inside the interval `within`; never a string or a bool."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()  # a 0-d tensor alpha is a number
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MergeError(f"{key} must be a{'n integer' if integer else ' number'}, got {_show(value)}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise MergeError(f"{key} must be a finite number, got {value!r}")
    if integer:
        if not v.is_integer():
            raise MergeError(f"{key} must be an integer, got {value!r}")
        v = int(value)
    if within is not None:
        lo, hi, lo_closed, hi_closed = interval(within)
        if not ((lo <= v if lo_closed else lo < v) and (v <= hi if hi_closed else v < hi)):
            raise MergeError(f"{key} must be {_say(lo, hi, lo_closed, hi_closed, within)}, got {value!r}")
    return v


def numbers_list(value: Any, key: str, n: int, within: str | None = None) -> list[float]:
    """A list (or tuple) of `n` numbers, one per model."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise MergeError(f"{key} must be a list of {n} numbers (one per model), got {_show(value)}")
    if len(value) != n:
        raise MergeError(f"got {len(value)} {key} for {n} models; give one per model")
    return [number(v, f"{key}[{i}]", within) for i, v in enumerate(value)]


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise MergeError(f"{key} must be a non-empty string, got {_show(value)}")
    return value


def path(value: Any, key: str) -> Path:
    """A file or folder name (a string or os.PathLike, not a number or a list)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise MergeError(f"{key} must be a path (a string), got {_show(value)}")
    return Path(value).expanduser()


def mapping(value: Any, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise MergeError(f"{key} must be a mapping (key: value), got {_show(value)}")
    return value


def float_dtype(value: Any, key: str = "dtype") -> torch.dtype | None:
    """A floating dtype name (float32, bfloat16, fp16, ...) or None: an integer output would truncate weights."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.dtype)):
        raise MergeError(f"{key} must be a dtype name such as bfloat16, got {_show(value)}")
    dt = parse_dtype(value)
    if not dt.is_floating_point:
        raise MergeError(f"{key} must be a floating dtype (float32, bfloat16, float16, float64), got {value!r}")
    return dt


def knobs(method: Any, options: Any, key: str = "options") -> dict[str, Any]:
    """A method's knobs: known names, values of the type of their defaults and inside the
    registry's ranges (`Method.ranges`). Returns them checked (numbers as float/int)."""
    options = mapping(options, key)
    unknown = sorted(set(options) - set(method.options), key=str)
    if unknown:
        raise MergeError(f"method {method.name!r} takes no option(s) {unknown}; "
                         f"it takes {list(method.options) or 'none'}")
    ranges = getattr(method, "ranges", {}) or {}
    out = {}
    for k, v in options.items():
        within, what = split_range(ranges[k]) if k in ranges else (None, "")
        name, default = f"{method.name} option {k!r}" + (f" ({what})" if what else ""), method.defaults.get(k)
        if isinstance(default, bool):
            out[k] = boolean(v, name)
        elif isinstance(default, numbers.Integral):
            out[k] = number(v, name, within, integer=True)
        elif isinstance(default, numbers.Real) or within:
            out[k] = number(v, name, within)
        elif isinstance(default, str) and not isinstance(v, str):
            raise MergeError(f"{name} must be a string, got {_show(v)}")
        else:
            out[k] = v
    return out


def _desc(x: Any) -> str:
    return f"{type(x).__name__}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def state_dict(sd: Any, key: str) -> Mapping[str, torch.Tensor]:
    """A mapping name -> tensor (not a bare tensor, not a list of numbers)."""
    if not isinstance(sd, Mapping):
        raise MergeError(f"{key} must be a state dict (name -> tensor), got a {_desc(sd)}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise MergeError(f"{key}[{k!r}] must be a tensor, got a {type(v).__name__}")
    return sd


def state_dicts(sds: Any, key: str) -> Sequence[Mapping[str, torch.Tensor]]:
    """A list of state dicts, one per model."""
    if isinstance(sds, (Mapping, torch.Tensor, str)) or not isinstance(sds, Sequence):
        raise MergeError(f"{key} must be a list of state dicts (one per model), got a {_desc(sds)}")
    return [state_dict(sd, f"{key}[{i}]") for i, sd in enumerate(sds)]


def check_like(name: str, base: Any, other: Any, what: str) -> None:
    """One entry of a model has the base's shape and dtype (tensors or checkpoint TensorInfo)."""
    if tuple(other.shape) != tuple(base.shape):
        raise MergeError(f"{name!r}: {what} has shape {tuple(other.shape)}, the base {tuple(base.shape)}")
    if other.dtype != base.dtype:
        raise MergeError(f"{name!r}: {what} has dtype {other.dtype}, the base {base.dtype}")


def check_same(base: Mapping[str, Any], models: Sequence[Mapping[str, Any]],
               labels: Sequence[str] | None = None) -> None:
    """Every model has exactly the base's names, and each entry the base's shape and dtype."""
    if len(models) == 0:
        raise MergeError("no models to merge: the model list is empty")
    for i, sd in enumerate(models):
        what = labels[i] if labels else f"model {i}"
        missing, extra = base.keys() - sd.keys(), sd.keys() - base.keys()
        if missing or extra:
            raise MergeError(f"{what} does not match the base: missing keys {sorted(missing)[:3]}, "
                             f"unexpected keys {sorted(extra)[:3]}")
        for k, b in base.items():
            check_like(k, b, sd[k], what)


def check_output(output: Any, inputs: Iterable[str | os.PathLike], key: str = "output") -> Path:
    """The output may not be, contain or lie inside any input (symlinks resolved), and may not
    lie below a regular file. Returns it as a Path."""
    out = path(output, key)
    real = out.resolve()
    for p in inputs:
        r = Path(p).resolve()
        if real == r:
            raise MergeError(f"{key} {out} is the input {p}; write the output elsewhere")
        if r.is_relative_to(real):
            raise MergeError(f"{key} {out} contains the input {p}; replacing it would delete the input")
        if real.is_relative_to(r):
            raise MergeError(f"{key} {out} lies inside the input {p}; write the output elsewhere")
    blocker = next((a for a in real.parents if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MergeError(f"cannot write {key} {out}: {blocker} is a file, not a folder")
    return out
