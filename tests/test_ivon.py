"""IVON: its Hessian estimate recovers the exact one on a quadratic, is positive, keyed like the model."""
import sys

import pytest
import torch
from torch import nn

from toolkit import MergeError, merge_state_dicts
from toolkit.ivon import finetune


def test_ivon_hessian_recovers_the_exact_diagonal_on_linear_regression():
    torch.manual_seed(0)
    N, scales = 512, torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0])
    X = torch.randn(N, 5) * scales
    y = X @ torch.randn(5) + 0.1 * torch.randn(N)
    model = nn.Linear(5, 1, bias=False)
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]
    h = finetune(model, batches, steps=1000, lr=0.1, ess=N, hess_init=1.0,
                 loss_fn=lambda z, t: 0.5 * ((z.squeeze(-1) - t) ** 2).mean())
    exact = (X ** 2).mean(0)  # diagonal of the per-example Hessian X^T X / N
    assert torch.allclose(h["weight"][0], exact, rtol=0.3), (h["weight"], exact)
    w_ls = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    assert torch.allclose(model.weight.detach()[0], w_ls, atol=0.1)  # ends at the posterior mean


def test_ivon_hessian_is_positive_with_the_model_keys_and_shapes_and_merges():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2)
    base = {k: v.clone() for k, v in vit.state_dict().items()}
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    h = finetune(vit, [(x, y)], steps=5, lr=0.05, ess=16.0)
    params = dict(vit.named_parameters())
    assert set(h) == set(params) and all(h[k].shape == params[k].shape for k in h)
    assert all(bool((v > 0).all()) and bool(torch.isfinite(v).all()) for v in h.values())
    assert all(p.requires_grad for p in vit.parameters())
    theta = vit.state_dict()
    assert any(not torch.equal(theta[k], base[k]) for k in h)
    h_bb = finetune(vit, [(x, y)], steps=2, lr=0.05, ess=16.0, params=lambda k: k.startswith("blocks."))
    assert set(h_bb) == {k for k in params if k.startswith("blocks.")}
    fishers = [{k: h.get(k, torch.zeros_like(v)) for k, v in base.items()}]
    out = merge_state_dicts("gradient_matching", base, [theta], [1.0], fishers, [16.0], delta=1.0)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_missing_package_and_bad_input_raise_merge_error(monkeypatch):
    model = nn.Linear(2, 2)
    with pytest.raises(MergeError, match="ess"):
        finetune(model, [(torch.randn(2, 2), torch.tensor([0, 1]))], steps=1, lr=0.1, ess=0.0)
    monkeypatch.setitem(sys.modules, "ivon", None)  # import ivon now raises ImportError
    with pytest.raises(MergeError, match="pip install ivon-opt"):
        finetune(model, [(torch.randn(2, 2), torch.tensor([0, 1]))], steps=1, lr=0.1, ess=2.0)
