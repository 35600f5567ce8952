"""The README's quickstart is real code: it runs and every method gives a finite merge."""
import re
from pathlib import Path



def test_quickstart_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    from toolkit import METHODS
    assert [ln.split()[0] for ln in lines] == list(METHODS)
