"""The benchmark scripts run, at their smallest sizes, and print what the closing notes quote: their
figures are the evidence for speed targets, so a script that no longer runs must fail here."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{script} failed:\n{r.stderr[-3000:]}"
    return r.stdout


def test_bench_merge_prints_every_row_and_a_correct_merge(tmp_path):
    out = bench("bench_merge.py", "--params", "1M", "--models", "2", "--shards", "1", "--repeat", "1",
                "--workdir", str(tmp_path / "w"), "--mergekit", "")
    for row in ("read+write floor", "floor with the Fisher files", "startup", "toolkit task_arithmetic",
                "toolkit TA + Fishers", "toolkit gradient_matching"):
        assert re.search(rf"^{re.escape(row)}.* \d+\.\d\d ", out, re.M), f"no row {row!r} in:\n{out}"
    assert "gradient matching's floor in our merge" in out
    err = float(re.search(r"max relative error vs float64 base \+ sum alpha tau: (\S+?);?$", out, re.M).group(1))
    assert err < 1e-6
    assert not (tmp_path / "w").exists()  # generated checkpoints are removed without --keep


def test_bench_curvature_agrees_with_the_loop_and_times_the_exact_floor():
    out = bench("bench_curvature.py", "--repeats", "1", "--batch", "8", "--models", "MLP")
    assert "(within 1e-5)" in out
    for kind in ("exact", "mc", "empirical", "batch_squared"):
        assert f"| MLP | {kind} | hooks |" in out
    assert re.search(r"\| MLP \| C backward passes \(exact's floor\) \| (batched|sequential) \|", out)
    assert re.search(r"target exact <= 3x a training step on MLP: \d+\.\d\dx", out)


def test_bench_stats_prints_every_statistic():
    out = bench("bench_stats.py", "--examples", "16", "--batch", "8", "--repeats", "1", "--threads", "1")
    for row in ("Fisher, mc (hooks)", "Fisher, exact (hooks)", "mask-node Fisher", "Gram matrices (RegMean)",
                "IVON step / AdamW step", "IVON Hessian (extra over AdamW)"):
        assert re.search(rf"^\| {re.escape(row)} \|.*\| \d+\.\d\d \|$", out, re.M), f"no row {row!r} in:\n{out}"
