"""Small problems with exact answers for the theory chapters (models at the edge).

Three families, each small enough to solve exactly in seconds on a CPU:
- two-parameter logistic regression (chapter 1: a model you can draw), Newton-solved;
- linear regression with a Gaussian prior (chapters 2-3: every quantity in closed form);
- an MLP / softmax regression on scikit-learn's 8x8 digits split into tasks (chapters 2-4),
  fitted to a tight optimum with full-batch L-BFGS so that stationarity holds.
All objectives follow the paper: sum_t alpha_t lbar_t(theta) + delta/2 ||theta - theta_0||^2 with
lbar_t the loss SUMMED over task t's data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Array = np.ndarray


# ---------------------------------------------------------------------------------------------
# Two-parameter logistic regression (numpy): p(y=1|x) = sigmoid(x . theta), x in R^2
# ---------------------------------------------------------------------------------------------


def sigmoid(z: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def two_param_tasks(n: int = 200, seed: int = 0) -> dict[str, tuple[Array, Array]]:
    """Base data and two tasks for a 2-parameter logistic regression.

    The base data set is small and isotropic; task 1's inputs vary mostly along the first
    coordinate, task 2's along the second, and the tasks' labelling rules differ, so each task
    pins down a different direction of parameter space."""
    rng = np.random.default_rng(seed)

    def make(scale: Sequence[float], w: Sequence[float], m: int) -> tuple[Array, Array]:
        x = rng.normal(size=(m, 2)) * np.asarray(scale)
        y = (rng.random(m) < sigmoid(x @ np.asarray(w))).astype(float)
        return x, y

    return {"base": make([1.0, 1.0], [1.0, 1.0], max(n // 4, 8)),
            "task 1": make([1.5, 0.3], [2.5, 0.0], n),
            "task 2": make([0.3, 1.5], [-0.5, 2.5], n)}


def logistic_loss(theta: Array, x: Array, y: Array) -> Array:
    """Summed negative log-likelihood; theta may be (2,) or a grid (..., 2)."""
    z = np.asarray(theta) @ x.T
    return (np.logaddexp(0.0, z) - y * z).sum(-1)


def logistic_objective(theta: Array, data: Sequence[tuple[Array, Array]], prior: Array,
                       delta: float) -> Array:
    """sum_t lbar_t(theta) + delta/2 ||theta - prior||^2, for one point or a grid (..., dim)."""
    theta = np.asarray(theta)
    return sum(logistic_loss(theta, x, y) for x, y in data) + 0.5 * delta * ((theta - prior) ** 2).sum(-1)


def logistic_grad(theta: Array, x: Array, y: Array) -> Array:
    """grad lbar(theta) = X^T (p - y)."""
    return x.T @ (sigmoid(x @ theta) - y)


def logistic_hessian(theta: Array, x: Array, y: Array | None = None) -> Array:
    """Hessian of the summed loss, X^T diag(p(1-p)) X (= N times the Fisher for this model)."""
    p = sigmoid(x @ theta)
    return (x * (p * (1 - p))[:, None]).T @ x


def logistic_fisher_diag(theta: Array, x: Array) -> Array:
    """Per-example mean diagonal Fisher: mean_i p_i (1 - p_i) x_i^2."""
    p = sigmoid(x @ theta)
    return ((p * (1 - p))[:, None] * x ** 2).mean(0)


def fit_logistic(data: Sequence[tuple[Array, Array]], alphas: Sequence[float] | None = None,
                 prior: Array | None = None, delta: float = 0.0, iters: int = 50) -> Array:
    """argmin_theta sum_t alpha_t lbar_t(theta) + delta/2 ||theta - prior||^2 by Newton's method."""
    alphas = [1.0] * len(data) if alphas is None else list(alphas)
    prior = np.zeros(2) if prior is None else np.asarray(prior, float)
    theta = prior.copy()
    for _ in range(iters):
        g = delta * (theta - prior) + sum(a * logistic_grad(theta, x, y) for a, (x, y) in zip(alphas, data))
        h = delta * np.eye(2) + sum(a * logistic_hessian(theta, x) for a, (x, _) in zip(alphas, data))
        step = np.linalg.solve(h, g)
        theta = theta - step
        if np.abs(step).max() < 1e-13:
            break
    return theta


# ---------------------------------------------------------------------------------------------
# Linear regression with a Gaussian prior (numpy): lbar(theta) = 1/2 ||y - X theta||^2
# ---------------------------------------------------------------------------------------------


def linear_tasks(n_tasks: int = 3, n: int = 50, dim: int = 5, correlated: bool = True,
                 seed: int = 0) -> list[tuple[Array, Array]]:
    """T regression tasks in R^dim with different inputs and different true weights.

    correlated=False gives each task orthogonal input columns (a diagonal Hessian X^T X), the
    case where diagonal-Fisher merging is exact."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_tasks):
        scales = np.exp(rng.normal(size=dim))
        if correlated:
            x = rng.normal(size=(n, dim)) @ (rng.normal(size=(dim, dim)) * 0.5 + np.eye(dim)) * scales
        else:
            q, _ = np.linalg.qr(rng.normal(size=(n, dim)))
            x = q * scales * np.sqrt(n)
        w = rng.normal(size=dim) * 2
        out.append((x, x @ w + 0.3 * rng.normal(size=n)))
    return out


def linreg_grad(theta: Array, x: Array, y: Array) -> Array:
    """grad lbar(theta) = X^T (X theta - y)."""
    return x.T @ (x @ theta - y)


def linreg_fit(data: Sequence[tuple[Array, Array]], alphas: Sequence[float] | None = None,
               prior: Array | None = None, delta: float = 1.0) -> Array:
    """Closed form argmin sum_t alpha_t lbar_t + delta/2 ||theta - prior||^2:
    (delta I + sum_t alpha_t X_t^T X_t)^{-1} (delta prior + sum_t alpha_t X_t^T y_t)."""
    dim = data[0][0].shape[1]
    alphas = [1.0] * len(data) if alphas is None else list(alphas)
    prior = np.zeros(dim) if prior is None else np.asarray(prior, float)
    h = delta * np.eye(dim) + sum(a * x.T @ x for a, (x, _) in zip(alphas, data))
    b = delta * prior + sum(a * x.T @ y for a, (x, y) in zip(alphas, data))
    return np.linalg.solve(h, b)


def linear_merge_distances(correlated: bool, n: int, delta: float = 1.0, dim: int = 5,
                           seed: int = 3) -> dict[str, float]:
    """||theta_merged - theta_target|| of task arithmetic and gradient matching (F_t = diag X^T X / N_t)
    for three regression tasks fitted from a random theta_0 with the prior delta; the target is
    the all-data fit. Gradient matching is exact when the features are uncorrelated."""
    from .merge import merge_state_dicts

    lin = linear_tasks(n_tasks=3, n=n, dim=dim, correlated=correlated, seed=seed)
    th0 = np.random.default_rng(seed + 1).normal(size=dim)
    ths = [linreg_fit([d], prior=th0, delta=delta) for d in lin]
    target = linreg_fit(lin, prior=th0, delta=delta)
    sd = lambda v: {"w": torch.tensor(v)}  # noqa: E731
    fis = [sd(np.diag(x.T @ x) / len(y)) for x, y in lin]
    kws = {"task_arithmetic": {},
           "gradient_matching": dict(fishers=fis, sizes=[len(y) for _, y in lin], delta=delta)}
    out = {}
    for name, kw in kws.items():
        merged = merge_state_dicts(name, sd(th0), [sd(t) for t in ths], **kw)["w"].numpy()
        out[name] = float(np.linalg.norm(merged - target))
    return out


# ---------------------------------------------------------------------------------------------
# Digits split into tasks (torch): small MLPs and softmax regression
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Train/test tensors of one data set (inputs scaled to [0, 1], float64)."""
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str = ""

    @property
    def n(self) -> int:
        return len(self.y)


def digits_tasks(groups: Sequence[Sequence[int]] = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)),
                 n_base: int = 150, sizes: Sequence[int] | None = None, test_frac: float = 0.3,
                 seed: int = 0) -> tuple[Split, list[Split]]:
    """scikit-learn digits: a small all-class base set (the 'pretraining' data) and one task per
    group of classes. sizes[t] caps task t's training set (None: all its training examples)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    x, y = torch.tensor(x[idx] / 16.0), torch.tensor(y[idx])
    n_test = int(test_frac * len(y))
    xt, yt, xtr, ytr = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    base = Split(xtr[:n_base], ytr[:n_base], xt, yt, "base")
    xtr, ytr = xtr[n_base:], ytr[n_base:]
    tasks = []
    for t, g in enumerate(groups):
        m, mt = torch.isin(ytr, torch.tensor(g)), torch.isin(yt, torch.tensor(g))
        xs, ys = xtr[m], ytr[m]
        if sizes is not None and sizes[t] is not None:
            xs, ys = xs[: sizes[t]], ys[: sizes[t]]
        tasks.append(Split(xs, ys, xt[mt], yt[mt], "{" + ",".join(map(str, g)) + "}"))
    return base, tasks


def mlp(hidden: int = 32, seed: int = 0, n_in: int = 64, n_out: int = 10) -> nn.Module:
    """A one-hidden-layer tanh MLP in float64 (hidden=0: softmax regression)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, n_out)] if hidden == 0 else [nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers).double()


def flat(sd: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in sd.values()])


def params(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's parameters (name -> tensor)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def with_params(model: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
    """A new model like `model` holding parameters `sd`."""
    out = copy.deepcopy(model)
    out.load_state_dict(sd, strict=False)
    return out.eval()


def objective(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], alphas: Sequence[float],
              prior: dict[str, Tensor] | None, delta: float) -> Tensor:
    """sum_t alpha_t lbar_t(theta) + delta/2 ||theta - prior||^2 (summed cross-entropy)."""
    loss = sum(a * F.cross_entropy(model(x), y, reduction="sum") for a, (x, y) in zip(alphas, data))
    if delta:
        loss = loss + 0.5 * delta * sum(((p - (prior[k] if prior else 0)) ** 2).sum()
                                        for k, p in model.named_parameters())
    return loss


def fit(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], alphas: Sequence[float] | None = None,
        prior: dict[str, Tensor] | None = None, delta: float = 0.0, steps: int = 500,
        tol: float = 1e-10) -> nn.Module:
    """A NEW model: `model` trained from its current parameters by full-batch L-BFGS on
    sum_t alpha_t lbar_t + delta/2 ||theta - prior||^2 (prior None: centred at 0).
    `steps` bounds the L-BFGS iterations: few steps = an under-trained model."""
    model = copy.deepcopy(model).train()
    alphas = [1.0] * len(data) if alphas is None else list(alphas)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(model, data, alphas, prior, delta)
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(-1) == y).double().mean())
