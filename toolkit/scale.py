"""The one setting that picks a scale: TOOLKIT_SCALE = tiny | small | full.

tiny: tests, seconds per notebook; small: the default book on 2 CPU cores;
full: GPU/Colab with real checkpoints and data.
"""
from __future__ import annotations

import os

SCALES = ("tiny", "small", "full")
DEFAULT = "small"


def get_scale(default: str = DEFAULT) -> str:
    """The scale named by the environment variable TOOLKIT_SCALE (default 'small')."""
    s = os.environ.get("TOOLKIT_SCALE", default).strip().lower()
    if s not in SCALES:
        raise ValueError(f"TOOLKIT_SCALE must be one of {SCALES}, got {s!r}")
    return s


def pick(tiny, small, full, scale: str | None = None):
    """Choose a value by scale: pick(tiny=100, small=2000, full=60000)."""
    return {"tiny": tiny, "small": small, "full": full}[scale or get_scale()]
