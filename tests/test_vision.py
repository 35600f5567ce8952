"""The vision pipeline: cache behaviour, models, a tiny end-to-end experiment and its command line."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from toolkit import cache
from toolkit.experiments import pipeline as P, vision as E

METHODS = {m.name: m for m in P.methods()}  # the registered methods whose statistics the benchmark computes
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
    repeats = sum(r for *_, r in V.PRETRAIN_SOURCES)
    assert x.shape == (20 * repeats, 1, 28, 28) and set(y.div(10, rounding_mode="floor").tolist()) == {0, 1, 2}


def test_augment_turns_and_inverts_with_the_given_probability():
    x = torch.rand(400, 1, 28, 28)
    assert V.augment(x, 0.0, torch.Generator()) is x
    out = V.augment(x, 0.5, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1).float().mean()
    assert 0.6 < changed < 0.9  # 1 - 0.5 * 0.5 = 0.75 of the images are turned or inverted
    one = out[(out != x).flatten(1).any(1)][0]
    assert one.shape == (1, 28, 28) and x.sum().item() != out.sum().item()


def test_cosine_schedule_warms_up_then_decays_without_a_peak_above_one():
    f = [V.cosine(i, 100, 0.1) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and max(f) <= 1.0 and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_probe_fits_a_frozen_backbone():
    torch.manual_seed(0)
    cfg = V.VIT["tiny"]
    bb = V.make_backbone(cfg, seed=0)
    x = torch.rand(64, 1, 28, 28)
    y = (x.mean((1, 2, 3)) > x.mean()).long()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    head = V.linear_probe(bb, V.make_head(cfg, 2), torch.utils.data.TensorDataset(x, y), steps=200)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert V.accuracy(V.TaskModel(bb, head), torch.utils.data.TensorDataset(x, y)) > 0.7


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
    assert set(table["study"]) == {"individual", "probe", "base_heads", "multitask", "merge", "fisher",
                                   "fisher_examples", "delta", "subsets"}
    merge = table[table["study"] == "merge"]
    assert set(merge["method"]) == set(METHODS)
    for m, g in merge.groupby("method"):
        n_alpha = 1 if METHODS[m].alpha_cancels else len(s.alphas)
        assert len(g) == n_alpha * len(names) and set(g["task"]) == names
    # every grid point on validation; per alpha grid (method, estimator, #examples, delta) exactly
    # one point, the chosen one, on test; the references on both; the subsets (no knob) on test
    grid = table[table["study"].isin(["merge", "fisher", "fisher_examples", "delta"])]
    assert grid["val_accuracy"].between(0, 1).all()
    tested = grid.fillna({"fisher": "-", "fisher_examples": -1, "delta": -1, "alpha": -1}).groupby(
        ["study", "method", "fisher", "fisher_examples", "delta"])
    assert (tested.apply(lambda g: g.loc[g["accuracy"].notna(), "alpha"].nunique()) == 1).all()
    assert (tested["accuracy"].count() == len(names)).all()
    refs = table[table["study"].isin(["individual", "probe", "base_heads", "multitask"])]
    assert refs["accuracy"].between(0, 1).all() and refs["val_accuracy"].between(0, 1).all()
    assert table.loc[table["study"] == "subsets", "accuracy"].between(0, 1).all()
    ok = (table["individual"] > 0) & table["accuracy"].notna()
    assert ((table.loc[ok, "normalised"] - table.loc[ok, "accuracy"] / table.loc[ok, "individual"]).abs() < 1e-12).all()
    assert set(table.loc[table["study"] == "fisher", "fisher"]) == set(s.fisher_kinds) - {s.fisher_kind}
    sub = table[table["study"] == "subsets"]
    assert set(sub["n_tasks"]) == set(range(2, len(names) + 1))
    assert (sub["mismatch"] > 0).all() and sub["mismatch"].map(math.isfinite).all()
    summ = E.summary(table)
    assert set(summ.index) == set(METHODS)
    cancels = [m for m in METHODS if METHODS[m].alpha_cancels]
    assert (summ.loc[cancels, "val_spread"] == 0).all() and (summ["val_spread"] >= 0).all()
    assert summ["normalised"].between(0, 2).all()


def test_knobs_are_chosen_on_validation_and_reported_on_test(table):
    ch = E.chosen(table)
    merge = table[table["study"] == "merge"].fillna({"alpha": -1.0})
    for _, r in ch.iterrows():
        g = merge[merge["method"] == r["method"]].groupby("alpha", sort=False)[
            ["val_normalised", "normalised"]].mean()
        assert g["val_normalised"].max() == pytest.approx(r["val_normalised"])
        a = -1.0 if pd.isna(r["alpha"]) else r["alpha"]
        assert a == g["val_normalised"].idxmax()  # the first best alpha in grid order
        assert g.loc[a, "normalised"] == pytest.approx(r["normalised"])
        assert g.drop(index=a)["normalised"].isna().all()  # test: the chosen alpha only
    two = pd.concat([table, table.assign(seed=1)])
    st = E.seed_table(two)
    assert (st.loc["individual", "seeds"] == 2) and st.loc["individual", "normalised_mean"] == pytest.approx(1.0)
    assert st.loc[list(METHODS), "normalised_std"].abs().max() < 1e-12  # identical seeds: no spread
    assert "oracle_normalised_mean" not in st
    seeds = P.by_seed(E.per_seed(two), "normalised")
    assert list(seeds.index) == [0, 1] and set(METHODS) | {"individual", "multitask"} <= set(seeds)
    assert P.compare(seeds, "individual", "individual") == "a tie"
    curves = E.alpha_curves(two)
    assert curves["val_normalised_mean"].notna().all() and "normalised_mean" not in curves


def test_second_run_is_served_from_the_cache(table, tiny_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tiny_cache))
    monkeypatch.setattr(V, "fit", lambda *a, **k: pytest.fail("retrained although cached"))
    again = E.run(E.setup("tiny", seed=0), progress=False)
    pd.testing.assert_frame_equal(again, table)


def test_studies_select_rows_and_reuse_the_cache(table, tiny_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tiny_cache))
    only = E.run(E.setup("tiny", seed=0, studies=("merge",)), progress=False)
    always = ["individual", "probe", "base_heads"]
    assert set(only["study"]) == {*always, "merge"}
    want = table[table["study"].isin([*always, "merge"])].reset_index(drop=True)
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


# --- adding data sets to one model (the paper's Figure 1) ---------------------------------------

@pytest.fixture(scope="module")
def adding(tiny_cache):
    from toolkit.experiments import adding as AD
    old = os.environ.get("TOOLKIT_CACHE")
    os.environ["TOOLKIT_CACHE"] = str(tiny_cache)
    try:
        s = AD.setup("tiny", seed=0)
        yield AD, s, AD.run(s), AD.artifacts(s)
    finally:
        os.environ.pop("TOOLKIT_CACHE") if old is None else os.environ.__setitem__("TOOLKIT_CACHE", old)


def test_adding_table_has_every_method_at_every_number_of_added_sets(adding):
    AD, s, df, A = adding
    assert set(df["k"]) == set(s.ks) and set(A["targets"]) == set(s.ks)
    assert set(df["method"]) == set(METHODS) | {"all_data"}
    assert df.groupby("k")["method"].nunique().eq(len(METHODS) + 1).all()
    assert df["accuracy"].between(0, 1).all() and (df["error"] == 1 - df["accuracy"]).all()
    assert (df.loc[df["method"] == "all_data", "distance"] == 0).all()
    assert (df.loc[df["method"] != "all_data", "distance"] > 0).all()
    assert df["mismatch"].map(math.isfinite).all() and (df["mismatch"] > 0).all()
    tuned = df[df["method"].map(lambda m: m in METHODS and not METHODS[m].alpha_cancels)]
    assert tuned["alpha"].isin(s.alphas).all() and tuned["val_accuracy"].between(0, 1).all()
    assert df.loc[~df.index.isin(tuned.index), "val_accuracy"].isna().all()  # nothing to choose
    summ = AD.summary(pd.concat([df, df.assign(seed=1)]))
    assert set(summ.index) == set(METHODS) | {"all_data"} and (summ["accuracy_std"] == 0).all()


def test_adding_source_diagnostics(adding):
    AD, s, df, A = adding
    src = AD.sources(s)
    assert list(src["source"]) == A["names"] and list(src["n"]) == A["sizes"]
    assert math.isnan(src["stationarity"].iloc[0]) and (src["stationarity"].iloc[1:] > 0).all()
    assert src["taylor_cos"].between(-1, 1).all() and (src["taylor_ratio"] > 0).all()
    tab = AD.source_table(pd.concat([src, src.assign(seed=1)]))
    assert list(tab.index) == A["names"] and (tab["taylor_cos_std"] == 0).all()
    cur = AD.curves(s)
    tuned = [m for m in METHODS if not METHODS[m].alpha_cancels]
    assert set(cur["method"]) == set(tuned) and set(cur["k"]) == set(s.ks)
    assert cur["val_accuracy"].between(0, 1).all()
    at_inf = cur[cur["alpha"] == math.inf]  # gradient matching's limit, after all sets
    assert list(at_inf["method"]) == ["gradient_matching"] and list(at_inf["k"]) == [max(s.ks)]
    with pytest.raises(MergeError, match="ks must be"):
        AD.setup("tiny", ks=(0, 1))


def test_adding_artifacts_come_from_the_cache(adding, tiny_cache, monkeypatch):
    AD, s, df, A = adding
    import toolkit.curvature
    monkeypatch.setenv("TOOLKIT_CACHE", str(tiny_cache))
    monkeypatch.setattr(V, "fit", lambda *a, **k: pytest.fail("retrained although cached"))
    monkeypatch.setattr(toolkit.curvature, "fisher", lambda *a, **k: pytest.fail("Fisher recomputed"))
    again = AD.artifacts(s)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again["fishers"], A["fishers"]) for k in a)


def test_taylor_is_exact_for_a_quadratic():
    from toolkit.experiments import adding as AD
    h, own, theta = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]), torch.tensor([0.0, 3.0])
    at_own = {"w": torch.tensor([0.3, -0.2])}
    moved = {"w": at_own["w"] + h * (theta - own)}  # grad of a quadratic with Hessian diag(h)
    got = AD.taylor(moved, at_own, {"w": h}, {"w": theta}, {"w": own})
    assert got["taylor_cos"] == pytest.approx(1.0) and got["taylor_ratio"] == pytest.approx(1.0)
    half = AD.taylor(moved, at_own, {"w": h / 2}, {"w": theta}, {"w": own})
    assert half["taylor_ratio"] == pytest.approx(0.5) and half["taylor_cos"] == pytest.approx(1.0)


def test_adding_sources_differ_in_size_and_theta0_averages_in(adding):
    AD, s, df, A = adding
    sizes = A["sizes"]
    assert sizes[1] > sizes[-1] and len(A["models"]) == len(sizes) == len(A["fishers"])
    avg = AD.merge(s, A, METHODS["average"], 1, 1.0)
    k = next(iter(avg))
    assert torch.allclose(avg[k], (A["base"][k] + A["models"][1][k]) / 2)
    ta = AD.merge(s, A, METHODS["task_arithmetic"], 2, 1.0)
    want = A["base"][k] + (A["models"][1][k] - A["base"][k]) + (A["models"][2][k] - A["base"][k])
    assert torch.allclose(ta[k], want, atol=1e-6)
    assert AD.distance(A["base"], A["base"]) == 0.0


def test_adding_cli_writes_the_table(adding, tiny_cache, tmp_path):
    AD, s, df, A = adding
    out = tmp_path / "adding.csv"
    env = {**os.environ, "TOOLKIT_CACHE": str(tiny_cache), "TOOLKIT_SCALE": "tiny"}
    r = subprocess.run([sys.executable, "-m", "toolkit.experiments", "adding", "--scale", "tiny",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(out)) == len(df) and "gradient_matching" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "toolkit.experiments", "adding", "--scale", "full"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "tiny and small scale only" in bad.stderr
