"""Wall time and peak memory of a command run as its own process (Linux): what the benchmarks
and the chapter "Scaling up" report. Memory is sampled from /proc/PID/smaps_rollup: private
(Private_*: heap plus page-cache pages of memory-mapped inputs), private dirty (the heap) and RSS.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence


def _peaks(proc: subprocess.Popen, interval: float) -> dict[str, int]:
    peak = {"private": 0, "dirty": 0, "rss": 0}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f
                                                        if line.startswith(("Private", "Rss")))}
            private = sum(v for k, v in kb.items() if k.startswith("Private"))
            peak["private"] = max(peak["private"], private * 1024)
            peak["dirty"] = max(peak["dirty"], kb.get("Private_Dirty", 0) * 1024)
            peak["rss"] = max(peak["rss"], kb.get("Rss", 0) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(interval)
    return peak


def measure(cmd: Sequence[str] | str, *, shell: bool = False, env: Mapping[str, str] | None = None,
            repeat: int = 1, clean: Path | None = None, interval: float | None = 0.02) -> dict:
    """Run `cmd` `repeat` times (removing `clean` before each run), sampling its memory every
    `interval` s: the fastest run's wall time ("wall", s), the least CPU time ("cpu", s: user + sys
    of it and its children; steadier than wall time on a loaded machine), the largest peaks over
    all runs ("private", "dirty", "rss", bytes), the last run's stdout and every run's ("stdouts").
    interval=None: no sampling and no peaks. Sampling reads smaps_rollup, which holds the process's
    memory-map lock, so it slows a command that maps and unmaps memory (the streaming merge); time
    such a command unsampled. RuntimeError if it fails."""
    best: dict = {}
    outs: list[str] = []
    for _ in range(repeat):
        if clean is not None:  # each run writes a fresh output
            shutil.rmtree(clean, ignore_errors=True)
        t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **(env or {})})
        peak: dict[str, int] = {}
        th = None if interval is None else threading.Thread(
            target=lambda: peak.update(_peaks(proc, interval)), daemon=True)
        if th is not None:
            th.start()
        out, err = proc.communicate()
        if th is not None:
            th.join()
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
        outs.append(out)
        best = {"wall": wall, "cpu": cpu, **peak, "stdout": out, "stdouts": outs} if not best else {
            "wall": min(best["wall"], wall), "cpu": min(best["cpu"], cpu), "stdout": out, "stdouts": outs,
            **{k: max(best[k], peak[k]) for k in peak}}
    return best
