"""Colab support: the install cell every notebook opens with, and the same logic as a function.

Outside Colab it does nothing. Inside Colab (`google.colab` imported) it pip-installs the toolkit
with its book extras from the book's repository, keeping Colab's own torch. The notebooks carry
`CELL` verbatim (the toolkit is not importable there before it is installed); tests check that.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Callable, Sequence

REPO_URL = "https://github.com/merging-book/gradient-matching"  # must equal repository.url in _config.yml
BRANCH = "main"
REQUIREMENT = f"toolkit[book] @ git+{REPO_URL}@{BRANCH}"

CELL = f'''# Colab only: install the toolkit from the book's repository (does nothing elsewhere).
import subprocess, sys
if "google.colab" in sys.modules:
    req = "{REQUIREMENT}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", req], check=True)'''


def in_colab() -> bool:
    """True inside a Google Colab kernel (which imports `google.colab` at start-up)."""
    return "google.colab" in sys.modules


def install_command(requirement: str = REQUIREMENT) -> list[str]:
    """The pip command the Colab cell runs."""
    return [sys.executable, "-m", "pip", "install", "-q", requirement]


def install(run: Callable[[Sequence[str]], object] | None = None) -> bool:
    """Install the toolkit when running in Colab; return whether anything was run."""
    if not in_colab():
        return False
    (run or (lambda cmd: subprocess.run(cmd, check=True)))(install_command())
    return True
