"""The book's table of contents: the pages of _toc.yml (Jupyter Book 1) in reading order."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml

TOC = Path(__file__).resolve().parent.parent / "_toc.yml"


def pages(toc: Path = TOC) -> list[str]:
    """Every `root` and `file` entry, in reading order, once each, without .md/.ipynb."""
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    yield re.sub(r"\.(md|ipynb)$", "", str(node[key]))
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
    return list(dict.fromkeys(walk(yaml.safe_load(toc.read_text()))))


def notebooks(toc: Path = TOC) -> list[str]:
    """The stems of the notebooks/ pages, in reading order."""
    return [Path(p).name for p in pages(toc) if p.startswith("notebooks/")]
