"""The experiments' shared pipeline: jobs side by side in processes, tables per group."""
from __future__ import annotations

import os

import pandas as pd
import torch

from toolkit.experiments import pipeline as P


def where(i: int) -> pd.DataFrame:
    """A job's table: which process ran it, with how many torch threads."""
    return pd.DataFrame({"job": [i], "pid": [os.getpid()], "threads": [torch.get_num_threads()]})


def test_parallel_runs_jobs_in_single_threaded_processes_and_keeps_their_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    a, b = P.tables([(where, (0,)), (where, (1,))], [(where, (2,))], workers=2)
    assert list(a["job"]) == [0, 1] and list(b["job"]) == [2]
    both = pd.concat([a, b])
    assert (both["pid"] != os.getpid()).all() and (both["threads"] == 1).all()


def test_parallel_runs_here_without_a_cache_or_with_one_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", "off")  # the processes could not hand anything on
    assert (P.tables([(where, (0,)), (where, (1,))])[0]["pid"] == os.getpid()).all()
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    assert P.parallel([(where, (0,)), (where, (1,))], workers=1)[1]["pid"].item() == os.getpid()
