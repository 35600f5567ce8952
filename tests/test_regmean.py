"""RegMean: least squares of the concatenated inputs, the off-diagonal factor, Gram hooks, Gram files."""
import pytest
import torch
from torch import nn

from toolkit import MergeError, merge_state_dicts
from toolkit.gram import grams, read_grams, write_grams
from toolkit.merge import METHODS, merge_tensor

D = torch.float64


def tasks(T=3, d_in=6, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xs = [torch.randn(15 + 9 * t, d_in, generator=g, dtype=D) @ torch.randn(d_in, d_in, generator=g, dtype=D)
          for t in range(T)]
    Ws = [torch.randn(d_out, d_in, generator=g, dtype=D) for _ in range(T)]
    return Xs, Ws


@pytest.mark.parametrize("seed", [0, 1])
def test_off_diag_one_is_least_squares_of_concatenated_inputs(seed):
    Xs, Ws = tasks(seed=seed)
    base = {"w": torch.zeros_like(Ws[0]), "b": torch.zeros(Ws[0].shape[0], dtype=D)}
    models = [{"w": W, "b": torch.full((W.shape[0],), float(t), dtype=D)} for t, W in enumerate(Ws)]
    g = [{"w": X.T @ X / len(X)} for X in Xs]  # mean Grams; alpha_t = n_t makes them sums
    ns = [float(len(X)) for X in Xs]
    out = merge_state_dicts("regmean", base, models, ns, stats={"grams": g}, off_diag=1.0)
    X = torch.cat(Xs)
    Y = torch.cat([x @ W.T for x, W in zip(Xs, Ws)])
    want = torch.linalg.lstsq(X, Y).solution.T  # argmin_W ||X W^T - Y||^2
    assert torch.allclose(out["w"], want, atol=1e-9)
    assert torch.allclose(out["b"], sum(n * m["b"] for n, m in zip(ns, models)) / sum(ns))  # no Gram: average
    plain = merge_state_dicts("average", base, models, ns)["w"]
    err = lambda W: sum(((x @ (W - Wt).T) ** 2).sum() for x, Wt in zip(Xs, Ws))  # noqa: E731
    assert err(out["w"]) < err(plain)


def test_off_diag_zero_is_a_per_input_weighted_average_and_default_is_between():
    Xs, Ws = tasks(T=2, seed=3)
    gs = [X.T @ X / len(X) for X in Xs]
    base = torch.zeros_like(Ws[0])
    out = merge_tensor("regmean", "w", base, Ws, [1.0, 1.0], stats={"grams": gs}, off_diag=0.0)
    d = [torch.diagonal(g) for g in gs]
    assert torch.allclose(out, (Ws[0] * d[0] + Ws[1] * d[1]) / (d[0] + d[1]))
    lo, hi, mid = (merge_tensor("regmean", "w", base, Ws, None, stats={"grams": gs}, off_diag=r)
                   for r in (0.0, 1.0, 0.9))
    assert METHODS["regmean"].defaults == {"off_diag": 0.9}
    assert not torch.allclose(mid, lo) and not torch.allclose(mid, hi)


def test_regmean_bad_input():
    Xs, Ws = tasks(T=2)
    gs = [X.T @ X for X in Xs]
    b = torch.zeros_like(Ws[0])
    with pytest.raises(MergeError, match="needs 'grams'"):
        merge_tensor("regmean", "w", b, Ws)
    with pytest.raises(MergeError, match="for 1 of 2 models"):
        merge_tensor("regmean", "w", b, Ws, stats={"grams": [gs[0], None]})
    with pytest.raises(MergeError, match="needs \\[6, 6\\]"):
        merge_tensor("regmean", "w", b, Ws, stats={"grams": [gs[0][:5, :5], gs[1][:5, :5]]})
    with pytest.raises(MergeError, match="non-negative alphas"):
        merge_tensor("regmean", "w", b, Ws, [1.0, -1.0], stats={"grams": gs})
    with pytest.raises(MergeError, match="singular"):
        z = torch.zeros(6, 6, dtype=D)
        merge_tensor("regmean", "w", b, Ws, stats={"grams": [z, z]}, off_diag=1.0)


def test_gram_hooks_equal_layer_inputs_and_use_state_dict_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Sequential(nn.Linear(7, 3))).double()
    x = torch.randn(11, 5, dtype=D)
    batches = [(x[:4], None), (x[4:], None)]
    G, n = grams(model, batches)
    h = torch.relu(model[0](x))
    assert n == 11 and set(G) == {"0.weight", "2.0.weight"}
    assert torch.allclose(G["0.weight"], x.T @ x / 11) and torch.allclose(G["2.0.weight"], h.T @ h / 11)
    G3, n3 = grams(model, batches, max_examples=3)
    assert n3 == 3 and torch.allclose(G3["0.weight"], x[:3].T @ x[:3] / 3)


def test_grams_of_timm_vit_and_bert_skip_padding():
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertModel

    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2)
    G, _ = grams(vit, [torch.randn(2, 1, 8, 8)])
    sd = vit.state_dict()
    assert "blocks.0.attn.qkv.weight" in G and "head.weight" in G
    assert all(G[k].shape == (sd[k].shape[1],) * 2 for k in G)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16)).eval()
    ids = torch.randint(1, 30, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    G, _ = grams(bert, [{"input_ids": ids, "attention_mask": mask}])
    q = "encoder.layer.0.attention.self.query.weight"
    with torch.no_grad():
        hs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
    rows = hs[mask.bool()]  # the query layer's input is the embedding output, padding left out
    assert torch.allclose(G[q], rows.T @ rows / 7, atol=1e-5)


def test_gram_file_round_trip_and_refuses_other_files(tmp_path):
    g = {"a.weight": torch.eye(3)}
    p = write_grams(tmp_path / "g.safetensors", g, n_examples=12, model_hash="abc", metadata={"task": "x"})
    got, meta = read_grams(p)
    assert torch.equal(got["a.weight"], g["a.weight"]) and meta["n_examples"] == "12" and meta["task"] == "x"
    from toolkit.fisherfile import write_fisher
    f = write_fisher(tmp_path / "f.safetensors", {"a": torch.ones(2)}, estimator="mc", n_examples=1)
    with pytest.raises(MergeError, match="not a Gram file"):
        read_grams(f)
    with pytest.raises(MergeError, match="square"):
        write_grams(tmp_path / "bad.safetensors", {"a": torch.ones(2, 3)}, n_examples=1)
    assert not (tmp_path / "bad.safetensors").exists()


def test_streaming_config_passes_gram_files(tmp_path):
    from toolkit.checkpoint import Checkpoint, save_checkpoint
    from toolkit.stream import merge_config

    Xs, Ws = tasks(T=2, seed=5)
    base = {"l.weight": torch.zeros(4, 6), "l.bias": torch.zeros(4)}
    models = [{"l.weight": W.float(), "l.bias": torch.full((4,), float(t))} for t, W in enumerate(Ws)]
    gs = [{"l.weight": (X.T @ X / len(X)).float()} for X in Xs]
    for i, (m, g) in enumerate(zip(models, gs)):
        save_checkpoint(m, tmp_path / f"m{i}")
        write_grams(tmp_path / f"g{i}.safetensors", g, n_examples=len(Xs[i]))
    save_checkpoint(base, tmp_path / "base")
    cfg = {"base": str(tmp_path / "base"), "method": "regmean", "output": str(tmp_path / "out"),
           "models": [{"path": str(tmp_path / f"m{i}"), "stats": {"grams": str(tmp_path / f"g{i}.safetensors")}}
                      for i in range(2)]}
    merge_config(cfg, progress=False)
    want = merge_state_dicts("regmean", base, models, stats={"grams": gs})
    got = Checkpoint(tmp_path / "out").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(MergeError, match="takes the statistics"):
        merge_config({**cfg, "models": [{"path": str(tmp_path / f"m{i}")} for i in range(2)],
                      "output": str(tmp_path / "out2")}, progress=False)
    assert not (tmp_path / "out2").exists()
