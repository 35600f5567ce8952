"""The book's time budget: every chapter run cold, as `make book` runs it, against its share. Not a test.

    python benchmarks/bench_book.py [--scale small] [--cache DIR] [--chapters 05_vision 06_language]

Executes each notebook of _toc.yml in order (nbclient, cwd notebooks/, TOOLKIT_SCALE=--scale) as its
own process with TOOLKIT_CACHE=--cache (default: a new empty folder, so the run is cold; later
chapters read what earlier ones cached, as in `make book`), and prints per chapter its wall time,
CPU time (user + sys, kernel included; steadier than wall time on a loaded machine), the kernel's
peak RSS and
its budget, and the total against the whole book's (20 min for a cold `make book` on 2 cores,
the notebooks plus Sphinx's own time, about 10 s). The load average is printed: timings taken beside
other work are inflated.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


from toolkit import toc
from toolkit.measure import measure

ROOT = Path(__file__).resolve().parent.parent
# seconds of wall time on 2 quiet cores, per chapter of a cold `small` build; the rest of 20 min is Sphinx
BUDGET = {"01_averaging": 30, "02_mismatch": 35, "03_gradient_matching": 30, "04_fisher": 25,
          "05_vision": 440, "06_language": 370, "07_related": 180, "scaling_up": 40}
BOOK_BUDGET = 20 * 60
SPHINX = 30  # seconds Jupyter Book spends besides executing the notebooks (measured: about 10 s)

RUN = """
import resource, sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=3600, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # the kernel's peak RSS, KiB
"""


def chapters() -> list[str]:
    """The notebooks of _toc.yml in reading order (their stems)."""
    return toc.notebooks(ROOT / "_toc.yml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--cache", default=None, help="TOOLKIT_CACHE (default: a new empty folder: cold)")
    ap.add_argument("--chapters", nargs="*", default=None, help="stems to run (default: all, in order)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="bench-book-")
    names = args.chapters or chapters()
    env = {"TOOLKIT_SCALE": args.scale, "TOOLKIT_CACHE": cache, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    print(f"scale {args.scale}, cache {cache}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'chapter':24} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'budget s':>9}", flush=True)
    total = 0.0
    for name in names:
        nb = ROOT / "notebooks" / f"{name}.ipynb"
        r = measure([sys.executable, "-c", RUN, str(nb), str(nb.parent)], env=env, interval=0.5)
        rss = int(r["stdout"].split()[-1]) * 1024
        total += r["wall"]
        flag = "" if r["wall"] <= BUDGET.get(name, float("inf")) else "  over"
        print(f"{name:24} {r['wall']:8.0f} {r['cpu']:8.0f} {rss / 2**30:12.1f} "
              f"{BUDGET.get(name, float('nan')):9.0f}{flag}", flush=True)
    print(f"{'notebooks':24} {total:8.0f}\n{'+ Sphinx (estimate)':24} {total + SPHINX:8.0f} "
          f"of {BOOK_BUDGET} s for the whole book; load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
