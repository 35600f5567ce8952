"""Cost of the diagonal Fisher estimators in training steps, per backend, and their agreement with
the per-example loop. Prints a table; not a test.

    OMP_NUM_THREADS=1 python benchmarks/bench_curvature.py [--repeats 7] [--threads 1] [--batch 64] [--quick]

Every backend goes through the library's own API, `fisher(model, batches, kind, backend=name)`.
A "training step" is forward, backward of the mean loss and an AdamW step (on a copy of the model).
Each repeat times one training step and then one estimate on the same batch, alternately, so both
see the same machine load; "x step" is the median over repeats of their ratio, printed with its
spread (min-max over repeats). Targets: mc and empirical <= 1.5x a training step on the BatchNorm
CNN, exact <= 3x at C = 10 on the MLP and the ViT.

"C backward passes" is the exact Fisher's floor for models whose layers see several positions per
example (the ViT's tokens, the CNN's pixels): there the C factors of the softmax Hessian do not
factorise through the per-position sums, so each must be backpropagated. It times one forward and
the C backward passes of the batch (one-hot output gradients, batched with vmap or one after
another, whichever is faster), with no per-example work at all.
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

from toolkit.backends import BACKENDS
from toolkit.curvature import fisher


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(),
                         nn.Linear(200, 10))


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                             depth=5, num_heads=3, mlp_ratio=4.0)


def tied_lm() -> nn.Module:
    """A small Llama whose lm_head is its embedding (tie_word_embeddings), vocabulary 512."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def lm_loss(model, inputs, _):
    z = model(**inputs).logits[:, :-1]
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1))


def cls_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def trainer(model: nn.Module, loss_fn, x, y):
    """A training step on a copy: zero_grad, forward, backward of the mean loss, AdamW step."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(m, x, y).backward()
        opt.step()
    return step


def diff(a: dict, b: dict) -> float:
    """Max abs difference over all entries relative to max |b|."""
    return max(float((a[k] - b[k]).abs().max()) for k in b) / max(float(b[k].abs().max()) for k in b)


def measure(fn, step, repeats: int, warmup: int = 1):
    """Per repeat: one training step, then fn; returns fn's median time, the median and min/max
    of the ratios, the median step time, and fn's last result."""
    for _ in range(warmup):
        fn()
    ts, ratios, steps, out = [], [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        t_step = time.perf_counter() - t
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
        steps.append(t_step)
        ratios.append(ts[-1] / t_step)
    return statistics.median(ts), statistics.median(ratios), min(ratios), max(ratios), statistics.median(steps), out


def c_backward_passes(model: nn.Module, x: torch.Tensor):
    """Two timings of one forward, then the batch's backward for each of the C one-hot output
    gradients: (batched with vmap over the output gradients, sequential); the report takes the
    faster. Per-example squares not included."""
    params = [p for p in model.parameters() if p.requires_grad]

    def batched():
        z = model(x)
        eye = torch.eye(z.shape[1]).unsqueeze(1).expand(-1, *z.shape).contiguous()
        torch.autograd.grad(z, params, eye, is_grads_batched=True)

    def sequential():
        z = model(x)
        for c in range(z.shape[1]):
            v = torch.zeros_like(z)
            v[:, c] = 1
            torch.autograd.grad(z, params, v, retain_graph=c < z.shape[1] - 1)
    return batched, sequential


def applies(backend: str, model_name: str, kind: str) -> bool:
    if backend == "backpack":  # BackPACK supports these layers (not attention, RMSNorm)
        return model_name in ("MLP", "BN-CNN") and kind != "batch_squared"
    if backend == "vmap":
        return kind in ("mc", "empirical") and model_name != "tied-LM"
    return True


def run(name: str, model: nn.Module, batch, loss_fn, task: str, kinds, repeats: int, loop_repeats: int):
    step = trainer(model, loss_fn, *batch[0])
    for _ in range(2):
        step()
    rows, steps = [], []
    for kind in kinds:
        est = lambda be: fisher(model, batch, kind, backend=be, task=task, progress=False)  # noqa: E731
        ref = None
        for be in ["loop", "hooks"] + [b for b in BACKENDS if b not in ("loop", "hooks")]:
            if not applies(be, name, kind):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t, r, lo, hi, t_step, got = measure(lambda: est(be), step, loop_repeats if be == "loop" else repeats,
                                                        0 if be == "loop" else 1)
            except ImportError:
                continue
            steps.append(t_step)
            ref = got if be == "loop" else ref
            rows.append((name, kind, be, t, r, lo, hi, "ref" if be == "loop" else f"{diff(got, ref):.1e}"))
    if "exact" in kinds and task == "classification":
        for how, fn in zip(("batched", "sequential"), c_backward_passes(model, batch[0][0])):
            try:
                t, r, lo, hi, t_step, _ = measure(fn, step, repeats)
            except RuntimeError as e:  # a layer without a batching rule
                print(f"{name}: C backward passes, {how}: {str(e).splitlines()[0][:100]}")
                continue
            steps.append(t_step)
            rows.append((name, "C backward passes (exact's floor)", how, t, r, lo, hi, ""))
    return [(name, "training step", "", statistics.median(steps), 1.0, 1.0, 1.0, "")] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--models", default="MLP,BN-CNN,ViT,tied-LM")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {repeats} ({args.loop_repeats} for the loop)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    ids = torch.randint(0, 512, (8, 32), generator=g)
    lm = [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)]
    cls = ("exact", "mc", "empirical", "batch_squared")
    models = {"MLP": (mlp, [(x, y)], cls_loss, "classification", cls),
              "BN-CNN": (bn_cnn, [(x, y)], cls_loss, "classification", cls),
              "ViT": (vit, [(x, y)], cls_loss, "classification", cls),
              "tied-LM": (tied_lm, lm, lm_loss, "causal_lm", ("mc", "empirical"))}
    rows = []
    for name in args.models.split(","):
        make, batch, loss_fn, task, kinds = models[name]
        rows += run(name, make(), batch, loss_fn, task, kinds, repeats, args.loop_repeats)
    print("\n| model | estimator | backend | ms | x step (median) | spread (min-max) | max rel diff vs loop |")
    print("|---|---|---|---:|---:|---:|---:|")
    for m, kind, be, t, r, lo, hi, d in rows:
        print(f"| {m} | {kind} | {be} | {1e3 * t:.1f} | {r:.2f} | {lo:.2f}-{hi:.2f} | {d} |")
    worst = max(float(d) for *_, d in rows if d not in ("", "ref"))
    print(f"\nagreement with the per-example loop: max relative difference {worst:.1e} "
          f"({'within' if worst <= 1e-5 else 'NOT within'} 1e-5)")
    cost = {(m, k, b): r for m, k, b, t, r, *_ in rows}
    for m, kinds, target in (("BN-CNN", ("mc", "empirical"), 1.5), ("MLP", ("exact",), 3), ("ViT", ("exact",), 3)):
        for k in kinds:
            if (m, k, "hooks") in cost:
                r = cost[(m, k, "hooks")]
                print(f"target {k} <= {target}x a training step on {m}: {r:.2f}x {'met' if r <= target else 'NOT met'}")
                floor = [r for (mm, kk, _), r in cost.items() if mm == m and kk.startswith("C backward")]
                if k == "exact" and floor:
                    print(f"  forward + C backward passes, no per-example work: {min(floor):.2f}x (the floor where "
                          "layers see several positions per example, the ViT's tokens; an MLP's classes "
                          "factorise through one backward)")


if __name__ == "__main__":
    main()
