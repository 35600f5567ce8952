"""The streaming merge: equal to the in-memory merge for every method, exact task arithmetic,
sharded output that transformers loads, dtypes, atomic output, untouched inputs, clear errors, CLI."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from toolkit.checkpoint import INDEX, Checkpoint, ShardWriter, fingerprint, save_checkpoint
from toolkit.errors import MergeError
from toolkit.fisherfile import write_fisher
from toolkit import stream
from toolkit.merge import METHODS, merge_state_dicts
from toolkit.stream import load_config, merge_checkpoints, merge_config
from toolkit.tiny import make_llama

ALPHAS = [0.7, -0.3, 1.2]
OPTIONS = {"ties": {"density": 0.5}, "dare": {"p": 0.3, "seed": 1}, "gradient_matching": {"delta": 1e-2},
           "fisher_average": {"fisher_floor": 1e-8}}


def synthetic(tmp_path, dtype=torch.float32, n_models=3):
    """Base, models (dirs of sharded safetensors) and Fisher files with model hashes."""
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(50, 8, generator=g), "l.w": torch.randn(8, 8, generator=g),
            "l.b": torch.randn(8, generator=g), "norm": torch.ones(8), "step": torch.tensor(3)}
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    models = [{k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n_models)]
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
               for _ in range(n_models + 1)]
    save_checkpoint(base, tmp_path / "base", shard_size=700)
    paths, fpaths = [], []
    for i, m in enumerate(models):
        paths.append(save_checkpoint(m, tmp_path / f"m{i}", shard_size=500 + 100 * i))
        fpaths.append(write_fisher(tmp_path / f"f{i}.safetensors", fishers[i], estimator="test", n_examples=10,
                                   dataset_size=100.0 * (i + 1), model_hash=fingerprint(m)))
    bf = write_fisher(tmp_path / "fb.safetensors", fishers[-1], estimator="test", n_examples=10,
                      dataset_size=50.0, model_hash=fingerprint(base))
    return base, models, fishers, tmp_path / "base", paths, fpaths, bf


def digest(*dirs):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stream_equals_in_memory_merge_for_every_method(tmp_path, monkeypatch, method):
    monkeypatch.setattr(stream, "BLOCK", 11)  # chunks of 37 merged in blocks of 11; tensors of 8 in one
    base, models, fishers, bpath, paths, fpaths, bf = synthetic(tmp_path)
    uses_f = METHODS[method].uses_fisher
    alphas = [0.5, 0.3, 0.4] if method in ("fisher_average", "average", "regmean", "masknode_average") else ALPHAS
    sizes = [100.0, 200.0, 300.0]
    kw = dict(fishers=fishers[:3], sizes=sizes) if uses_f else {}
    sfiles = None
    if "grams" in METHODS[method].stats:  # RegMean: a Gram file per model, for the linear weight only
        from toolkit.gram import write_grams
        gs = [{"l.w": (lambda a: a @ a.T)(torch.randn(8, 8, generator=torch.Generator().manual_seed(i)))}
              for i in range(3)]
        kw["stats"] = {"grams": gs}
        sfiles = {"grams": [write_grams(tmp_path / f"g{i}.safetensors", g, n_examples=5) for i, g in enumerate(gs)]}
    if "node_fishers" in METHODS[method].stats:  # mask nodes: per-element weights for some tensors only
        nf = [{"l.w": f["l.w"] + 0.1, "emb": f["emb"] + 0.1} for f in fishers[:3]]
        kw["stats"] = {"node_fishers": nf}
        sfiles = {"node_fishers": [tmp_path / f"n{i}.safetensors" for i in range(3)]}
        for p, f in zip(sfiles["node_fishers"], nf):
            save_file(f, str(p))
    if method == "gradient_matching":
        kw |= dict(base_fisher=fishers[3], base_size=50.0)
    want = merge_state_dicts(method, base, models, alphas, **kw, **OPTIONS.get(method, {}))
    before = digest(tmp_path)
    s = merge_checkpoints(bpath, paths, tmp_path / "out", method=method, alphas=alphas,
                          fishers=fpaths if uses_f else None,  # sizes come from the files' metadata
                          base_fisher=bf if method == "gradient_matching" else None,
                          options=OPTIONS.get(method), shard_size=300, chunk=37, progress=False, stats=sfiles)
    assert digest(tmp_path) == {**before, **digest(tmp_path / "out")}  # inputs untouched
    got = Checkpoint(tmp_path / "out").state_dict()
    assert set(got) == set(want) and s.tensors == len(want) and s.shards > 1
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_task_arithmetic_matches_float64_and_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "base", seed=0, hidden=32)
    models = [make_llama(tmp_path / f"ft{i}", seed=i + 1, like=base) for i in range(3)]
    s = merge_checkpoints(base, models, tmp_path / "merged", alphas=ALPHAS, shard_size="60kB", chunk=1000,
                          progress=False)
    out = tmp_path / "merged"
    assert {"config.json", "tokenizer.json", "generation_config.json", INDEX} <= {p.name for p in out.iterdir()}
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == s.shards > 1
    b, cks = Checkpoint(base), [Checkpoint(m) for m in models]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(index["weight_map"]) == set(b.infos) <= set(merged)
    for k in b.infos:
        b64 = b.tensor(k).double()
        ref = b64 + sum(a * (c.tensor(k).double() - b64) for a, c in zip(ALPHAS, cks))
        torch.testing.assert_close(merged[k].double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_half_precision_is_computed_in_fp32_and_cast(tmp_path):
    base, models, _, bpath, paths, _, _ = synthetic(tmp_path, torch.bfloat16)
    up = lambda sd: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    want32 = merge_state_dicts("task_arithmetic", up(base), [up(m) for m in models], ALPHAS)
    merge_checkpoints(bpath, paths, tmp_path / "o16", alphas=ALPHAS, chunk=64, progress=False)
    merge_checkpoints(bpath, paths, tmp_path / "o32", alphas=ALPHAS, dtype="float32", chunk=64, progress=False)
    o16, o32 = Checkpoint(tmp_path / "o16").state_dict(), Checkpoint(tmp_path / "o32").state_dict()
    for k, v in want32.items():
        assert o16[k].dtype == base[k].dtype and torch.equal(o16[k], v.to(base[k].dtype)), k
        assert o32[k].dtype == v.dtype and torch.equal(o32[k], v), k  # no bf16 rounding in between
    assert not torch.equal(o32["emb"], o16["emb"].float())


def test_output_dtype_updates_config(tmp_path):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1, like=base)
    merge_checkpoints(base, [ft], tmp_path / "out", dtype="bf16", progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert {i.dtype for i in Checkpoint(tmp_path / "out").infos.values()} == {torch.bfloat16}


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    _, _, _, bpath, paths, _, _ = synthetic(tmp_path)
    before, entries = digest(tmp_path), sorted(tmp_path.iterdir())
    calls = {"n": 0}
    real = ShardWriter.write

    def dying(self, name, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed mid-way")
        real(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(bpath, paths, tmp_path / "out", shard_size=300, chunk=37, progress=False)
    assert calls["n"] == 5  # it died after writing part of the output...
    assert sorted(tmp_path.iterdir()) == entries and digest(tmp_path) == before  # ...which left no trace


def test_mismatched_inputs_raise_merge_error(tmp_path):
    base, models, fishers, bpath, paths, fpaths, bf = synthetic(tmp_path)
    cases = {
        "missing": {k: v for k, v in models[0].items() if k != "l.b"},
        "shape": dict(models[0], **{"l.w": torch.zeros(8, 9)}),
        "dtype": dict(models[0], **{"l.w": models[0]["l.w"].double()}),
    }
    for what, sd in cases.items():
        save_file(sd, tmp_path / f"{what}.safetensors")
        with pytest.raises(MergeError, match=what if what != "missing" else "does not match"):
            merge_checkpoints(bpath, [paths[1], tmp_path / f"{what}.safetensors"], tmp_path / "o", progress=False)
    # Fisher of another model (hash), Fisher with other names, base Fisher of a fine-tuned model
    with pytest.raises(MergeError, match="another model"):
        merge_checkpoints(bpath, paths, tmp_path / "o", method="gradient_matching", fishers=[fpaths[1], fpaths[0],
                          fpaths[2]], progress=False)
    write_fisher(tmp_path / "short.safetensors", {"emb": fishers[0]["emb"]}, estimator="x", n_examples=1)
    with pytest.raises(MergeError, match="no entry for"):
        merge_checkpoints(bpath, paths, tmp_path / "o", method="fisher_average",
                          fishers=[tmp_path / "short.safetensors", *fpaths[1:]], progress=False)
    with pytest.raises(MergeError, match="the base Fisher.*another model"):
        merge_checkpoints(bpath, paths, tmp_path / "o", method="gradient_matching", fishers=fpaths,
                          base_fisher=fpaths[0], progress=False)
    with pytest.raises(MergeError, match="does not use Fishers"):
        merge_checkpoints(bpath, paths, tmp_path / "o", fishers=fpaths, progress=False)
    with pytest.raises(MergeError, match="takes no option"):
        merge_checkpoints(bpath, paths, tmp_path / "o", options={"density": 0.5}, progress=False)
    with pytest.raises(MergeError, match="density"):  # a bad option value fails before any output
        merge_checkpoints(bpath, paths, tmp_path / "o", method="ties", options={"density": 2.0}, progress=False)
    nosize = [write_fisher(tmp_path / f"n{i}.safetensors", f, estimator="x", n_examples=1,
                           model_hash=fingerprint(m)) for i, (f, m) in enumerate(zip(fishers, models))]
    with pytest.raises(MergeError, match="some models only"):
        merge_checkpoints(bpath, paths, tmp_path / "o", method="gradient_matching", fishers=nosize,
                          sizes=[1.0, None, None], progress=False)
    with pytest.raises(MergeError, match="needs the data-set sizes"):
        merge_checkpoints(bpath, paths, tmp_path / "o", method="gradient_matching", fishers=nosize, progress=False)
    assert not (tmp_path / "o").exists()


def test_config_errors(tmp_path):
    _, _, _, bpath, paths, _, _ = synthetic(tmp_path)
    good = {"base": str(bpath), "models": [{"path": str(p), "alpha": 0.5} for p in paths],
            "method": "task_arithmetic", "output": str(tmp_path / "o")}
    assert load_config(good)["alphas"] == [0.5] * 3
    for broken, msg in [({k: v for k, v in good.items() if k != "base"}, "missing the field"),
                        ({**good, "methd": "x"}, "unknown config field"),
                        ({**good, "models": [{"alpha": 1.0}]}, "must have a 'path'"),
                        ({**good, "models": [{"path": "a", "weight": 1}]}, "unknown field"),
                        ({**good, "method": "nope"}, "unknown merge method")]:
        with pytest.raises(MergeError, match=msg):
            merge_config(broken, progress=False)
    (tmp_path / "bad.yaml").write_text("base: [unclosed")
    with pytest.raises(MergeError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    merge_config(good, progress=False)
    with pytest.raises(MergeError, match="already exists"):
        merge_config(good, progress=False)


def test_cli_end_to_end(tmp_path):
    base, models, _, _, _, _, _ = synthetic(tmp_path)
    cfg = {"base": "base", "models": [{"path": f"m{i}", "alpha": a} for i, a in enumerate(ALPHAS)],
           "method": "gradient_matching", "delta": 0.01,
           "output": "merged", "shard_size": "1kB", "dtype": "float64"}
    for i, m in enumerate(cfg["models"]):
        m["fisher"], m["size"] = f"f{i}.safetensors", 10.0 * (i + 1)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run = lambda *a: subprocess.run([sys.executable, "-m", "toolkit", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=Path.home())
    r = run("merge", str(tmp_path / "merge.yaml"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "merged 5 tensors with gradient_matching" in r.stdout
    got = Checkpoint(tmp_path / "merged").state_dict()
    fishers = [Checkpoint(tmp_path / f"f{i}.safetensors").state_dict() for i in range(3)]
    want = merge_state_dicts("gradient_matching", base, models, ALPHAS, fishers, sizes=[10.0, 20.0, 30.0], delta=0.01)
    for k, v in want.items():
        assert got[k].dtype == (torch.float64 if v.is_floating_point() else v.dtype)
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=1e-6, atol=0)
    r = run("merge", str(tmp_path / "merge.yaml"))  # exists already: a one-line error, status 2
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


KILLED_MERGE = """
import sys, time
from toolkit.checkpoint import ShardWriter
from toolkit.stream import merge_config
real, calls = ShardWriter.write, [0]
def write(self, name, data):  # write part of the output, say so, then wait to be killed
    real(self, name, data)
    calls[0] += 1
    if calls[0] == 3:
        self._f.flush()
        print("half-written", flush=True)
        time.sleep(600)
ShardWriter.write = write
merge_config(sys.argv[1], progress=False)
"""


def test_kill_9_leaves_nothing_and_the_rerun_cleans_up(tmp_path):
    """kill -9 mid-merge: nothing at the destination; the rerun succeeds and removes the temporary."""
    import os
    import signal

    base, models, _, _, _, _, _ = synthetic(tmp_path)
    cfg = {"base": "base", "models": [{"path": f"m{i}", "alpha": a} for i, a in enumerate(ALPHAS)],
           "method": "task_arithmetic", "output": "out", "shard_size": 300}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, str(tmp_path / "merge.yaml")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "half-written", p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert not (tmp_path / "out").exists() and len(stale) == 1  # what a kill -9 leaves: a hidden temporary
    assert any(f.stat().st_size > 0 for f in stale[0].iterdir())
    r = subprocess.run([sys.executable, "-m", "toolkit", "merge", str(tmp_path / "merge.yaml"), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".out.*"))  # the rerun removed the dead run's temporary
    got = Checkpoint(tmp_path / "out").state_dict()
    for k, v in merge_state_dicts("task_arithmetic", base, models, ALPHAS).items():
        assert torch.equal(got[k], v), k
