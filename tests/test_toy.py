"""toy.py: the closed-form linear-regression merge of chapter 3."""
from toolkit import toy


def test_gradient_matching_is_exact_for_uncorrelated_linear_tasks():
    diag = toy.linear_merge_distances(False, n=30)
    corr = toy.linear_merge_distances(True, n=30)
    assert diag["gradient_matching"] < 1e-8 < diag["task_arithmetic"]
    assert corr["gradient_matching"] > 1e-6  # a diagonal Fisher is no longer the whole Hessian


def test_logistic_objective_is_the_sum_of_losses_plus_the_prior():
    import numpy as np
    data = toy.two_param_tasks(n=20, seed=0)
    parts = [data["task 1"], data["task 2"]]
    theta, prior = np.array([0.3, -0.2]), np.array([0.1, 0.1])
    want = sum(toy.logistic_loss(theta, x, y) for x, y in parts) + 0.5 * 2.0 * (0.2**2 + 0.3**2)
    assert np.isclose(toy.logistic_objective(theta, parts, prior, 2.0), want)
    grid = np.stack([theta, prior])
    assert toy.logistic_objective(grid, parts, prior, 2.0).shape == (2,)
