"""toolkit.measure: wall time and peak memory of a child process."""
import sys

import pytest

from toolkit.measure import measure


def test_measures_a_child_that_allocates_and_sleeps():
    code = "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.4)"
    r = measure([sys.executable, "-c", code], repeat=2, interval=0.01)
    assert r["wall"] >= 0.4 and r["dirty"] >= 150 * 2**20 and r["private"] >= r["dirty"]
    assert r["rss"] >= r["dirty"]
    r = measure([sys.executable, "-c", "import os; print(os.getpid())"], repeat=3, interval=None)
    assert len(r["stdouts"]) == 3 and len(set(r["stdouts"])) == 3 and r["stdout"] == r["stdouts"][-1]
    assert "private" not in r and r["wall"] > 0  # unsampled: times only
    with pytest.raises(RuntimeError, match="failed"):
        measure([sys.executable, "-c", "raise SystemExit(3)"])
