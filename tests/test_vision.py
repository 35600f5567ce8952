"""The vision pipeline: cache behaviour, models, a tiny end-to-end experiment and its command line."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from toolkit import cache
from toolkit.experiments import vision as E
from toolkit.merge import METHODS
from toolkit import vision as V
from toolkit.errors import MergeError


# --- cache --------------------------------------------------------------------------------------

def test_cache_hit_miss_and_invalidation(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"w": torch.arange(3.0)}  # noqa: E731
    a = cache.cached("thing", {"lr": 1e-3, "task": "mnist"}, compute, root=tmp_path)
    b = cache.cached("thing", {"task": "mnist", "lr": 1e-3}, compute, root=tmp_path)  # same config
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    cache.cached("thing", {"lr": 2e-3, "task": "mnist"}, compute, root=tmp_path)       # config changed
    assert len(calls) == 2
    assert len(list((tmp_path / "thing").glob("*.pt"))) == 2
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left nothing behind


def test_cache_recovers_from_a_truncated_file_and_can_be_off(tmp_path, monkeypatch):
    cache.cached("x", {"a": 1}, lambda: torch.ones(2), root=tmp_path)
    path = cache.path_for("x", {"a": 1}, tmp_path)
    path.write_bytes(path.read_bytes()[:10])
    assert torch.equal(cache.cached("x", {"a": 1}, lambda: torch.zeros(2), root=tmp_path), torch.zeros(2))
    monkeypatch.setenv("TOOLKIT_CACHE", "off")
    assert cache.cache_dir() is None
    calls = []
    for _ in range(2):
        cache.cached("x", {"a": 1}, lambda: calls.append(1) or 0)
    assert len(calls) == 2
    with pytest.raises(MergeError, match="not plain data"):
        cache.key({"model": torch.nn.Linear(1, 1)})


# --- models -------------------------------------------------------------------------------------

def test_task_model_keys_and_backbone_round_trip():
    cfg = V.VIT["tiny"]
    bb, head = V.make_backbone(cfg, seed=1), V.make_head(cfg, 10)
    model = V.TaskModel(bb, head)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    sd = V.backbone_keys(model.state_dict())
    assert set(sd) == set(bb.state_dict())
    copy = V.task_model(cfg, sd, head.state_dict(), 10)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(copy(x), model.eval()(x))


def test_subsets():
    assert V.subsets(3) == [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    s = V.subsets(5, per_size=2)
    assert [len(x) for x in s] == [2, 2, 3, 3, 4, 4, 5]


def test_pretraining_mix_covers_every_source():
    mix = V.pretrain_data("small", 20)
    x, y = mix.tensors
    assert x.shape == (60, 1, 28, 28) and set(y.div(10, rounding_mode="floor").tolist()) == {0, 1, 2}


# --- the experiment at tiny scale ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(experiment_cache):
    return experiment_cache


@pytest.fixture(scope="module")
def table(tiny_cache):
    old = os.environ.get("TOOLKIT_CACHE")
    os.environ["TOOLKIT_CACHE"] = str(tiny_cache)
    try:
        yield E.run(E.setup("tiny", seed=0), progress=False)
    finally:
        os.environ.pop("TOOLKIT_CACHE") if old is None else os.environ.__setitem__("TOOLKIT_CACHE", old)


def test_tiny_experiment_table_is_well_formed(table):
    s = E.setup("tiny")
    names = {t.name for t in s.tasks}
    assert set(table["study"]) == {"individual", "multitask", "merge", "fisher", "fisher_examples", "delta", "subsets"}
    merge = table[table["study"] == "merge"]
    assert set(merge["method"]) == set(METHODS)
    for m, g in merge.groupby("method"):
        n_alpha = 1 if METHODS[m].alpha_cancels else len(s.alphas)
        assert len(g) == n_alpha * len(names) and set(g["task"]) == names
    assert table["accuracy"].between(0, 1).all()
    ok = table["individual"] > 0
    assert ((table.loc[ok, "normalised"] - table.loc[ok, "accuracy"] / table.loc[ok, "individual"]).abs() < 1e-12).all()
    assert set(table.loc[table["study"] == "fisher", "fisher"]) == set(s.fisher_kinds) - {s.fisher_kind}
    sub = table[table["study"] == "subsets"]
    assert set(sub["n_tasks"]) == set(range(2, len(names) + 1))
    assert (sub["mismatch"] > 0).all() and sub["mismatch"].map(math.isfinite).all()
    summ = E.summary(table)
    assert set(summ.index) == set(METHODS)
    cancels = [m for m in METHODS if METHODS[m].alpha_cancels]
    assert (summ.loc[cancels, "spread"] == 0).all() and (summ["spread"] >= 0).all()


def test_second_run_is_served_from_the_cache(table, tiny_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tiny_cache))
    monkeypatch.setattr(V, "fit", lambda *a, **k: pytest.fail("retrained although cached"))
    again = E.run(E.setup("tiny", seed=0), progress=False)
    pd.testing.assert_frame_equal(again, table)


def test_studies_select_rows_and_reuse_the_cache(table, tiny_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tiny_cache))
    only = E.run(E.setup("tiny", seed=0, studies=("merge",)), progress=False)
    assert set(only["study"]) == {"individual", "merge"}
    want = table[table["study"].isin(["individual", "merge"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(only.reset_index(drop=True), want)


def test_cli_writes_the_table(tiny_cache, tmp_path, table):
    out = tmp_path / "sub" / "vision.csv"
    env = {**os.environ, "TOOLKIT_CACHE": str(tiny_cache), "TOOLKIT_SCALE": "tiny"}
    r = subprocess.run([sys.executable, "-m", "toolkit.experiments", "vision", "--scale", "tiny", "--seed", "0",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == len(table) and set(METHODS) <= set(df["method"])
    assert "gradient_matching" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "toolkit.experiments", "vision", "--scale", "huge"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
