"""The leaderboard: every registered method gets a row by its decorator alone; knobs on validation."""
import pandas as pd
import pytest
import torch

from toolkit import related as R
from toolkit.experiments import vision as E
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
    row = lb.loc[extra_method]  # the second model itself: normalised 1 on the second task's test half
    assert row[names[1]] == pytest.approx(1.0) and row["label"] == "second model"
    for m in ("regmean", "masknode_average", "fisher_average", "gradient_matching"):
        assert lb.loc[m, "stat_seconds"] > 0 and lb.loc[m, "stat_steps"] > 0
    assert lb.loc["task_arithmetic", "stat_seconds"] == 0


def test_pick_uses_validation_not_test():
    df = pd.DataFrame({"val": [0.5, 0.9, 0.7], "test": [0.99, 0.1, 0.2]})
    assert R.pick(df)["test"] == 0.1
    assert R._mean([1.0, float("nan"), 0.5]) == 0.75


def test_splits_are_disjoint_halves():
    ds = torch.utils.data.TensorDataset(torch.arange(7))
    val, test = R.splits([ds])
    assert list(val[0].indices) == [0, 1, 2] and list(test[0].indices) == [3, 4, 5, 6]
