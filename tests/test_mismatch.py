"""Gradient mismatch: task arithmetic's error is exactly H_0^{-1} m on the quadratic case."""
import pytest
import torch
from torch import nn

from toolkit import MergeError, merge_state_dicts
from toolkit.mismatch import gradient_mismatch, mismatch_norms, predicted_error, total_norm
from toolkit.train import loss_gradient
from test_merge import regression_tasks, solve



def linear_model(theta):
    m = nn.Linear(theta.numel(), 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(theta[None])
    return m


def half_sse(z, y):
    return 0.5 * ((z.squeeze(-1) - y) ** 2).sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_task_arithmetic_error_equals_weighted_mismatch(seed):
    tasks = regression_tasks(T=3, seed=seed, diagonal=False)  # full Hessians: no diagonal shortcut
    g = torch.Generator().manual_seed(seed)
    alphas = (0.3 + torch.rand(3, generator=g, dtype=torch.float64)).tolist()
    delta, theta0 = 0.5, torch.randn(6, generator=g, dtype=torch.float64)
    thetas = [solve([t], [1.0], theta0, delta) for t in tasks]
    joint = solve(tasks, alphas, theta0, delta)
    ta = merge_state_dicts("task_arithmetic", {"weight": theta0[None]},
                           [{"weight": t[None]} for t in thetas], alphas)["weight"][0]
    # gradients of the summed task losses, through the toolkit's edge function
    at_joint = [loss_gradient(linear_model(joint), [(X, y)], half_sse) for X, y in tasks]
    at_task = [loss_gradient(linear_model(t), [(X, y)], half_sse) for t, (X, y) in zip(thetas, tasks)]
    m = gradient_mismatch(at_joint, at_task, alphas)
    err = predicted_error(m, delta)["weight"][0]
    assert torch.allclose(ta - joint, err, rtol=1e-10, atol=1e-12)
    assert total_norm(m) > 1e-3  # a real mismatch, not a trivial zero
    # at each task's own optimum, grad lbar_t = -H_0 tau_t (stationarity with the prior)
    for gt, t in zip(at_task, thetas):
        assert torch.allclose(gt["weight"][0], -delta * (t - theta0), atol=1e-10)


def test_norms_per_tensor_and_layer():
    m = {"a.weight": torch.tensor([3.0, 0.0]), "a.bias": torch.tensor([4.0]), "b.weight": torch.ones(4)}
    assert mismatch_norms(m) == {"a.weight": 3.0, "a.bias": 4.0, "b.weight": 2.0}
    assert mismatch_norms(m, by="layer") == {"a": 5.0, "b": 2.0}
    assert total_norm(m) == pytest.approx(29 ** 0.5)
    with pytest.raises(MergeError, match="by must be"):
        mismatch_norms(m, by="block")


def test_predicted_error_with_base_fisher_and_errors():
    m = {"w": torch.tensor([2.0, 4.0])}
    out = predicted_error(m, 1.0, {"w": torch.tensor([1.0, 3.0])}, base_size=1.0)
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(MergeError, match="delta > 0"):
        predicted_error(m, 0.0)
    with pytest.raises(MergeError, match="no entry"):
        predicted_error(m, 1.0, {}, base_size=1.0)
    with pytest.raises(MergeError, match="other tensor names"):
        gradient_mismatch([m], [{"v": torch.zeros(2)}])
    with pytest.raises(MergeError, match="1 gradients at theta but 2"):
        gradient_mismatch([m], [m, m])


def test_max_abs_diff():
    from toolkit.mismatch import max_abs_diff
    a = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([0.5])}
    assert max_abs_diff(a, b) == 3.0 and max_abs_diff(a, a) == 0.0
