"""Cost of each statistics pass a merge needs, in training steps, measured in one run. Not a test.

    python benchmarks/bench_stats.py [--examples 512] [--batch 64] [--repeats 3] [--threads 2]

On a small ViT (the book's vision backbone at `small` plus a 10-class head) and `--examples`
random images: the diagonal Fisher (mc, exact; hooks backend), the mask-node Fisher (one
per head and neuron), RegMean's Grams (forward only) and IVON (its Hessian comes with training:
the cost is the extra time of an IVON step over an AdamW step, times the fine-tuning steps).
"training steps" is the median ratio to one AdamW training step on a batch, measured alternately
with each row (robust to changing machine load; `bench_curvature.measure`).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from bench_curvature import measure
from toolkit.curvature import fisher
from toolkit.gram import grams
from toolkit.masknodes import node_fishers
from toolkit.vision import fast_cpu


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=3,
                             num_heads=3, mlp_ratio=2.0, global_pool="avg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs the IVON cost is counted over")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import ivon

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.examples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.examples,), generator=g)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.examples, args.batch)]
    m = model()
    adam = torch.optim.AdamW(m.parameters(), lr=1e-4)
    opt = ivon.IVON(m.parameters(), lr=1e-3, ess=args.examples, beta2=0.99)
    xb, yb = batches[0]

    def step():
        adam.zero_grad(set_to_none=True)
        F.cross_entropy(m(xb), yb).backward()
        adam.step()

    def ivon_step():
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(m(xb), yb).backward()
        opt.step()

    steps = math.ceil(args.epochs * args.examples / args.batch)
    with fast_cpu():
        for _ in range(2):
            step()
        rows = []
        for name, fn in [("Fisher, mc (hooks)", lambda: fisher(m, batches, "mc", progress=False)),
                         ("Fisher, exact (hooks)", lambda: fisher(m, batches, "exact", progress=False)),
                         ("mask-node Fisher", lambda: node_fishers(m, batches)),
                         ("Gram matrices (RegMean)", lambda: grams(m, batches))]:
            t, ratio, _, _, t_step, _ = measure(fn, step, args.repeats)
            rows.append((name, f"{args.examples} examples", t, ratio))
        t_iv, r_iv, _, _, t_step, _ = measure(ivon_step, step, max(args.repeats, 5))
        rows.append(("IVON step / AdamW step", "1 batch", t_iv, r_iv))
        rows.append(("IVON Hessian (extra over AdamW)", f"{steps} fine-tuning steps",
                     steps * t_step * max(r_iv - 1, 0.0), steps * max(r_iv - 1, 0.0)))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, ViT {sum(p.numel() for p in m.parameters()) / 1e3:.0f}k params, "
          f"batch {args.batch}, median of {args.repeats}; training step {1e3 * t_step:.1f} ms")
    print("\n| statistic | over | seconds | training steps |")
    print("|---|---|---:|---:|")
    for name, over, t, r in rows:
        print(f"| {name} | {over} | {t:.3f} | {r:.2f} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(benchmark took {time.time() - t0:.0f} s)")
