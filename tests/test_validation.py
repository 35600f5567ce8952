"""Bad input never costs data (issue 9): outputs off their inputs, no coercion of strings into
booleans or numbers, finite knobs in their ranges, finite merged tensors, floating output dtypes,
tied parameters, stale temporaries, and one line + exit code 2 from the CLI for every mistake.
Each test fails on the code before the shared validation layer (`toolkit/validate.py`)."""
import contextlib
import hashlib
import io
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from toolkit.__main__ import EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, main
from toolkit.checkpoint import Checkpoint, fingerprint, save_checkpoint
from toolkit.errors import MergeError
from toolkit.fisherfile import write_fisher
from toolkit.merge import METHODS, merge_models, merge_state_dicts
from toolkit.stream import CONFIG_KEYS, merge_checkpoints, merge_config

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(root: Path, dtype=torch.float32) -> dict:
    """base, m0, m1 (checkpoint dirs) and f0, f1 (Fisher files) under `root`; a valid config."""
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(6, 4, generator=g).to(dtype), "w": torch.randn(4, generator=g).to(dtype),
            "step": torch.tensor(3)}
    save_checkpoint(base, root / "base")
    for i in range(2):
        m = {k: v + 0.1 * (i + 1) if v.is_floating_point() else v for k, v in base.items()}
        save_checkpoint(m, root / f"m{i}")
        write_fisher(root / f"f{i}.safetensors", {k: torch.rand(v.shape, generator=g) for k, v in m.items()
                                                   if v.is_floating_point()},
                     estimator="test", n_examples=3, dataset_size=10.0, model_hash=fingerprint(m))
    return {"base": "base", "models": [{"path": "m0", "alpha": 0.5}, {"path": "m1", "alpha": 0.5}],
            "method": "task_arithmetic", "output": "out"}


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def cli(*argv) -> tuple[int, list[str]]:
    """Run `python -m toolkit` in this process: (exit code, non-empty stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def run_config(root: Path, cfg, *argv) -> tuple[int, list[str]]:
    (root / "c.yaml").write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return cli("merge", root / "c.yaml", "--quiet", *argv)


def assert_one_line_error(rc, lines, *names):
    assert rc == EXIT_BAD_INPUT, lines
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in lines[0], lines
    for n in names:
        assert n in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("output, what", [("m0", "is the input"), (".", "contains the input"),
                                          ("base", "is the input"), ("link", "is the input"),
                                          ("f0.safetensors", "is the input"), ("m1/sub", "lies inside")])
def test_output_never_is_contains_or_lies_inside_an_input(tmp_path, output, what):
    cfg = make_inputs(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "m1", target_is_directory=True)
    cfg = {**cfg, "method": "fisher_average", "output": output, "overwrite": True}
    for i, m in enumerate(cfg["models"]):
        m["fisher"] = f"f{i}.safetensors"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    before = digest(tmp_path)
    rc, lines = cli("merge", tmp_path / "c.yaml", "--quiet", "--overwrite")
    assert_one_line_error(rc, lines, what)
    assert digest(tmp_path) == before  # every input intact, nothing added
    with pytest.raises(MergeError, match=what):  # the API refuses it too, whatever the flags
        merge_checkpoints(tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"], tmp_path / output,
                          overwrite=True, progress=False, method="fisher_average",
                          fishers=[tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"])
    assert digest(tmp_path) == before


@pytest.mark.parametrize("value", ["false", "no", "0", "off", 0, 1, None])
def test_booleans_are_never_coerced(tmp_path, value):
    cfg = make_inputs(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an earlier result")
    before = digest(tmp_path)
    assert_one_line_error(*run_config(tmp_path, {**cfg, "overwrite": value}), "overwrite")
    before["c.yaml"] = digest(tmp_path)["c.yaml"]
    assert digest(tmp_path) == before
    with pytest.raises(MergeError, match="overwrite must be true or false"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "m0"], tmp_path / "out", overwrite=value, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "an earlier result"


def test_tied_parameters_are_refused_or_consistent():
    class LM(nn.Module):
        def __init__(self, tie):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            if tie:
                self.head.weight = self.emb.weight

    torch.manual_seed(0)
    with pytest.raises(MergeError, match="ties parameters differently"):
        merge_models("task_arithmetic", LM(True), [LM(False)])
    with pytest.raises(MergeError, match="ties parameters differently"):
        merge_models("task_arithmetic", LM(False), [LM(True)])
    base, ft = LM(True), LM(True)
    out = merge_models("task_arithmetic", base, [ft], alphas=[0.5])
    assert out.head.weight is out.emb.weight
    torch.testing.assert_close(out.emb.weight, base.emb.weight + 0.5 * (ft.emb.weight - base.emb.weight))


def _stale(root: Path, name: str, pid: int) -> Path:
    host = "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())
    p = root / f".{name}.tmp-{pid}@{host}-abcd1234"
    p.mkdir()
    (p / "model-00001-of-00001.safetensors").write_bytes(b"half" * 1000)
    return p


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    cfg = make_inputs(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone, alive = _stale(tmp_path, "out", int(dead)), _stale(tmp_path, "out", sleeper.pid)
        other = _stale(tmp_path, "other", int(dead))  # another destination's: not ours to touch
        legacy = tmp_path / ".out.tmp-k2j3h4g5"
        legacy.mkdir()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge_config({**cfg, "base": str(tmp_path / "base"), "output": str(tmp_path / "out"),
                          "models": [{"path": str(tmp_path / "m0")}]}, progress=False)
        assert not gone.exists() and alive.exists() and other.exists() and legacy.exists()
        assert any(str(legacy) in str(w.message) for w in caught)  # said where it is
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- silent garbage


@pytest.mark.parametrize("method, knobs, msg", [
    ("gradient_matching", {"delta": float("nan")}, "'delta'.*finite"),
    ("gradient_matching", {"delta": -1.0}, "'delta'.*non-negative"),
    ("gradient_matching", {"base_size": -5.0}, "'base_size'.*non-negative"),
    ("gradient_matching", {"fisher_floor": float("nan")}, "'fisher_floor'.*finite"),
    ("gradient_matching", {"delta": "1e-3"}, "'delta'.*must be a number"),
    ("fisher_average", {"fisher_floor": -1.0}, "'fisher_floor'.*non-negative"),
    ("fisher_average", {"fisher_floor": float("inf")}, "'fisher_floor'.*finite"),
    ("ties", {"lam": float("nan")}, "'lam'.*finite"),
    ("ties", {"density": "0.5"}, "'density'.*must be a number"),
    ("dare", {"p": 1.0}, "'p'.*in \\[0, 1\\)"),
    ("dare", {"seed": 1.5}, "'seed'.*integer"),
])
def test_knobs_are_typed_finite_and_in_range(tmp_path, method, knobs, msg):
    b, ms = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}]
    fs = [{"w": torch.rand(3)}, {"w": torch.rand(3)}]
    kw = dict(fishers=fs, sizes=[1.0, 1.0]) if METHODS[method].uses_fisher else {}
    if "base_size" in knobs:
        kw["base_fisher"] = fs[0]
    with pytest.raises(MergeError, match=msg):
        merge_state_dicts(method, b, ms, **kw, **knobs)
    cfg = make_inputs(tmp_path)
    cfg = {**cfg, "method": method, "options": knobs}
    if METHODS[method].uses_fisher:
        for i, m in enumerate(cfg["models"]):
            m["fisher"] = f"f{i}.safetensors"
    assert_one_line_error(*run_config(tmp_path, cfg), next(iter(knobs)))
    assert not (tmp_path / "out").exists()


def test_negative_prior_never_reaches_the_guard():
    """A negative delta made H_0 < 0, and the guard then blamed negative alphas: it is refused."""
    b, ms = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'negative alphas' warning: an error naming delta instead
        with pytest.raises(MergeError, match="delta"):
            merge_state_dicts("gradient_matching", b, ms, fishers=[{"w": torch.rand(3)}], sizes=[1.0], delta=-1.0)


def test_non_finite_merges_are_never_written(tmp_path):
    cfg = make_inputs(tmp_path, torch.float16)
    big = {**cfg, "models": [{"path": "m0", "alpha": 1e6}, {"path": "m1", "alpha": 1e6}]}
    assert_one_line_error(*run_config(tmp_path, big), "non-finite", "'emb'")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(MergeError, match="merged 'w' has 3 non-finite"):
        merge_state_dicts("task_arithmetic", {"w": torch.zeros(3).half()}, [{"w": torch.ones(3).half()}], [1e6])
    # float32 inputs that only overflow in the requested output dtype, and alphas beyond float32
    cfg32 = make_inputs(tmp_path / "f32")
    assert_one_line_error(*run_config(tmp_path / "f32", {**cfg32, "dtype": "float16", "models": [
        {"path": "m0", "alpha": 1e6}]}), "non-finite", "float16")
    assert_one_line_error(*run_config(tmp_path / "f32", {**cfg32, "models": [{"path": "m0", "alpha": 1e39}]}),
                          "alphas[0]", "float32")
    assert not (tmp_path / "f32" / "out").exists()


@pytest.mark.parametrize("dtype", ["int8", "bool", "uint8", "int64"])
def test_output_dtype_is_floating(tmp_path, dtype):
    cfg = make_inputs(tmp_path)
    assert_one_line_error(*run_config(tmp_path, {**cfg, "dtype": dtype}), "dtype", "floating")
    with pytest.raises(MergeError, match="floating dtype"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "m0"], tmp_path / "out", dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize("patch, key", [
    (lambda c: c["models"][0].update(alpha="abc"), "models[0].alpha"),
    (lambda c: c["models"][0].update(alpha=[1, 2]), "models[0].alpha"),
    (lambda c: c["models"][0].update(alpha=None), "models[0].alpha"),
    (lambda c: c["models"][0].update(alpha=True), "models[0].alpha"),
    (lambda c: c["models"][1].update(size="lots"), "models[1].size"),
    (lambda c: c["models"][1].update(path=5), "models[1].path"),
    (lambda c: c.update(options="fast"), "options"),
    (lambda c: c.update(method=5), "method"),
    (lambda c: c.update(output=["a"]), "output"),
    (lambda c: c.update(base={"x": 1}), "base"),
    (lambda c: c.update(shard_size=float("nan")), "shard_size"),
    (lambda c: c.update(shard_size=True), "shard_size"),
    (lambda c: c.update(dtype=5), "dtype"),
    (lambda c: c.update(models={"path": "m0"}), "models"),
])
def test_mistyped_config_values_name_their_key(tmp_path, patch, key):
    cfg = make_inputs(tmp_path)
    patch(cfg)
    assert_one_line_error(*run_config(tmp_path, cfg), key)
    assert not (tmp_path / "out").exists()


def test_cli_paths_and_flags_fail_in_one_line(tmp_path, monkeypatch):
    cfg = make_inputs(tmp_path)
    assert_one_line_error(*run_config(tmp_path, cfg, "--threads", "-1"), "--threads")
    assert_one_line_error(*run_config(tmp_path, cfg, "--threads", "0"), "--threads")
    assert_one_line_error(*run_config(tmp_path, cfg, "--bogus"), "--bogus")  # argparse, one line too
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(*run_config(tmp_path, {**cfg, "output": "notes.txt/out"}), "notes.txt", "not a folder")
    index = tmp_path / "m0" / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text('{"weight_map": [1, 2]}')
    assert_one_line_error(*run_config(tmp_path, cfg), "weight_map", "index.json")
    (tmp_path / "m0" / "model.safetensors.index.json").write_text('{"weight_map": {"emb": 5}}')
    assert_one_line_error(*run_config(tmp_path, cfg), "weight_map")
    index.write_text(good)
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)  # an unwritable folder (root ignores chmod)
    assert_one_line_error(*run_config(tmp_path, {**cfg, "output": "locked/out"}), "locked", "Permission denied")
    assert not list(tmp_path.glob("**/out"))


def test_api_raises_merge_error_not_raw_python_errors():
    b, ms = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": torch.ones(3)}]
    for call, msg in [
        (lambda: merge_state_dicts("task_arithmetic", b, ms, alphas=0.5), "alphas must be a list"),
        (lambda: merge_state_dicts("task_arithmetic", b, ms, alphas=["a", 1]), r"alphas\[0\] must be a number"),
        (lambda: merge_state_dicts("task_arithmetic", torch.zeros(3), [torch.ones(3)]), "base must be a state dict"),
        (lambda: merge_state_dicts("task_arithmetic", b, ms[0]), "models must be a list of state dicts"),
        (lambda: merge_state_dicts("task_arithmetic", {"w": [0, 0]}, [{"w": [1, 1]}]), r"base\['w'\] must be a tensor"),
        (lambda: merge_state_dicts("task_arithmetic", b, [{"w": 1.0}, ms[1]]), r"models\[0\]\['w'\]"),
        (lambda: merge_state_dicts("gradient_matching", b, ms, fishers=ms, sizes=["a", 1]), r"sizes\[0\]"),
        (lambda: merge_state_dicts("fisher_average", b, ms, fishers=ms[0]), "fishers must be a list"),
    ]:
        with pytest.raises(MergeError, match=msg):
            call()


# ----------------------------------------------------------------------------- property test

NOT_NUMBER = st.one_of(st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                       st.sampled_from([math.nan, math.inf, -math.inf]))
NOT_PATH = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                     st.lists(st.text(max_size=3), min_size=1, max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), min_size=1))
NOT_BOOL = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.floats(allow_nan=False), st.lists(st.booleans()))
# (where, bad value, a word the error must contain)
MISTAKES = st.one_of(
    st.tuples(st.just(("models", 0, "alpha")), NOT_NUMBER, st.just("alpha")),
    st.tuples(st.just(("models", 1, "size")), st.one_of(NOT_NUMBER, st.floats(max_value=0), st.integers(max_value=0)),
              st.just("size")),
    st.tuples(st.sampled_from([("models", 0, "path"), ("models", 1, "fisher"), ("base",), ("output",),
                               ("base_fisher",)]), NOT_PATH, st.just("")),
    st.tuples(st.just(("method",)), st.one_of(st.integers(), st.lists(st.integers(), min_size=1),
                                              st.text(max_size=8).filter(lambda s: s not in METHODS)),
              st.just("method")),
    st.tuples(st.just(("options",)), st.one_of(st.text(max_size=6), st.lists(st.integers(), max_size=2),
                                               st.integers(), st.dictionaries(st.text(min_size=1, max_size=5),
                                                                              st.integers(), min_size=1)),
              st.just("option")),
    st.tuples(st.sampled_from([("delta",), ("base_size",)]), st.one_of(NOT_NUMBER, st.floats(allow_nan=False)),
              st.just("")),
    st.tuples(st.just(("dtype",)), st.one_of(st.sampled_from(["int8", "bool", "uint8", "int64", "float7", "",
                                                              "fp9"]), st.integers(), st.lists(st.text(), min_size=1)),
              st.just("dtype")),
    st.tuples(st.just(("shard_size",)), st.one_of(st.sampled_from(["lots", "-1GB", "0", "1.2.3GB", "GB", ""]),
                                                  st.integers(max_value=0), st.booleans(), st.none(),
                                                  st.lists(st.integers(), max_size=1)), st.just("shard_size")),
    st.tuples(st.just(("overwrite",)), NOT_BOOL, st.just("overwrite")),
    st.tuples(st.just(("models",)), st.one_of(st.just([]), st.text(max_size=4), st.integers(), st.none(),
                                              st.dictionaries(st.text(max_size=3), st.integers())),
              st.just("models")),
    st.tuples(st.just(("models", 1)), st.one_of(st.integers(), st.none(), st.lists(st.integers()),
                                                st.just({"path": "m1", "weight": 2})), st.just("models[1]")),
    st.tuples(st.text(min_size=1, max_size=6).filter(lambda k: k not in CONFIG_KEYS).map(lambda k: (k,)),
              st.integers(), st.just("unknown config field")),
)


def put(cfg, where, value) -> None:
    """cfg[where[0]][where[1]]... = value, where that path still exists (an earlier mistake may have removed it)."""
    node = cfg
    for depth, k in enumerate(where):
        ok = (isinstance(node, dict) and isinstance(k, str)) or \
             (isinstance(node, list) and isinstance(k, int) and k < len(node))
        if not ok:
            return
        if depth == len(where) - 1:
            node[k] = value
        elif isinstance(node, list) or k in node:
            node = node[k]
        else:
            return


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    return root, make_inputs(root)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mistakes=st.lists(MISTAKES, min_size=1, max_size=3))
def test_mistyped_configs_exit_2_in_one_line_and_create_nothing(inputs, mistakes):
    root, valid = inputs
    cfg = yaml.safe_load(yaml.safe_dump(valid))
    for where, value, _ in mistakes:
        put(cfg, where, value)
    if cfg == valid:
        return
    before = digest(root)
    rc, lines = run_config(root, cfg)
    assert rc == EXIT_BAD_INPUT, (cfg, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), (cfg, lines)
    if len(mistakes) == 1 and mistakes[0][2]:
        assert mistakes[0][2] in lines[0], (cfg, lines)
    after = digest(root)
    after.pop("c.yaml"), before.pop("c.yaml", None)
    assert after == before  # no file created, none changed


def test_exit_codes_are_documented():
    codes = {EXIT_OK: "0", EXIT_BUG: "1", EXIT_BAD_INPUT: "2", EXIT_INTERRUPTED: "130"}
    assert codes == {0: "0", 1: "1", 2: "2", 130: "130"}
    readme = (ROOT / "README.md").read_text()
    chapter = (ROOT / "notebooks" / "scaling_up.ipynb").read_text()
    for text in (readme, chapter):
        section = text[text.index("Exit codes"):][:1500]
        for code in codes.values():
            assert f"`{code}`" in section, code


def test_sigterm_removes_the_temporary(tmp_path):
    """Ctrl-C or SIGTERM (not -9) during a merge: exit 130, no output, no temporary."""
    cfg = make_inputs(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    script = ("import os, signal, sys, time\n"
              "from toolkit.checkpoint import ShardWriter\n"
              "from toolkit.__main__ import main\n"
              "real = ShardWriter.write\n"
              "def write(self, name, data):\n"
              "    real(self, name, data); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
              "ShardWriter.write = write\n"
              "sys.exit(main(['merge', sys.argv[1], '--quiet']))\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.yaml")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert r.stderr.strip().splitlines() == ["error: interrupted; no output was written"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
