"""Fisher files: metadata round trip, estimation on a causal LM (names = the checkpoint's, the
per-example mean of toolkit.curvature.fisher), 2 processes == 1 process, and the merge using them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_llama import TEXTS, make_llama
from toolkit.checkpoint import Checkpoint, fingerprint
from toolkit.curvature import fisher
from toolkit.errors import MergeError
from toolkit.fisherfile import (estimate_fisher_file, fisher_info, lm_batches, read_fisher, read_texts,
                                reduce_mean, write_fisher)
from toolkit.stream import merge_checkpoints


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    base = make_llama(d / "base", seed=0)
    ft = make_llama(d / "ft", seed=1, like=base)
    (d / "texts.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    (d / "texts.txt").write_text("\n\n".join(TEXTS[:5]) + "\n")
    return d, base, ft


def test_write_and_read_metadata(tmp_path):
    f = {"a": torch.rand(3, 2), "b": torch.rand(4)}
    p = write_fisher(tmp_path / "f.safetensors", f, estimator="mc", n_examples=7, dataset_size=1000,
                     model_hash="abc", metadata={"task": "causal_lm"})
    got, info = read_fisher(p)
    assert all(torch.equal(got[k], f[k]) for k in f)
    assert (info.estimator, info.n_examples, info.dataset_size, info.model_hash) == ("mc", 7, 1000.0, "abc")
    assert info.extra["task"] == "causal_lm"
    with pytest.raises(MergeError, match="non-negative"):
        write_fisher(tmp_path / "g.safetensors", {"a": -f["a"]}, estimator="mc", n_examples=1)
    assert not (tmp_path / "g.safetensors").exists() and len(list(tmp_path.iterdir())) == 1


def test_read_texts(tmp_path, llm):
    d, _, _ = llm
    assert read_texts(d / "texts.jsonl") == TEXTS and read_texts(d / "texts.txt") == TEXTS[:5]
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(MergeError, match="line 1"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "binary.txt").write_bytes(b"\xf8\x00\xff weights, not text")
    with pytest.raises(MergeError, match="not UTF-8"):
        read_texts(tmp_path / "binary.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MergeError, match="no examples"):
        read_texts(tmp_path / "empty.txt")


def test_estimate_matches_curvature_and_names_the_checkpoint(tmp_path, llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _, ft = llm
    info = estimate_fisher_file(ft, d / "texts.jsonl", tmp_path / "f.safetensors", kind="empirical",
                                max_examples=12, dataset_size=5000, batch_size=4, progress=False)
    F, meta = read_fisher(tmp_path / "f.safetensors")
    ck = Checkpoint(ft)
    assert set(F) == {k for k, i in ck.infos.items() if i.dtype.is_floating_point}
    assert (info.n_examples, info.dataset_size, info.estimator) == (12, 5000.0, "empirical") == \
        (meta.n_examples, meta.dataset_size, meta.estimator)
    assert info.model_hash == fingerprint(ck)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    batches = lm_batches(AutoTokenizer.from_pretrained(ft), TEXTS[:12], batch_size=3)
    want = fisher(model, batches, "empirical", task="causal_lm", progress=False)
    for k, v in F.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-9)
    assert sum(v.sum() for v in F.values()) > 0
    tok = estimate_fisher_file(ft, d / "texts.jsonl", tmp_path / "t.safetensors", kind="empirical",
                               max_examples=12, batch_size=4, progress=False, per="token")
    want = fisher(model, batches, "empirical", task="causal_lm", per="token", progress=False)
    F, meta = read_fisher(tmp_path / "t.safetensors")
    assert meta.n_examples == want.n == want.n_tokens > 12 and meta.extra["per"] == "token"
    assert meta.dataset_size == pytest.approx(want.n * len(read_texts(d / "texts.jsonl")) / 12)
    for k, v in F.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-9)


def test_reduce_mean_single_process_is_identity():
    f = {"a": torch.rand(3)}
    out, n = reduce_mean(f, 5, 1)
    assert n == 5 and torch.equal(out["a"], f["a"])


def test_two_processes_equal_one(tmp_path, llm):
    """2 CPU processes over gloo, started by torch.distributed.run as `accelerate launch` starts them
    on GPUs: each takes every 2nd example, then one all-reduce."""
    d, _, ft = llm
    single = estimate_fisher_file(ft, d / "texts.jsonl", tmp_path / "one.safetensors", kind="empirical",
                                  progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "toolkit", "fisher",
           str(ft), "--data", str(d / "texts.jsonl"), "--out", str(tmp_path / "two.safetensors"),
           "--kind", "empirical", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1  # only the main process writes
    two, info = read_fisher(tmp_path / "two.safetensors")
    one, _ = read_fisher(tmp_path / "one.safetensors")
    assert info.extra["processes"] == "2" and info.n_examples == single.n_examples == len(TEXTS)
    assert info.model_hash == single.model_hash
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-9)


def test_merge_with_fisher_files(tmp_path, llm):
    """Gradient matching reads N_t from the files; a Fisher of another model is refused."""
    d, base, ft = llm
    f_ft = estimate_fisher_file(ft, d / "texts.txt", tmp_path / "ft.safetensors", kind="empirical",
                                dataset_size=100, progress=False)
    f_base = estimate_fisher_file(base, d / "texts.txt", tmp_path / "base.safetensors", kind="empirical",
                                  dataset_size=50, progress=False)
    assert f_ft.model_hash != f_base.model_hash
    s = merge_checkpoints(base, [ft], tmp_path / "gm", method="gradient_matching", fishers=[f_ft.path],
                          base_fisher=f_base.path, options={"delta": 1e-3}, progress=False)
    assert s.tensors == len(Checkpoint(base).infos)
    with pytest.raises(MergeError, match="another model"):
        merge_checkpoints(base, [ft], tmp_path / "bad", method="gradient_matching", fishers=[f_base.path],
                          progress=False)
    assert fisher_info(f_ft.path).dataset_size == 100.0


def test_fisher_command_validates_its_arguments_before_estimating(tmp_path, llm):
    """Each mistake: exit 2, one line naming the flag or file, no Fisher file, inputs intact."""
    import contextlib
    import io
    import shutil

    from toolkit.__main__ import main

    d, _, ft = llm
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ft.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, notok / f.name)
    (tmp_path / "adir").mkdir()
    data = d / "texts.txt"
    before = data.read_bytes()
    out = tmp_path / "f.safetensors"
    for extra, names in [
        (["--dataset-size", "-5"], ["--dataset-size"]), (["--dataset-size", "nan"], ["--dataset-size", "finite"]),
        (["--dataset-size", "0"], ["--dataset-size"]), (["--batch-size", "0"], ["--batch-size"]),
        (["--max-length", "0"], ["--max-length"]), (["--max-length", "1"], ["--max-length"]),
        (["--n-samples", "0"], ["--n-samples"]), (["--threads", "-1"], ["--threads"]),
        (["--dtype", "int8"], ["dtype", "floating"]),
        (["--out", str(tmp_path / "adir")], ["adir", "is a folder"]),
        (["--out", str(data)], ["texts.txt", "is the input"]),
        (["--out", str(ft / "fisher.safetensors")], ["lies inside the input"]),
        (["--model", str(notok)], ["notok", "no tokenizer files"]),
    ]:
        model = extra[1] if extra[0] == "--model" else str(ft)
        argv = ["fisher", model, "--data", str(data), "--quiet", "--kind", "empirical"]
        argv += [] if extra[0] == "--model" else extra
        if "--out" not in argv:
            argv += ["--out", str(out)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (extra, lines)
        assert all(n in lines[0] for n in names), (extra, lines)
        assert not out.exists() and not (ft / "fisher.safetensors").exists()
    assert data.read_bytes() == before


def test_fisher_file_metadata_is_checked_when_written(tmp_path):
    f = {"a": torch.rand(3)}
    for size in (-5.0, float("nan"), 0.0, "100"):
        with pytest.raises(MergeError, match="dataset_size"):
            write_fisher(tmp_path / "f.safetensors", f, estimator="mc", n_examples=3, dataset_size=size)
    with pytest.raises(MergeError, match="dataset_size"):  # at estimation time, before any work
        estimate_fisher_file(tmp_path / "nomodel", tmp_path / "nodata.txt", tmp_path / "f.safetensors",
                             dataset_size=-5, progress=False)
    assert not list(tmp_path.iterdir())
