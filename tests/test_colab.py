"""The Colab install cell: does nothing outside Colab, runs pip inside it (tested offline)."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml

from toolkit import colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "student").glob("*.ipynb"))


def _first_code(path: Path) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.fixture
def no_subprocess(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.fixture
def fake_colab(monkeypatch):
    google = types.ModuleType("google")
    mod = types.ModuleType("google.colab")
    google.colab = mod
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", mod)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_notebook_opens_with_the_colab_cell(path):
    assert _first_code(path) == colab.CELL, (
        f"{path.name}: the first code cell must be toolkit.colab.CELL verbatim (print it and paste it)")


def test_cell_does_nothing_outside_colab(no_subprocess, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab.CELL, {})
    assert no_subprocess == []
    assert colab.install() is False and not colab.in_colab()


def test_cell_installs_inside_colab(no_subprocess, fake_colab):
    exec(colab.CELL, {})
    assert len(no_subprocess) == 1
    (cmd,), kw = no_subprocess[0]
    assert cmd == [sys.executable, "-m", "pip", "install", "-q", colab.REQUIREMENT]
    assert kw == {"check": True}
    assert colab.REQUIREMENT == f"toolkit[book] @ git+{colab.REPO_URL}@{colab.BRANCH}"


def test_install_function_inside_colab(fake_colab):
    seen = []
    assert colab.in_colab()
    assert colab.install(run=seen.append) is True
    assert seen == [colab.install_command()]


def test_repository_named_once_consistently():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert colab.REPO_URL == cfg["repository"]["url"]
    assert colab.BRANCH == cfg["repository"]["branch"]
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    links = cfg["parse"]["myst_substitutions"]["student_links"]
    slug = colab.REPO_URL.split("github.com/")[1]
    targets = [u.split(f"/github/{slug}/blob/{colab.BRANCH}/")[1] for u in links.split("(")[1:]]
    targets = [t.split(")")[0] for t in targets]
    assert len(targets) == links.count("https://")
    assert targets and all((ROOT / t).is_file() for t in targets), targets


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_plumbing_cells_hide_their_code(path):
    """The rendered book shows no install cell and folds the import/scale cell away."""
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert "remove-input" in code[0].metadata.get("tags", [])
    assert "hide-input" in code[1].metadata.get("tags", [])
