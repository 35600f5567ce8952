"""WEMoE: a one-hot router gives the fine-tuned MLPs, the initial router gives task arithmetic,
test-time adaptation trains only the routers and lowers the entropy."""
import pytest
import torch

from toolkit import MergeError, merge_state_dicts
from toolkit.wemoe import MoELinear, WEMoEMLP, adapt, build, extra_parameters, forward_flops


def vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=0, embed_dim=8, depth=2,
                             num_heads=2, mlp_ratio=2.0, global_pool="avg").eval()


def perturbed(sd, seed, only=None):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g) if only is None or only in k else v.clone()
            for k, v in sd.items()}


def test_one_hot_router_reproduces_each_fine_tuned_model_on_its_mlps():
    model = vit()
    base = model.state_dict()
    fts = [perturbed(base, 1), perturbed(base, 2), perturbed(base, 3)]
    moe = build(model, base, fts, lam=0.3)
    x = torch.randn(5, 4, 8)  # [B, tokens, C]
    ref = vit()
    for t in range(3):
        ref.load_state_dict(fts[t])
        for i in range(2):
            mlp = moe.blocks[i].mlp
            assert isinstance(mlp, WEMoEMLP)
            mlp.fixed = torch.eye(3)[t]
            assert torch.allclose(mlp(x), ref.blocks[i].mlp(x), atol=1e-5)
    only_mlp = [perturbed(base, s, only=".mlp.") for s in (4, 5)]  # tasks that differ in their MLPs only
    moe = build(model, base, only_mlp)
    imgs = torch.randn(3, 1, 8, 8)
    for t in range(2):
        for blk in moe.blocks:
            blk.mlp.fixed = torch.eye(2)[t]
        ref.load_state_dict(only_mlp[t])
        assert torch.allclose(moe(imgs), ref(imgs), atol=1e-5)


def test_initial_router_is_task_arithmetic_and_adaptation_trains_routers_only():
    model = vit()
    base = model.state_dict()
    fts = [perturbed(base, 1), perturbed(base, 2)]
    moe = build(model, base, fts, lam=0.3, init=0.3)
    ta = vit()
    ta.load_state_dict(merge_state_dicts("task_arithmetic", base, fts, [0.3, 0.3]))
    imgs = torch.randn(6, 1, 8, 8)
    assert torch.allclose(moe(imgs), ta(imgs), atol=1e-5)
    heads = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 4)]
    frozen = {n: b.clone() for n, b in moe.state_dict().items() if ".router." not in n}
    routers0 = {n: p.detach().clone() for n, p in moe.named_parameters() if p.requires_grad}
    losses = adapt(moe, heads, [[imgs[:3]], [imgs[3:]]], steps=30, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[n], b) for n, b in moe.state_dict().items() if n in frozen)
    assert any(not torch.equal(routers0[n], p) for n, p in moe.named_parameters() if p.requires_grad)
    extra = extra_parameters(moe)
    mlp_params = sum(v.numel() for k, v in base.items() if ".mlp." in k)
    mlp_params_w = sum(v.numel() for k, v in base.items() if ".mlp." in k and k.endswith("weight"))
    assert extra["task_vectors"] == 2 * mlp_params and extra["routers"] == 2 * (8 * 8 + 8 + 8 * 2 + 2)
    fl = forward_flops(moe, tokens=5)  # per linear: W_b formed (T out in), applied (tokens out in)
    assert fl["merged_mlp"] == 5 * mlp_params_w
    assert fl["wemoe_mlp"] == (5 + 2) * mlp_params_w + 2 * 5 * (8 * 8 + 8 * 2)  # + 2 routers


def test_moe_linear_is_base_plus_routed_task_vectors_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    taus_w, taus_b = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, generator=g)
    m = MoELinear(lin, taus_w, taus_b)
    m.r = torch.rand(5, 3, generator=g)
    x = torch.randn(5, 7, 6, generator=g)
    with torch.no_grad():
        want = torch.stack([x[b] @ (lin.weight + (m.r[b, :, None, None] * taus_w).sum(0)).T
                            + lin.bias + m.r[b] @ taus_b for b in range(5)])
        assert torch.allclose(m(x), want, atol=1e-5)
        m.chunk = 2 * lin.weight.numel()  # two examples per chunk
        assert torch.allclose(m(x), want, atol=1e-5)
        assert torch.allclose(m(x[:, 0]), want[:, 0], atol=1e-5)  # no token dimension


def test_bad_input():
    model = vit()
    with pytest.raises(MergeError, match="no models"):
        build(model, model.state_dict(), [])
    with pytest.raises(MergeError, match="no `mlp`"):
        build(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).state_dict(), [torch.nn.Linear(2, 2).state_dict()])


def tiny_bert(seed=0, first_token=True):
    from transformers import BertConfig, BertModel
    from toolkit.experiments.encoder import _first_token_only
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=16), add_pooling_layer=True).eval()
    if first_token:
        _first_token_only(bert.encoder.layer[-1])  # as chapter 6's top model: [CLS] only
    return bert


def test_bert_one_hot_router_reproduces_each_fine_tuned_ffn():
    """BERT's FFN is intermediate.dense -> activation -> output.dense (+ residual LayerNorm), the
    router on the attention block's output; with r = e_t it is task t's FFN."""
    model = tiny_bert()
    base = model.state_dict()
    fts = [perturbed(base, s) for s in (1, 2, 3)]
    moe = build(model, base, fts, lam=0.3)
    ref = tiny_bert()
    a = torch.randn(4, 5, 8)
    for t in range(3):
        ref.load_state_dict(fts[t])
        for layer, want in zip(moe.encoder.layer, ref.encoder.layer):
            assert isinstance(layer.intermediate, WEMoEMLP)
            layer.intermediate.fixed = torch.eye(3)[t]
            got = layer.output.dense(layer.intermediate(a))  # the FFN (the LayerNorm: task arithmetic)
            assert torch.allclose(got, want.output.dense(want.intermediate(a)), atol=1e-5)
    only_ffn = [perturbed(base, s, only=k) for s, k in ((4, "intermediate"), (5, "1.output.dense"))]
    moe = build(model, base, only_ffn)
    ids, mask = torch.randint(1, 30, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    for t in range(2):
        for layer in moe.encoder.layer:
            layer.intermediate.fixed = torch.eye(2)[t]
        ref.load_state_dict(only_ffn[t])
        assert torch.allclose(moe(input_ids=ids, attention_mask=mask).pooler_output,
                              ref(input_ids=ids, attention_mask=mask).pooler_output, atol=1e-5)
    heads = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 2)]
    x = {"input_ids": ids, "attention_mask": mask}
    losses = adapt(moe, [lambda o, h=h: h(o.pooler_output) for h in heads], [[x], [x]], steps=5, lr=1e-2)
    assert len(losses) == 5 and extra_parameters(moe)["task_vectors"] == 2 * 2 * (2 * 8 * 16 + 16 + 8)
