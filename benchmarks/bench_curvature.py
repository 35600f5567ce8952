"""Cost of the diagonal Fisher estimators relative to one training step, and their agreement
with the per-example loop. Prints a table; not a test.

    python benchmarks/bench_curvature.py [--repeats 5] [--threads 2] [--batch 64] [--quick]

Each time is the median over repeats of one batch of `--batch` examples; "x step" divides by the
median time of a training step (forward + backward of the mean loss) on the same batch, measured
alternately with that row's estimator in the same run (robust to changing machine load).
Baselines: the per-example loop backend, torch.func vmap(grad) and (MLP only)
BackPACK SumGradSquared. Target: mc and empirical within 3x a training step on both models.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from toolkit.curvature import fisher


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(),
                         nn.Linear(200, 10))


def vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                             depth=5, num_heads=3, mlp_ratio=4.0)


def timed(fn, step, repeats: int, warmup: int = 1) -> tuple[float, float, object]:
    """Median wall time of `fn` and of a training step `step`, run alternately (so both see the
    same machine load), after `warmup` untimed calls of fn; and fn's last result."""
    for _ in range(warmup):
        fn()
    t_fn, t_step, out = [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        t_step.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = fn()
        t_fn.append(time.perf_counter() - t)
    return statistics.median(t_fn), statistics.median(t_step), out


def train_step(model: nn.Module, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def vmap_empirical(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Baseline: per-example gradients with torch.func.vmap(grad), squared and averaged."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    onehot = F.one_hot(y, 10).to(x.dtype)  # label indexing inside vmap: use one-hot targets

    def loss(p, xi, ti):
        z = functional_call(model, p, (xi[None],))[0]
        return -(torch.log_softmax(z, -1) * ti).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, onehot)
    return {k: (v ** 2).mean(0) for k, v in g.items()}


def backpack_empirical(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Baseline: BackPACK SumGradSquared of the summed loss, divided by N."""
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared
    m = extend(model)
    m.zero_grad(set_to_none=True)
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(m(x), y)
    with backpack(SumGradSquared()):
        loss.backward()
    return {k: p.sum_grad_squared / len(y) for k, p in m.named_parameters()}


def diff(a: dict, b: dict) -> tuple[float, float]:
    """Max abs difference over all entries, and that relative to max |b|."""
    d = max(float((a[k] - b[k]).abs().max()) for k in b)
    return d, d / max(float(b[k].abs().max()) for k in b)


def run(name: str, model: nn.Module, x, y, repeats: int, loop_repeats: int) -> list[tuple]:
    model.eval()
    step = lambda: train_step(model, x, y)  # noqa: E731
    for _ in range(2):
        step()
    rows, steps, ref, batch = [], [], {}, [(x, y)]

    def row(kind, backend, fn, reference, n=repeats, warmup=1):
        t, t_step, got = timed(fn, step, n, warmup)
        model.zero_grad(set_to_none=True)
        steps.append(t_step)
        a, r = ("ref", "ref") if reference is None else (f"{v:.1e}" for v in diff(got, reference))
        rows.append((name, kind, backend, t, t / t_step, a, r))
        return got

    for kind in ("exact", "mc", "empirical", "batch_squared"):
        ref[kind] = row(kind, "loop", lambda: fisher(model, batch, kind, backend="loop", progress=False),
                        None, loop_repeats, 0)
        row(kind, "hooks", lambda: fisher(model, batch, kind, backend="hooks", progress=False), ref[kind])
    for m in model.modules():  # vmap needs timm's non-fused attention path
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    row("empirical", "vmap", lambda: vmap_empirical(model, x, y), ref["empirical"])
    if name.startswith("MLP"):
        try:
            bp = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row("empirical", "backpack", lambda: backpack_empirical(bp, x, y), ref["empirical"])
        except ImportError:
            pass
    return [(name, "training step", "", statistics.median(steps), 1.0, "", "")] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {repeats} ({args.loop_repeats} for the loop)")
    if os.getloadavg()[0] > os.cpu_count() - args.threads + 0.5:
        print("note: other processes are using the CPUs; with --threads 2 on a busy 2-core machine "
              "OpenMP waits can slow every row by 10x or more; compare ratios, or use --threads 1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    rows = []
    for name, make in (("MLP", mlp), ("ViT", vit)):
        model = make()
        n = sum(p.numel() for p in model.parameters())
        rows += run(f"{name} {n / 1e3:.0f}k", model, x, y, repeats, args.loop_repeats)
    print(f"\n| model | estimator | backend | ms | x step | max abs diff vs loop | max rel diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for m, kind, be, t, ratio, a, r in rows:
        print(f"| {m} | {kind} | {be} | {1e3 * t:.1f} | {ratio:.2f} | {a} | {r} |")
    rel = [float(r) for *_, r in rows if r not in ("", "ref")]
    print(f"\nagreement with the per-example loop: max relative difference {max(rel):.1e} "
          f"({'within' if max(rel) <= 1e-5 else 'NOT within'} 1e-5)")
    for m in dict.fromkeys(r[0] for r in rows):
        worst = max(r[4] for r in rows if r[0] == m and r[2] == "hooks" and r[1] in ("mc", "empirical"))
        print(f"target (mc, empirical within 3x a training step) on {m}: {worst:.2f}x "
              f"{'met' if worst <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
