"""Student copies: generated from the masters, solutions stubbed, outputs stripped, never stale."""
from __future__ import annotations

import copy
import re

import nbformat
import pytest

from toolkit import students

START = "```{solution-start} ex-1\n:class: dropdown\n```"
END = "```{solution-end}\n```"


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, src in cells:
        c = nbformat.v4.new_code_cell(src) if kind == "code" else nbformat.v4.new_markdown_cell(src)
        if kind == "code":
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="secret output\n")]
            c.execution_count = 3
        nb.cells.append(c)
    return nb


def test_solution_code_becomes_stub_and_the_rest_stays():
    nb = _nb(("code", "x = 1"), ("markdown", "```{exercise-start}\n:label: ex-1\n```\nQ?\n```{exercise-end}\n```"),
             ("markdown", START + "\nThe answer is 42 because ..."), ("code", "answer = 42"),
             ("markdown", "more secret prose"), ("code", "print(answer)"),
             ("markdown", END + "\n\n## After"), ("code", "y = 2"))
    before = copy.deepcopy(nb)
    out = students.student_copy(nb, "demo.ipynb")
    assert nb == before, "the master must not be modified"
    code = [c.source for c in out.cells if c.cell_type == "code"]
    assert code[0] == "x = 1" and code[-1] == "y = 2"
    for src in code[1:3]:
        assert "NotImplementedError" in src and "ex-1" in src and "42" not in src
    text = "\n".join(c.source for c in out.cells if c.cell_type == "markdown")
    assert "42" not in text and "secret" not in text
    assert "{solution-start} ex-1" in text and "{solution-end}" in text and "## After" in text
    assert all(c.outputs == [] and c.execution_count is None for c in out.cells if c.cell_type == "code")
    assert "Student copy" in out.cells[0].source


def test_one_cell_solution_keeps_what_follows():
    nb = _nb(("markdown", START + "\nsecret\n" + END + "\ntail text"), ("code", "z = 3"))
    out = students.student_copy(nb, "demo.ipynb")
    md = out.cells[1].source
    assert "secret" not in md and "tail text" in md
    assert out.cells[2].source == "z = 3", "code after the solution is not stubbed"


def test_unclosed_solution_is_an_error():
    with pytest.raises(ValueError, match="solution-end"):
        students.student_copy(_nb(("markdown", START), ("code", "a = 1")), "bad.ipynb")


def test_committed_copies_are_fresh():
    stale = students.stale()
    assert not stale, f"stale student copies {stale}: run `python -m toolkit.students` and commit"
    assert students.main(["--check"]) == 0


@pytest.mark.parametrize("path", students.masters(), ids=lambda p: p.name)
def test_every_exercise_has_a_solution(path):
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    exercises = re.findall(r"\{exercise-start\}\s*\n:label:\s*(\S+)", text)
    solutions = re.findall(r"\{solution-start\}\s*(\S+)", text)
    assert len(exercises) >= 2, f"{path.name}: a chapter ends with at least two exercises"
    assert sorted(exercises) == sorted(solutions), f"{path.name}: exercises {exercises}, solutions {solutions}"


@pytest.mark.parametrize("path", students.masters(), ids=lambda p: p.name)
def test_student_copy_hides_every_solution(path):
    master = nbformat.read(path, as_version=4)
    copy_ = nbformat.read(students.STUDENT / path.name, as_version=4)
    stubs = [c for c in copy_.cells if c.cell_type == "code" and "NotImplementedError" in c.source]
    n_solutions = len(re.findall(r"\{solution-start\}", "\n".join(c.source for c in master.cells)))
    assert len(stubs) >= n_solutions
    assert copy_.cells[1].source == master.cells[0].source, "the chapter text starts unchanged"
