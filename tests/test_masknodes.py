"""Fisher Mask Nodes: mask gradients equal a per-example brute force; node parameters merged by node."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from toolkit import MergeError, merge_state_dicts
from toolkit.masknodes import expand, node_fishers, node_groups


def tiny_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=12, depth=2,
                             num_heads=3, mlp_ratio=2.0).double().eval()


def brute_force(model, x, y, group, labels):
    """Per example: d l / d m_j = sum over node j's input features and tokens of x * dl/dx (chain rule)."""
    mod = dict(model.named_modules())[group.masked]
    out = torch.zeros(group.n_nodes, dtype=torch.float64)
    for n in range(len(y)):
        store = {}

        def hook(m, inp):
            store["x"] = inp[0]
            inp[0].retain_grad()
        h = mod.register_forward_pre_hook(hook)
        loss = F.cross_entropy(model(x[n:n + 1]), labels[n:n + 1])
        loss.backward()
        h.remove()
        xg = (store["x"] * store["x"].grad).reshape(-1, group.n_nodes, group.size).sum((0, 2))
        out += xg.detach() ** 2
        model.zero_grad()
    return out / len(y)


def test_mask_node_fishers_equal_per_example_brute_force():
    model = tiny_vit()
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    groups = node_groups(model)
    assert [g.name for g in groups] == ["blocks.0.attn.heads", "blocks.0.mlp.neurons",
                                        "blocks.1.attn.heads", "blocks.1.mlp.neurons"]
    f, n = node_fishers(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert n == 7
    for g in groups:
        want = brute_force(model, x, y, g, y)
        assert torch.allclose(f[g.name].double(), want, rtol=1e-4, atol=1e-10), g.name
        assert (f[g.name] > 0).all()
    f_mc, _ = node_fishers(model, [(x, y)], "mc", seed=3)
    f_mc2, _ = node_fishers(model, [(x, y)], "mc", seed=3)
    assert all(torch.equal(f_mc[k], f_mc2[k]) for k in f_mc) and any(not torch.allclose(f_mc[k], f[k]) for k in f)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_masknode_average_takes_each_node_from_where_its_fisher_is():
    base, m1, m2 = tiny_vit(0), tiny_vit(1), tiny_vit(2)
    groups = node_groups(base)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    big = {g.name: torch.full((g.n_nodes,), 1e6) for g in groups}
    small = {g.name: torch.full((g.n_nodes,), 1e-6) for g in groups}
    big["blocks.0.attn.heads"][1], small["blocks.0.attn.heads"][1] = 1e-6, 1e6  # head 1 of block 0: model 2
    sds = [m.state_dict() for m in (base, m1, m2)]
    out = merge_state_dicts("masknode_average", sds[0], sds[1:],
                            stats={"node_fishers": [expand(big, groups, shapes), expand(small, groups, shapes)]})
    C, d = 12, 4
    qkv, want1, want2 = out["blocks.0.attn.qkv.weight"], sds[1]["blocks.0.attn.qkv.weight"], sds[2]["blocks.0.attn.qkv.weight"]
    for r in range(3):
        head1 = slice(r * C + d, r * C + 2 * d)
        assert torch.allclose(qkv[head1], want2[head1], atol=1e-5)
        assert torch.allclose(qkv[r * C:r * C + d], want1[r * C:r * C + d], atol=1e-5)
    assert torch.allclose(out["blocks.0.attn.proj.weight"][:, d:2 * d], sds[2]["blocks.0.attn.proj.weight"][:, d:2 * d], atol=1e-5)
    assert torch.allclose(out["blocks.1.mlp.fc1.weight"], sds[1]["blocks.1.mlp.fc1.weight"], atol=1e-5)
    assert torch.allclose(out["norm.weight"], (sds[1]["norm.weight"] + sds[2]["norm.weight"]) / 2)  # no node: mean
    with pytest.raises(MergeError, match="expanded"):
        merge_state_dicts("masknode_average", sds[0], sds[1:],
                          stats={"node_fishers": [{"norm.weight": torch.ones(3)}] * 2})


def test_bert_heads_and_neurons():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16, num_labels=2)).eval()
    groups = node_groups(bert)
    assert [(g.name, g.n_nodes, g.size) for g in groups] == [("bert.encoder.layer.0.heads", 2, 4),
                                                             ("bert.encoder.layer.0.neurons", 16, 1)]
    ids, y = torch.randint(1, 30, (3, 5)), torch.tensor([0, 1, 1])
    f, _ = node_fishers(bert, [({"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.long)}, y)])
    shapes = {k: v.shape for k, v in bert.state_dict().items()}
    e = expand(f, groups, shapes)
    assert set(e) >= {"bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.weight"}
    assert all(e[k].shape == shapes[k] and (e[k] > 0).all() for k in e)
    with pytest.raises(MergeError, match="no attention heads"):
        node_groups(torch.nn.Linear(2, 2))


def test_bert_mask_node_fishers_equal_per_example_brute_force():
    """Chapter 6's top model: the last BERT layer computes the [CLS] token only (its context and
    FFN inputs are [B, 1, features]); the mask gradients still equal the per-example chain rule."""
    from transformers import BertConfig, BertForSequenceClassification
    from toolkit.experiments.encoder import _first_token_only
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=16,
                                                    num_labels=3)).double().eval()
    _first_token_only(bert.bert.encoder.layer[-1])
    ids, y = torch.randint(1, 30, (5, 6)), torch.randint(0, 3, (5,))

    class Ids(torch.nn.Module):  # the brute force feeds tensors
        def forward(self, x):
            return bert(input_ids=x).logits
    wrapped = Ids()
    wrapped.bert = bert
    groups = node_groups(bert)
    assert [g.name for g in groups][-2:] == ["bert.encoder.layer.1.heads", "bert.encoder.layer.1.neurons"]
    f, n = node_fishers(bert, [({"input_ids": ids[:3]}, y[:3]), ({"input_ids": ids[3:]}, y[3:])])
    assert n == 5
    for g in groups:
        want = brute_force(wrapped, ids, y, replace(g, masked=f"bert.{g.masked}"), y)
        assert torch.allclose(f[g.name].double(), want, rtol=1e-4, atol=1e-12), g.name
        assert (f[g.name] > 0).all()
