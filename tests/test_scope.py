"""Weight Scope Alignment: the regulariser's closed-form gradient equals autograd; fusion and alignment."""
import math

import pytest
import torch

from toolkit import MergeError
from toolkit.scope import align, attached, fuse, regulariser, regulariser_grad, scope


def layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": 0.3 + 2.0 * torch.randn(4, 6, generator=g, dtype=torch.float64),
            "b.weight": -0.1 + 0.5 * torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
            "a.bias": torch.randn(4, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regulariser_gradient_matches_autograd(seed):
    p = {k: v.requires_grad_() for k, v in layers(seed).items()}
    target = {"a.weight": (0.0, 1.0), "b.weight": (0.2, 0.1 + seed)}
    r = regulariser(p, target)
    auto = torch.autograd.grad(r, [p[k] for k in target])
    mine = regulariser_grad(p, target)
    for k, a in zip(target, auto):
        assert torch.allclose(mine[k], a, rtol=1e-10, atol=1e-14), k
    assert set(scope(p)) == {"a.weight", "b.weight"}  # biases (1-D) have no scope


def test_regulariser_is_zero_exactly_at_the_target_and_kl_value():
    p = layers()
    assert abs(float(regulariser(p, scope(p)))) < 1e-12
    mu, sd = scope(p)["a.weight"]
    want = math.log(2.0 / sd) + (sd ** 2 + (mu - 1.0) ** 2) / (2 * 4.0) - 0.5
    assert math.isclose(float(regulariser(p, {"a.weight": (1.0, 2.0)})), want, rel_tol=1e-12)


def test_fuse_pools_and_align_lands_on_the_scope():
    p1, p2 = layers(0), layers(1)
    both = torch.cat([p1["a.weight"].flatten(), p2["a.weight"].flatten()])
    f = fuse([scope(p1), scope(p2)])
    assert math.isclose(f["a.weight"][0], float(both.mean()), rel_tol=1e-12)
    assert math.isclose(f["a.weight"][1], float(both.std(correction=0)), rel_tol=1e-12)
    a = align(p1, f)
    assert all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for k in f for x, y in zip(scope(a)[k], f[k]))
    assert torch.equal(a["a.bias"], p1["a.bias"])
    with pytest.raises(MergeError, match="different layers"):
        fuse([scope(p1), {"a.weight": (0.0, 1.0)}])
    with pytest.raises(MergeError, match="lacks"):
        regulariser(p1, {"zzz": (0.0, 1.0)})


def test_attached_adds_the_regulariser_gradient_to_any_backward_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    target = {"0.weight": (0.1, 0.3), "2.weight": (0.0, 0.5)}
    params = dict(model.named_parameters())
    loss = lambda: model(x).pow(2).sum()  # noqa: E731
    want = torch.autograd.grad(loss() + 0.7 * regulariser(params, target), list(params.values()))
    with attached(model, target, 0.7):
        loss().backward()
    for (k, p), w in zip(params.items(), want):
        assert torch.allclose(p.grad, w, atol=1e-12), k
    model.zero_grad()
    loss().backward()  # hooks removed on exit
    assert not torch.allclose(params["0.weight"].grad, want[0])
