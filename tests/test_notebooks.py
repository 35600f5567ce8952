"""Every notebook: stripped in the repo, listed in _toc.yml, and runs top to bottom at TOOLKIT_SCALE=tiny.

The executed copies are kept for the rest of the test session, so tests/test_site.py builds the
site from them instead of running every notebook a second time.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest

from toolkit import toc

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
MASTERS = sorted(NB_DIR.glob("*.ipynb"))
ALL = MASTERS + sorted((NB_DIR / "student").glob("*.ipynb"))
THEORY = [p for p in MASTERS if re.match(r"0[1-4]_", p.name)]
EXEC_DIR = Path(tempfile.gettempdir()) / f"toolkit-executed-{os.getpid()}"
atexit.register(shutil.rmtree, EXEC_DIR, True)


def executed(path: Path) -> Path:
    """`path` run top to bottom with nbclient at TOOLKIT_SCALE=tiny, cwd notebooks/ (as the book
    build runs it); the executed copy is cached for this test session, keyed by the source's hash."""
    from nbclient import NotebookClient

    out = EXEC_DIR / f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}.ipynb"
    if out.is_file():
        return out
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in ("TOOLKIT_SCALE", "PYDEVD_DISABLE_FILE_VALIDATION")}
    os.environ.update(TOOLKIT_SCALE="tiny", PYDEVD_DISABLE_FILE_VALIDATION="1")
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NB_DIR)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    EXEC_DIR.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, out)
    return out


def _toc_files() -> list[str]:
    return toc.pages(ROOT / "_toc.yml")


def test_every_notebook_is_in_the_toc():
    listed = {f.removesuffix(".ipynb").removesuffix(".md") for f in _toc_files()}
    missing = [p.name for p in MASTERS if f"notebooks/{p.stem}" not in listed]
    assert not missing, f"notebooks missing from _toc.yml: {missing}"
    assert THEORY and len(THEORY) == 4


def test_every_toc_entry_exists():
    for f in _toc_files():
        assert any((ROOT / f"{f}{ext}").is_file() for ext in ("", ".md", ".ipynb")), f"{f} in _toc.yml does not exist"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.parametrize("path", MASTERS, ids=lambda p: p.name)
def test_opens_with_scale_cell(path):
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert len(code) >= 2 and "get_scale()" in code[1], f"{path.name}: the second code cell sets the scale"


_MATH_OR_CODE = re.compile(r"```.*?```|\$\$.*?\$\$|\$[^$]*\$|\{[a-z:-]+\}`[^`]*`|`[^`]*`", re.S)
_LICENCE = re.compile(r"\bCC[ -]BY[\w-]*\s+\d+\.\d+")  # "CC BY-SA 3.0" names a licence, not a result


def markdown_of(path: Path) -> list[str]:
    """A page's markdown: every markdown cell, or the whole .md page."""
    return ([c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown"]
            if path.suffix == ".ipynb" else [path.read_text()])


def prose_of(path: Path) -> list[str]:
    """A page's text outside math, code and glue roles: every markdown cell, or the whole .md page."""
    return [_LICENCE.sub(" ", _MATH_OR_CODE.sub(" ", t)) for t in markdown_of(path)]


@pytest.mark.parametrize("path", MASTERS + sorted((ROOT / "book").glob("*.md")), ids=lambda p: p.name)
def test_no_typed_results_in_prose(path):
    """Computed numbers are glued, never typed: prose outside math/code has no decimal numbers."""
    for prose in prose_of(path):
        assert not re.search(r"(?<![\w.])\d+\.\d+", prose), f"{path.name}: typed number in {prose[:200]!r}"


def display_math_mid_paragraph(text: str) -> list[str]:
    """Lines that open a $$ block right after a line of text. MyST then reads the $$ as two
    inline-math dollars: the equation comes out inline between stray "$" signs, and any glue
    role in the lines that follow is typeset as math instead of being filled in."""
    bad, inside, prev = [], False, ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("$$"):
            one_line = len(s) > 4 and s.endswith("$$")
            if not inside and prev and not prev.startswith(("```", ":")):
                bad.append(f"{prev[-50:]!r} then {s[:50]!r}")
            inside = inside if one_line else not inside
        prev = s
    return bad


@pytest.mark.parametrize("path", ALL + sorted((ROOT / "book").glob("*.md")), ids=lambda p: p.name)
def test_display_math_starts_a_paragraph(path):
    for text in markdown_of(path):
        bad = display_math_mid_paragraph(text)
        assert not bad, f"{path.name}: $$ must follow a blank line, else it renders as stray $ signs: {bad}"


def test_display_math_check_can_fail():
    assert display_math_mid_paragraph("Then\n$$\nx = 1\n$$") and display_math_mid_paragraph("loss\n$$R = 1$$")
    assert not display_math_mid_paragraph("Then\n\n$$\nx = 1\n$$\nso\n\n$$y$$\n")


@pytest.mark.parametrize("path", MASTERS, ids=lambda p: p.name)
def test_runs_at_tiny_scale(path):
    nb = nbformat.read(executed(path), as_version=4)  # nbclient raises on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert sum(len(c.outputs) for c in nb.cells if c.cell_type == "code") > 0


def glued(nb) -> dict[str, dict]:
    """{glue key: its mime bundle} of an executed notebook (myst-nb marks glued outputs; with
    display=False their mime types carry a prefix)."""
    out = {}
    for o in (o for c in nb.cells if c.cell_type == "code" for o in c.outputs):
        mark = o.get("metadata", {}).get("scrapbook")
        if mark:
            prefix = mark.get("mime_prefix", "")
            out[mark["name"]] = {k.removeprefix(prefix): v for k, v in o.data.items()}
    return out


def plain_text_of_rich_glue(nb) -> list[str]:
    """Keys pasted with {glue:text} whose value is markdown (an IPython Markdown object): the role
    pastes text/plain, so the page would read "<IPython.core.display.Markdown object>"."""
    data = glued(nb)
    used = {k for c in nb.cells if c.cell_type == "markdown" for k in re.findall(r"\{glue:text\}`([^`:]+)", c.source)}
    return sorted(k for k in used if k in data and "text/markdown" in data[k])


@pytest.mark.parametrize("path", MASTERS, ids=lambda p: p.name)
def test_glued_markdown_is_pasted_as_markdown(path):
    bad = plain_text_of_rich_glue(nbformat.read(executed(path), as_version=4))
    assert not bad, f"{path.name}: use {{glue:md}} for these markdown values, not {{glue:text}}: {bad}"


def test_glue_role_check_can_fail():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("best is {glue:text}`best` and {glue:md}`ok`, {glue:text}`n:.2f`"),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "display_data", data={"p/text/plain": "<IPython.core.display.Markdown object>", "p/text/markdown": "**a**"},
            metadata={"scrapbook": {"name": n, "mime_prefix": "p/"}}) for n in ("best", "ok")] + [nbformat.v4.new_output(
                "display_data", data={"text/plain": "0.5"}, metadata={"scrapbook": {"name": "n"}})])])
    assert plain_text_of_rich_glue(nb) == ["best"]

