"""Student copies of the chapters: `python -m toolkit.students [--check]`.

Regenerates notebooks/student/ from the master notebooks in notebooks/: every code cell inside a
sphinx-exercise gated solution (between the `{solution-start}` and `{solution-end}` markdown
cells) becomes a stub that raises NotImplementedError, prose inside a solution becomes a prompt,
and all outputs are stripped. The Colab install cell stays, so a student copy opens on Colab.
`--check` writes nothing and exits 1 when the committed copies are stale.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

from .atomic import atomic_file

ROOT = Path(__file__).resolve().parent.parent
MASTERS = ROOT / "notebooks"
STUDENT = MASTERS / "student"
START = re.compile(r"^(```+)\{solution-start\}\s*(\S+).*?^\1[ \t]*$", re.M | re.S)
END = re.compile(r"^(```+)\{solution-end\}.*?^\1[ \t]*$", re.M | re.S)
PROMPT = "*Your answer here.*"
HEADER = ("**Student copy.** The solutions are removed: replace each `NotImplementedError` stub "
          "with your code. Generated from `notebooks/{name}` by `python -m toolkit.students`; "
          "do not edit by hand.")


def stub(label: str) -> str:
    return f'# Your solution to exercise {label}.\nraise NotImplementedError("exercise {label}: write your solution here")'


def has_solutions(nb: nbformat.NotebookNode) -> bool:
    return any(c.cell_type == "markdown" and START.search(c.source) for c in nb.cells)


def student_copy(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The student version of master notebook `nb` (a new object; `nb` is not modified)."""
    out = copy.deepcopy(nb)
    cells, label = [], None  # label: the exercise whose solution we are inside, or None
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if label is not None:
                cell.source = stub(label)
        elif cell.cell_type == "markdown":
            src = cell.source
            if label is not None:  # inside a solution: keep only what follows its end marker
                end = END.search(src)
                src = PROMPT if end is None else PROMPT + "\n\n" + src[end.start():]
                label = None if end else label
            start = START.search(src)
            if start:
                label = start.group(2)
                rest = src[start.end():]
                end = END.search(rest)
                if end:  # a one-cell solution
                    rest, label = PROMPT + "\n\n" + rest[end.start():], None
                elif rest.strip():
                    rest = "\n\n" + PROMPT
                src = src[:start.end()] + ("\n" if rest and not rest.startswith("\n") else "") + rest
            cell.source = src
        cells.append(cell)
    if label is not None:
        raise ValueError(f"{name}: solution {label!r} has no {{solution-end}}")
    header = nbformat.v4.new_markdown_cell(HEADER.format(name=name))
    header.id = "student-copy-header"
    out.cells = [header] + cells
    out.metadata.pop("widgets", None)
    return out


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def masters() -> list[Path]:
    """Master notebooks that contain gated solutions."""
    return sorted(p for p in MASTERS.glob("*.ipynb") if has_solutions(nbformat.read(p, as_version=4)))


def expected() -> dict[str, str]:
    """File name -> text of every student copy, generated from the masters."""
    return {p.name: render(student_copy(nbformat.read(p, as_version=4), p.name)) for p in masters()}


def stale() -> list[str]:
    """Names of student copies that are missing, out of date or orphaned."""
    want = expected()
    have = {p.name: p.read_text() for p in STUDENT.glob("*.ipynb")} if STUDENT.is_dir() else {}
    return sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))


def write() -> list[str]:
    """Regenerate notebooks/student/ (each file written to a temporary file, then renamed)."""
    want = expected()
    STUDENT.mkdir(exist_ok=True)
    for name, text in want.items():
        with atomic_file(STUDENT / name) as tmp:
            tmp.write_text(text)
    for p in STUDENT.glob("*.ipynb"):
        if p.name not in want:
            p.unlink()
    return sorted(want)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toolkit.students", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed copies are stale")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        print("student copies are up to date" if not bad else
              f"stale student copies: {', '.join(bad)}; run `python -m toolkit.students`")
        return 1 if bad else 0
    for name in write():
        print(f"wrote notebooks/student/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
