"""The leaderboard: every registered method gets a row by its decorator alone; knobs on the
validation split carved from the training data, the chosen point on the whole test split;
verdicts over seeds by the book's one rule."""
import pandas as pd
import pytest
import torch

from toolkit import data as D, related as R
from toolkit.experiments import pipeline as P, vision as E
from toolkit.merge import METHODS, register


@pytest.fixture
def extra_method():
    @register("_second_model", label="second model")
    def second(base, thetas, alphas):
        """Returns the second task's model (a test method)."""
        return thetas[1].clone()
    yield "_second_model"
    METHODS.pop("_second_model")


@pytest.fixture
def cache_env(experiment_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(experiment_cache))
    return experiment_cache


def test_leaderboard_has_a_row_per_registered_method_and_wemoe(extra_method, cache_env):
    s = E.setup("tiny", studies=())
    lb = R.leaderboard(s, wemoe_steps=2)
    assert set(lb.index) == set(METHODS) | {"wemoe"}
    assert lb.loc["wemoe", "dynamic"] and lb.loc["wemoe", "extra_params"] > 0
    assert (lb.drop(index="wemoe")["extra_params"] == 0).all()
    names = [t.name for t in s.tasks]
    row = lb.loc[extra_method]  # the second model itself: normalised 1 on the second task's test split
    assert row[names[1]] == pytest.approx(1.0) and row["label"] == "second model"
    for m in ("regmean", "masknode_average", "fisher_average", "gradient_matching"):
        assert lb.loc[m, "stat_seconds"] > 0 and lb.loc[m, "stat_steps"] > 0
    assert lb.loc["task_arithmetic", "stat_seconds"] == 0
    static = lb.drop(index="wemoe")  # every merged model has its gradient mismatch, WEMoE none
    assert (static["mismatch"].astype(float) > 0).all() and pd.isna(lb.loc["wemoe", "mismatch"])
    assert set(lb.loc["wemoe", "val_by_steps"]) == {0, 1, 2}
    assert (lb["seed"] == s.seed).all()


def test_scores_choose_on_validation_and_report_the_whole_test_split(cache_env):
    s = E.setup("tiny", studies=())
    A = E.artifacts(s, progress=False)
    bbs = [ft["backbone"] for ft in A["finetuned"]]
    score = R.Scorer(s, [ft["head"] for ft in A["finetuned"]], bbs, A["vals"], A["tests"])
    for got, full in zip(score.ev["test"].tests, A["tests"]):  # the whole test split, untouched
        x, y = D.as_tensors(full)
        assert len(got) == len(full) and torch.equal(got.tensors[0], x) and torch.equal(got.tensors[1], y)
    for v, full in zip(score.ev["val"].tests, A["vals"]):  # validation: carved from training data
        assert len(v) == min(len(full), R.val_cap(s.scale) or len(full))
    assert score(bbs[0], "test")[0] == pytest.approx(1.0)  # task 0's own model: the unit
    calls = []
    real = score.ev["test"].__call__

    class Spy:
        tests = score.ev["test"].tests

        def __call__(self, *a, **k):
            calls.append(1)
            return real(*a, **k)
    score.ev["test"] = Spy()
    r = R.sweep(s, "task_arithmetic", A["base"], bbs, score, A["names"])
    assert len(calls) == 1  # only the validation-chosen point is evaluated on test
    assert r["alpha"] in s.alphas and set(A["names"]) <= set(r)


def test_pick_uses_validation_not_test():
    df = pd.DataFrame({"val": [0.5, 0.9, 0.7], "test": [0.99, 0.1, 0.2]})
    assert R.pick(df)["test"] == 0.1
    assert R._mean([1.0, float("nan"), 0.5]) == 0.75


def test_verdicts_are_the_paired_rule_over_seeds():
    one = pd.DataFrame({"method": ["a", "b"], "seed": [0, 0], "test": [0.9, 0.8]})
    assert R.verdict(P.by_seed(one, "test"), "a", "b") == "one seed: no verdict"
    three = pd.DataFrame({"method": ["a", "b"] * 3, "seed": [0, 0, 1, 1, 2, 2],
                          "test": [0.9, 0.8, 0.91, 0.8, 0.7, 0.8]})
    assert R.verdict(P.by_seed(three, "test"), "a", "b") == R.WORDS["tie"]
    three.loc[4, "test"] = 0.95
    assert R.verdict(P.by_seed(three, "test"), "a", "b") == R.WORDS["higher"]
    assert R.verdict(P.by_seed(three, "test"), "b", "a", lower="cheaper") == "cheaper"


def test_summary_is_mean_and_sd_over_seeds():
    lb = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "label": ["A", "A", "B", "B"],
                       "test": [0.9, 0.8, 0.7, 0.7], "alpha": [0.3, 1.0, None, None],
                       "knobs": [{}, {}, {"p": 0.3}, {"p": 0.7}], "val": [1.0] * 4, "alpha_spread": [0.1] * 4,
                       "mismatch": [2.0, 4.0, None, None],
                       "stat_seconds": [0.0] * 4, "stat_steps": [0.0] * 4, "merge_seconds": [0.1] * 4,
                       "extra_params": [0] * 4, "dynamic": [False] * 4})
    res = R.summary(lb)
    assert list(res.index) == ["a", "b"]
    assert res.loc["a", "test"] == pytest.approx(0.85) and res.loc["a", "test sd"] == pytest.approx(0.0707, abs=1e-4)
    assert res.loc["a", "alpha per seed"] == "0.3 1" and res.loc["b", "alpha per seed"] == "- -"
    assert res.loc["b", "knobs per seed"] == "0.3 0.7" and res.loc["a", "seeds"] == 2
    assert res.loc["a", "mismatch"] == pytest.approx(3.0) and pd.isna(res.loc["b", "mismatch"])
    assert R.plus_minus(0.85, float("nan")) == "0.850" and R.plus_minus(0.85, 0.07) == "0.850 ± 0.070"


def test_studies_use_the_tasks_with_fewest_training_examples(cache_env):
    s = E.setup("tiny", studies=())
    A = E.artifacts(s, progress=False)
    idx = R.study_tasks(s, A)
    assert len(idx) == R.study_size("tiny") and idx == sorted(idx)
    others = [i for i in range(len(s.tasks)) if i not in idx]
    assert max(len(A["trains"][i]) for i in idx) <= min(len(A["trains"][i]) for i in others)
    s2, B = R.subset(s, A, idx)
    assert [t.name for t in s2.tasks] == B["names"] == [A["names"][i] for i in idx]


def test_scope_finetune_at_strength_zero_is_chapter_5s_model(cache_env):
    """The WSA study compares with chapter 5's models: its recipe must be theirs but for R."""
    s = E.setup("tiny", studies=())
    A = E.artifacts(s, progress=False)
    ft, _ = R.scope_finetune(s, A["base"], A["base_cfg"], s.tasks[0], A["trains"][0], 0.0)
    for part in ("backbone", "head"):
        ref = A["finetuned"][0][part]
        assert all(torch.equal(ft[part][k], ref[k]) for k in ref)
    wsa, _ = R.scope_finetune(s, A["base"], A["base_cfg"], s.tasks[0], A["trains"][0], 1e3)
    assert not all(torch.equal(wsa["backbone"][k], v) for k, v in ft["backbone"].items())


def test_studies_over_seeds(cache_env):
    iv = R.over_seeds(R.ivon_study, (0,), "tiny")
    assert set(iv["H_t"]) == {"IVON (free)", "MC Fisher (post hoc)", "none (task arithmetic)"}
    assert (iv.set_index("H_t").loc["MC Fisher (post hoc)", "stat_steps"] > 0)
    sc = R.over_seeds(R.scope_study, (0,), "tiny")
    assert set(sc["fine-tuning"]) == {"without", "with WSA"} and set(sc["method"]) == set(R.SCOPE_METHODS)
    assert (sc["seed"] == 0).all() and (sc["mismatch_alpha1"] > 0).all()


def test_text_leaderboard_has_every_method_and_wemoe_with_knobs_on_validation(cache_env, monkeypatch):
    """Chapter 6's text-add benchmark: a row per registered method plus WEMoE, only the
    validation-chosen point of each static method evaluated on test, a mismatch for each."""
    from toolkit.experiments import text_add as TA
    s = TA.setup("tiny")
    calls = []
    real = R.Scorer.__call__
    monkeypatch.setattr(R.Scorer, "__call__", lambda self, sd, split: calls.append(split) or real(self, sd, split))
    raw = R._text_leaderboard(s, 2, False)
    plain = (int, float, str, bool, dict, list, type(None))  # the cache loads weights only: no numpy
    assert all(isinstance(v, plain) for r in raw for v in r.values())
    rows = pd.DataFrame(raw).set_index("method")
    assert set(rows.index) == set(METHODS) | {"wemoe"}
    static = rows.drop(index="wemoe")
    assert calls.count("test") == len(static) and calls.count("val") > len(static)
    assert (static["mismatch"].astype(float) > 0).all() and pd.isna(rows.loc["wemoe", "mismatch"])
    assert rows.loc["wemoe", "dynamic"] and rows.loc["wemoe", "extra_params"] > 0
    assert set(rows.loc["wemoe", "val_by_steps"]) == {0, 1, 2}
    for m in ("regmean", "masknode_average", "fisher_average", "gradient_matching"):
        assert rows.loc[m, "stat_steps"] > 0
    assert rows.loc["gradient_matching", "knobs"]["delta"] in s.deltas  # relative to mean(N_t F_t)
    assert set(s.tasks) <= set(rows.columns)
    lb = R.text_leaderboard(s, wemoe_steps=2)  # the cached table: indexed by method, a seed column
    assert set(lb.index) == set(rows.index) and (lb["seed"] == s.seed).all()
