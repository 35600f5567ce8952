"""Merge methods: exactness on the quadratic case, special cases, properties, bad input."""
import copy
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from toolkit import MergeError, merge_models, merge_state_dicts
from toolkit.merge import METHODS, get_method, merge_tensor, reuse_scratch

D = torch.float64  # exactness is claimed in float64


# ----------------------------------------------------------------------------- linear regression

def regression_tasks(T=3, d=6, seed=0, diagonal=True):
    """T linear-regression tasks with summed squared loss; X_t^T X_t diagonal if `diagonal`."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        n = 20 + 7 * t
        if diagonal:  # orthonormal columns times a scale: Hessian X^T X is exactly diagonal
            q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=D))
            X = q * (0.5 + 3 * torch.rand(d, generator=g, dtype=D))
        else:
            X = torch.randn(n, d, generator=g, dtype=D)
        y = X @ torch.randn(d, generator=g, dtype=D) + 0.1 * torch.randn(n, generator=g, dtype=D)
        tasks.append((X, y))
    return tasks


def solve(tasks, alphas, theta0, delta):
    """argmin sum_t alpha_t 1/2||y_t - X_t th||^2 + delta/2 ||th - theta0||^2 (closed form)."""
    d = theta0.numel()
    A = delta * torch.eye(d, dtype=D) + sum(a * X.T @ X for a, (X, _) in zip(alphas, tasks))
    b = delta * theta0 + sum(a * X.T @ y for a, (X, y) in zip(alphas, tasks))
    return torch.linalg.solve(A, b)


def as_sd(theta):
    return {"w": theta[:4].reshape(2, 2).clone(), "b": theta[4:].clone()}


def flat(sd):
    return torch.cat([sd["w"].flatten(), sd["b"]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matching_equals_joint_solution_on_quadratic(seed):
    g = torch.Generator().manual_seed(100 + seed)
    tasks = regression_tasks(T=3 + seed, seed=seed)
    alphas = (0.2 + torch.rand(len(tasks), generator=g)).tolist()
    delta = 0.7
    theta0 = torch.randn(6, generator=g, dtype=D)
    thetas = [solve([t], [1.0], theta0, delta) for t in tasks]
    joint = solve(tasks, alphas, theta0, delta)
    sizes = [len(y) for _, y in tasks]
    fishers = [as_sd(torch.diag(X.T @ X) / n) for (X, _), n in zip(tasks, sizes)]  # per-example mean
    merged = merge_state_dicts("gradient_matching", as_sd(theta0), [as_sd(t) for t in thetas],
                               alphas=alphas, fishers=fishers, sizes=sizes, delta=delta)
    rel = (flat(merged) - joint).norm() / joint.norm()
    assert rel <= 1e-8
    ta = merge_state_dicts("task_arithmetic", as_sd(theta0), [as_sd(t) for t in thetas], alphas=alphas)
    assert (flat(ta) - joint).norm() / joint.norm() > 1e-3  # task arithmetic is not exact here


def test_base_fisher_enters_prior_precision():
    tasks = regression_tasks(T=3, seed=4)
    X0, y0 = regression_tasks(T=1, seed=9)[0]
    delta, alphas = 0.3, [1.0, 0.5, 2.0]
    prior_mean = torch.zeros(6, dtype=D)
    # theta_0 itself trained on task 0 with a delta prior: H_0 = delta + X0^T X0 (diagonal)
    theta0 = solve([(X0, y0)], [1.0], prior_mean, delta)
    h0 = delta * torch.ones(6, dtype=D) + torch.diag(X0.T @ X0)
    def solve_h0(ts, als):
        A = torch.diag(h0) + sum(a * X.T @ X for a, (X, _) in zip(als, ts))
        b = h0 * theta0 + sum(a * X.T @ y for a, (X, y) in zip(als, ts))
        return torch.linalg.solve(A, b)
    thetas = [solve_h0([t], [1.0]) for t in tasks]
    joint = solve_h0(tasks, alphas)
    sizes = [len(y) for _, y in tasks]
    merged = merge_state_dicts(
        "gradient_matching", as_sd(theta0), [as_sd(t) for t in thetas], alphas=alphas,
        fishers=[as_sd(torch.diag(X.T @ X) / n) for (X, _), n in zip(tasks, sizes)], sizes=sizes,
        delta=delta, base_fisher=as_sd(torch.diag(X0.T @ X0) / len(y0)), base_size=len(y0))
    assert (flat(merged) - joint).norm() / joint.norm() <= 1e-8


# ----------------------------------------------------------------------------- special cases

def random_setup(T=3, shape=(4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(*shape, generator=g, dtype=D), "b": torch.randn(shape[0], generator=g, dtype=D)}
    models = [{k: v + torch.randn(v.shape, generator=g, dtype=D) for k, v in base.items()} for _ in range(T)]
    fishers = [{k: torch.rand(v.shape, generator=g, dtype=D) + 0.01 for k, v in base.items()} for _ in range(T)]
    alphas = (0.1 + torch.rand(T, generator=g, dtype=D)).tolist()
    sizes = [float(s) for s in torch.randint(10, 1000, (T,), generator=g)]
    return base, models, fishers, alphas, sizes


def close(a, b, rtol=1e-9):
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=rtol) for k in a)


def test_small_fishers_give_task_arithmetic():
    base, models, fishers, alphas, sizes = random_setup()
    gm = merge_state_dicts("gradient_matching", base, models, alphas, fishers, sizes, delta=1e12)
    ta = merge_state_dicts("task_arithmetic", base, models, alphas)
    assert close(gm, ta, 1e-7)
    assert not close(gm, merge_state_dicts("gradient_matching", base, models, alphas, fishers, sizes,
                                           delta=1.0), 1e-3)


def test_zero_prior_gives_fisher_averaging():
    base, models, fishers, alphas, sizes = random_setup(seed=1)
    gm = merge_state_dicts("gradient_matching", base, models, alphas, fishers, sizes, delta=0.0)
    fa = merge_state_dicts("fisher_average", base, models, alphas, fishers, sizes)
    assert close(gm, fa)


def test_equal_fishers_and_zero_prior_give_weighted_average():
    base, models, fishers, alphas, _ = random_setup(seed=2)
    same = [fishers[0]] * len(models)
    gm = merge_state_dicts("gradient_matching", base, models, alphas, same, [5.0] * 3, delta=0.0)
    avg = merge_state_dicts("average", base, models, alphas)
    expected = {k: sum(a * m[k] for a, m in zip(alphas, models)) / sum(alphas) for k in base}
    assert close(gm, avg) and close(avg, expected)


def test_common_alpha_cancels_without_prior():
    base, models, fishers, _, sizes = random_setup(seed=3)
    a = merge_state_dicts("gradient_matching", base, models, [0.3] * 3, fishers, sizes, delta=0.0)
    b = merge_state_dicts("gradient_matching", base, models, [1.7] * 3, fishers, sizes, delta=0.0)
    assert close(a, b)


def gm_reference(base, thetas, alphas, fishers, sizes, delta, fisher_floor=0.0):
    """Gradient matching without the removal guard, op for op: Hbar = delta + sum_t alpha_t N_t F_t,
    theta_0 + sum_t alpha_t N_t (F_t + delta / N_t) tau_t / Hbar."""
    hbar, num = torch.full_like(base, delta), torch.zeros_like(base)
    for a, n, f, th in zip(alphas, sizes, fishers, thetas):
        f = f.clamp_min(fisher_floor)
        hbar.add_(f, alpha=a * n)
        num.addcmul_(f + delta / n, th - base, value=a * n)
    return torch.addcdiv(base, num, hbar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fisher_floor", [0.0, 1e-3])
def test_non_negative_alphas_are_bitwise_the_unguarded_formula(dtype, fisher_floor):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3001, generator=g, dtype=dtype)
    thetas = [base + 0.01 * torch.randn(base.shape, generator=g, dtype=dtype) for _ in range(3)]
    fishers = [torch.rand(base.shape, generator=g, dtype=dtype) ** 4 for _ in range(3)]
    alphas, sizes = [0.0, 0.4, 1.3], [10.0, 200.0, 3000.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guard never binds
        got = merge_tensor("gradient_matching", "w", base, thetas, alphas, fishers, sizes,
                           delta=1e-3, fisher_floor=fisher_floor)
    assert torch.equal(got, gm_reference(base, thetas, alphas, fishers, sizes, 1e-3, fisher_floor))


def removal(alpha, h0=1e-3, ha=1.0, hr=1.0, guard=0.1, **kw):
    """Merge of an added task (H_a, tau_a = 1) and a removed one (H_r, tau_r = -1) with alpha_r = alpha."""
    base = torch.zeros(1, dtype=D)
    models = [{"w": base + 1.0}, {"w": base - 1.0}]
    fishers = [{"w": torch.full_like(base, ha)}, {"w": torch.full_like(base, hr)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = merge_state_dicts("gradient_matching", {"w": base}, models, [1.0, alpha], fishers, [1.0, 1.0],
                                delta=h0, guard=guard, **kw)
    return out["w"].item()


def test_removal_formula_and_guard():
    base, models, fishers, _, sizes = random_setup(seed=4)
    # H_0 contains the removed task's precision: Hbar stays above the floor, formula applies, no warning
    f0 = {k: fishers[0][k] * 2 for k in base}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = merge_state_dicts("gradient_matching", base, models[:1], [-1.0], fishers[:1], sizes[:1],
                                delta=1e-3, base_fisher=f0, base_size=sizes[0])
    h0 = {k: 1e-3 + sizes[0] * f0[k] for k in base}
    h1 = {k: sizes[0] * fishers[0][k] for k in base}
    expected = {k: base[k] - (h0[k] + h1[k]) * (models[0][k] - base[k]) / (h0[k] - h1[k]) for k in base}
    assert close(out, expected)
    # the prior alone cannot cover the removal: Hbar = H_0 - H_1 < 0 is floored at guard * (H_0 + H_1)
    for guard in (0.1, 0.5):
        with pytest.warns(UserWarning, match="merged precision Hbar made small by negative alphas"):
            out = merge_state_dicts("gradient_matching", base, models[:1], [-1.0], fishers[:1], sizes[:1],
                                    delta=1e-3, guard=guard)
        assert close(out, {k: base[k] - (models[0][k] - base[k]) / guard for k in base})
    for guard in (0.0, 1.5):
        with pytest.raises(MergeError, match="guard"):
            merge_state_dicts("gradient_matching", base, models[:1], [-1.0], fishers[:1], sizes[:1], guard=guard)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), guard=st.sampled_from([0.05, 0.1, 0.3]), T=st.integers(1, 3),
       log_eps=st.floats(-30, 0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_removal_with_nearly_cancelling_precisions_stays_bounded(seed, guard, T, log_eps, dtype):
    """H_r = (H_0 + sum_t alpha_t H_t) (1 +- eps): Hbar = +-eps-ish; every output is finite and each
    task vector's gain is at most max(1, |alpha_t|) / guard."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(500, generator=g, dtype=dtype)
    thetas = [base + torch.randn(base.shape, generator=g, dtype=dtype) for _ in range(T + 1)]
    fishers = [10 ** (4 * torch.rand(base.shape, generator=g, dtype=dtype) - 2) for _ in range(T)]
    alphas = (0.1 + 2 * torch.rand(T, generator=g, dtype=torch.float64)).tolist()
    delta, alpha_r = 1e-3, -(0.2 + torch.rand(1, generator=g).item())
    kept = delta + sum(a * f for a, f in zip(alphas, fishers))
    sign = torch.where(torch.rand(base.shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    fishers.append(kept * (1 + sign * 10.0 ** log_eps) / -alpha_r)
    alphas.append(alpha_r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = merge_tensor("gradient_matching", "w", base, thetas, alphas, fishers, [1.0] * (T + 1),
                           delta=delta, guard=guard)
    assert torch.isfinite(out).all()
    bound = sum(max(1.0, abs(a)) / guard * (th - base).abs() for a, th in zip(alphas, thetas))
    assert ((out - base).abs() <= bound * (1 + 1e-5) + 1e-6 * base.abs()).all()


def test_removal_is_continuous_in_alpha_across_the_floor():
    """tau_a = 1 with H_a = 1 kept, tau_r = -1 with H_r = 1 removed at alpha: Hbar = H_0 + 1 + alpha crosses
    guard * S = 0.1 (H_0 + 1 + |alpha|) at alpha = -0.82 and zero at alpha = -1.001."""
    h0, alphas = 1e-3, torch.linspace(-0.6, -1.4, 8001, dtype=D).tolist()
    out = [removal(a, h0) for a in alphas]
    want = [(h0 + 1) * (1 - a) / max(h0 + 1 + a, 0.1 * (h0 + 1 - a)) for a in alphas]
    assert out == pytest.approx(want, rel=1e-12)
    # no jump: the slope is at most (H_0 + 1)(H_0 + 2) / (guard S)^2 = 62 at the floor's boundary
    step = alphas[0] - alphas[1]
    assert max(abs(b - a) for a, b in zip(out, out[1:])) <= 70 * step
    assert max(map(abs, out)) <= (1 + 1.4) / 0.1  # |theta - theta_0| <= sum_t max(1, |alpha_t|) |tau_t| / guard


@pytest.mark.parametrize("alphas", [[0.5, 1.5], [1.0, -0.8]])
def test_reused_scratch_gives_the_same_results_and_never_aliases_them(alphas):
    """A thread after reuse_scratch() (the streaming merge's workers) merges chunks of changing size
    bitwise as with fresh buffers, and no result shares memory with a later call's."""
    g = torch.Generator().manual_seed(6)
    chunks = []
    for n in (64, 200, 7, 200, 300):
        base = torch.randn(n, generator=g)
        thetas = [base + torch.randn(n, generator=g) for _ in alphas]
        fishers = [torch.rand(n, generator=g) for _ in alphas]
        chunks.append((base, thetas, fishers, torch.rand(n, generator=g)))
    kw = dict(sizes=[3.0, 5.0], delta=0.1, base_size=2.0)

    def merge_all():
        out = []
        for base, thetas, fishers, f0 in chunks:
            out.append(merge_tensor("task_arithmetic", "w", base, thetas, alphas))
            out.append(merge_tensor("gradient_matching", "w", base, thetas, alphas, fishers, base_fisher=f0, **kw))
        return [o.clone() for o in out], out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, _ = merge_all()
        got = {}
        worker = threading.Thread(target=lambda: (reuse_scratch(), got.update(zip(("copies", "results"), merge_all()))))
        worker.start()
        worker.join()
    assert all(torch.equal(a, b) for a, b in zip(want, got["copies"]))
    assert all(torch.equal(a, b) for a, b in zip(want, got["results"]))  # later calls overwrote nothing


def test_ties_trims_elects_and_averages():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 0.1, 3.0])}, {"w": torch.tensor([1.0, 1.0, -0.2, -1.0])}]
    out = merge_state_dicts("ties", base, models, density=0.5)
    # trimmed: [0,-2,0,3] and [1,1,0,0] (ties at |1| keep both 1s -> top half by magnitude)
    # signs: sum = [1,-1,0,3] -> [+,-,0,+]; agreeing means: [1, -2, 0, 3]
    assert torch.allclose(out["w"], torch.tensor([1.0, -2.0, 0.0, 3.0]))
    with pytest.raises(MergeError, match="density"):
        merge_state_dicts("ties", base, models, density=0.0)


def test_dare_is_unbiased_and_deterministic():
    base = {"w": torch.zeros(20000)}
    models = [{"w": torch.ones(20000)}]
    a = merge_state_dicts("dare", base, models, p=0.8, seed=3)["w"]
    b = merge_state_dicts("dare", base, models, p=0.8, seed=3)["w"]
    c = merge_state_dicts("dare", base, models, p=0.8, seed=4)["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isclose(a, torch.tensor(0.0)).logical_or(torch.isclose(a, torch.tensor(5.0))).all()
    # mean of a rescaled Bernoulli(0.2)*5 over 20000 draws: sd 2/sqrt(20000) = 0.014
    assert abs(a.mean().item() - 1.0) < 0.07
    with pytest.raises(MergeError, match="drop probability"):
        merge_state_dicts("dare", base, models, p=1.0)


# ----------------------------------------------------------------------------- properties

def method_kwargs(name, fishers, sizes):
    kw = {"fishers": fishers, "sizes": sizes} if METHODS[name].uses_fisher else {}
    if name == "ties":
        kw["density"] = 1.0
    if name == "dare":
        kw["p"] = 0.0
    if name == "gradient_matching":
        kw["delta"] = 0.5
    if "grams" in METHODS[name].stats:  # RegMean: an SPD Gram [in, in] per model for the weight "w"
        kw["stats"] = {"grams": [{"w": f["w"].T @ f["w"] + torch.eye(f["w"].shape[1], dtype=D)} for f in fishers]}
    if "node_fishers" in METHODS[name].stats:  # mask nodes: per-element weights (here: the Fishers)
        kw["stats"] = {"node_fishers": fishers}
    return kw


tensors = st.integers(min_value=0, max_value=10**6)


@settings(max_examples=25, deadline=None)
@given(seed=tensors, T=st.integers(1, 4), name=st.sampled_from(sorted(METHODS)))
def test_identical_models_merge_to_themselves(seed, T, name):
    base, models, fishers, alphas, sizes = random_setup(T=T, seed=seed)
    models = [models[0]] * T
    alphas = [a / sum(alphas) for a in alphas]  # weights summing to one
    out = merge_state_dicts(name, base, models, alphas, **method_kwargs(name, fishers, sizes))
    assert close(out, models[0], 1e-8)


@settings(max_examples=25, deadline=None)
@given(seed=tensors, name=st.sampled_from(sorted(METHODS)), default=st.booleans())
def test_order_of_tasks_does_not_matter(seed, name, default):
    base, models, fishers, alphas, sizes = random_setup(T=3, seed=seed)
    kw = method_kwargs(name, fishers, sizes)
    if default:  # TIES and DARE with their real trimming/dropping too
        kw.pop("density", None), kw.pop("p", None)
    perm = [2, 0, 1]
    kw_p = dict(kw)
    if "fishers" in kw:
        kw_p.update(fishers=[fishers[i] for i in perm], sizes=[sizes[i] for i in perm])
    if "stats" in kw:
        kw_p["stats"] = {n: [v[i] for i in perm] for n, v in kw["stats"].items()}
    a = merge_state_dicts(name, base, models, alphas, **kw)
    b = merge_state_dicts(name, base, [models[i] for i in perm], [alphas[i] for i in perm], **kw_p)
    assert close(a, b, 1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=tensors, name=st.sampled_from(sorted(METHODS)))
def test_merges_never_modify_inputs(seed, name):
    base, models, fishers, alphas, sizes = random_setup(T=2, seed=seed)
    before = copy.deepcopy((base, models, fishers))
    kw = method_kwargs(name, fishers, sizes)
    kw.pop("density", None), kw.pop("p", None)
    merge_state_dicts(name, base, models, alphas, **kw)
    for x, y in zip(before, (base, models, fishers)):
        xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
        for a, b in zip(xs, ys):
            assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- modules, dtypes

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)


def test_merge_models_returns_new_module_with_base_buffers():
    torch.manual_seed(0)
    base, m1, m2 = Net(), Net(), Net()
    for m in (m1, m2):
        m.bn.running_mean += torch.randn(4)
    snap = [copy.deepcopy(m.state_dict()) for m in (base, m1, m2)]
    out = merge_models("average", base, [m1, m2])
    assert out is not base and isinstance(out, Net)
    assert torch.allclose(out.lin.weight, (m1.lin.weight + m2.lin.weight) / 2)
    assert torch.equal(out.bn.running_mean, base.bn.running_mean)
    assert torch.equal(out.bn.num_batches_tracked, base.bn.num_batches_tracked)
    for m, s in zip((base, m1, m2), snap):
        assert all(torch.equal(m.state_dict()[k], s[k]) for k in s)


def test_merge_models_timm_vit():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    mk = lambda: VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                   num_classes=3).double()
    base, m1, m2 = mk(), mk(), mk()
    fishers = [{k: torch.ones_like(v) for k, v in m.state_dict().items()} for m in (m1, m2)]
    out = merge_models("gradient_matching", base, [m1, m2], [1.0, 1.0], fishers, sizes=[1.0, 1.0],
                       delta=0.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert out(x).shape == (2, 3)
    assert torch.allclose(out.pos_embed, (m1.pos_embed + m2.pos_embed) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_fp32_and_cast_back(dtype):
    base, models, fishers, alphas, sizes = random_setup(seed=5)
    low = lambda sd: {k: v.to(dtype) for k, v in sd.items()}
    out = merge_state_dicts("gradient_matching", low(base), [low(m) for m in models], alphas,
                            fishers, sizes, delta=0.1)
    ref = merge_state_dicts("gradient_matching", {k: v.to(dtype).float() for k, v in base.items()},
                            [{k: v.to(dtype).float() for k, v in m.items()} for m in models], alphas,
                            [{k: v.float() for k, v in f.items()} for f in fishers], sizes, delta=0.1)
    assert all(out[k].dtype == dtype for k in out)
    assert all(torch.equal(out[k], ref[k].to(dtype)) for k in out)


def test_non_float_tensors_come_from_base():
    base = {"ids": torch.arange(4), "w": torch.zeros(2)}
    models = [{"ids": torch.arange(4) + 1, "w": torch.ones(2)}]
    out = merge_state_dicts("task_arithmetic", base, models)
    assert torch.equal(out["ids"], base["ids"]) and out["ids"] is not base["ids"]


# ----------------------------------------------------------------------------- bad input

def bad_cases():
    base, models, fishers, alphas, sizes = random_setup(T=2, seed=7)
    gm = dict(sizes=sizes, delta=0.1)
    neg = [dict(fishers[0]), fishers[1]]
    neg[0]["w"] = -neg[0]["w"]
    nan = [dict(fishers[0]), fishers[1]]
    nan[0]["b"] = nan[0]["b"].clone()
    nan[0]["b"][0] = float("nan")
    zeros = [{k: torch.zeros_like(v) for k, v in base.items()}] * 2
    return [
        ("empty", lambda: merge_state_dicts("average", base, []), "empty"),
        ("missing key", lambda: merge_state_dicts("average", base, [models[0], {"w": models[1]["w"]}]),
         "missing keys"),
        ("shape", lambda: merge_state_dicts("average", base, [models[0], {**models[1], "b": torch.zeros(7)}]),
         "shape"),
        ("dtype", lambda: merge_state_dicts("average", base, [models[0], {**models[1], "b": models[1]["b"].float()}]),
         "dtype"),
        ("alpha length", lambda: merge_state_dicts("task_arithmetic", base, models, [1.0]), "2 models"),
        ("alpha nan", lambda: merge_state_dicts("task_arithmetic", base, models, [1.0, float("nan")]),
         "finite"),
        ("unknown method", lambda: merge_state_dicts("soup", base, models), "unknown merge method"),
        ("unknown option", lambda: merge_state_dicts("average", base, models, delta=1.0), "no option"),
        ("no fishers", lambda: merge_state_dicts("gradient_matching", base, models, **gm), "needs Fishers"),
        ("fisher count", lambda: merge_state_dicts("gradient_matching", base, models, None, fishers[:1], **gm),
         "1 Fishers for 2 models"),
        ("fisher key", lambda: merge_state_dicts("gradient_matching", base, models, None,
                                                 [fishers[0], {"w": fishers[1]["w"]}], **gm), "no entry"),
        ("fisher shape", lambda: merge_state_dicts("gradient_matching", base, models, None,
                                                   [fishers[0], {**fishers[1], "b": torch.ones(3)}], **gm), "shape"),
        ("negative fisher", lambda: merge_state_dicts("gradient_matching", base, models, None, neg, **gm),
         "negative"),
        ("nan fisher", lambda: merge_state_dicts("gradient_matching", base, models, None, nan, **gm),
         "non-finite"),
        ("zero fishers", lambda: merge_state_dicts("gradient_matching", base, models, None, zeros, sizes,
                                                   delta=0.0), "0/0"),
        ("zero fishers avg", lambda: merge_state_dicts("fisher_average", base, models, None, zeros), "0/0"),
        ("no sizes", lambda: merge_state_dicts("gradient_matching", base, models, None, fishers), "sizes"),
        ("bad sizes", lambda: merge_state_dicts("gradient_matching", base, models, None, fishers, [1, -2]),
         "positive"),
        ("architecture", lambda: merge_models("average", Net(), [nn.Linear(3, 4)]), "architectures"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, fn, msg = case
    with pytest.raises(MergeError, match=msg):
        fn()


def test_registry_adds_a_method_with_one_function():
    from toolkit.merge import register
    @register("_first_model")
    def first(base, thetas, alphas):
        """Take the first model."""
        return thetas[0].clone()
    try:
        base, models, *_ = random_setup()
        assert close(merge_state_dicts("_first_model", base, models), models[0])
        assert get_method("_first_model").summary == "Take the first model."
        assert torch.equal(merge_tensor("_first_model", "w", base["w"], [m["w"] for m in models]),
                           models[0]["w"])
    finally:
        METHODS.pop("_first_model")


def test_merge_models_transformers_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base, m1, m2 = (transformers.BertForSequenceClassification(cfg).eval() for _ in range(3))
    out = merge_models("task_arithmetic", base, [m1, m2], [0.5, 0.5])
    sd, s1, s2 = out.state_dict(), m1.state_dict(), m2.state_dict()
    k = "classifier.weight"
    assert torch.allclose(sd[k], base.state_dict()[k] + 0.5 * (s1[k] - base.state_dict()[k])
                          + 0.5 * (s2[k] - base.state_dict()[k]))
    ids = torch.randint(0, 50, (2, 7))
    assert out(input_ids=ids).logits.shape == (2, 3)


def test_registry_metadata_drives_grid_and_knobs():
    """merge_at: alpha is TIES' lam (alphas fixed at 1), knobs a method does not take are dropped,
    and a method where alpha cancels is evaluated at one grid point."""
    from toolkit.merge import METHODS, merge_at, merge_grid

    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}, {"w": torch.tensor([2.0, 1.0, -1.0, 0.5])}]
    knobs = {"density": 1.0, "delta": 1.0, "p": 0.0, "seed": 0}
    ties = merge_at("ties", base, models, 0.5, **knobs)["w"]
    assert torch.allclose(ties, 0.5 * merge_state_dicts("ties", base, models, [1, 1], density=1.0)["w"])
    ta = merge_at("task_arithmetic", base, models, 0.5, **knobs)["w"]
    assert torch.allclose(ta, 0.5 * (models[0]["w"] + models[1]["w"]))
    assert [a for a, _ in merge_grid("average", base, models, [0.1, 0.5, 1.0])] == [1.0]
    assert len(list(merge_grid("dare", base, models, [0.1, 0.5, 1.0], **knobs))) == 3
    assert METHODS["gradient_matching"].needs_sizes and METHODS["gradient_matching"].elementwise
    assert not METHODS["ties"].elementwise and METHODS["ties"].scale_knob == "lam"


def test_register_rejects_unknown_scale_knob():
    from toolkit.merge import register

    with pytest.raises(MergeError, match="scale_knob"):
        @register("broken_for_test", scale_knob="nope")
        def broken(base, thetas, alphas, lam: float = 1.0):
            return base
