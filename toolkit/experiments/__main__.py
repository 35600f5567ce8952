"""python -m toolkit.experiments vision | text-add | text-sources | lm-domains | lm-remove [--scale S] [--seed N]
[--out CSV]: run one benchmark (cached), write its table atomically, print its summary."""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Sequence

from ..errors import MergeError
from ..scale import SCALES

# command -> (module in toolkit.experiments, help)
BENCHMARKS = {
    "vision": ("vision", "merge ViTs fine-tuned on several vision tasks"),
    "text-add": ("text_add", "merge encoders fine-tuned on several text classification tasks"),
    "text-sources": ("text_sources", "add data sets of one text task to a model trained on the first"),
    "lm-domains": ("lm_domains", "merge a causal LM fine-tuned on several text domains"),
    "lm-remove": ("lm_remove", "remove a text domain from a causal LM (negative alpha)"),
    "adding": ("adding", "add data sets of one digit task to one ViT by merging (the paper's Figure 1)"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m toolkit.experiments",
                                 description="The book's experiments, one command each, writing CSV tables.")
    sub = ap.add_subparsers(dest="experiment", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--scale", choices=SCALES, default=None, help="default: $TOOLKIT_SCALE or small")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=f"results/{module}.csv")
        p.add_argument("--no-progress", action="store_true")
        if name == "vision":
            from .vision import STUDIES
            p.add_argument("--data-root", default=None, help="folder of torchvision data sets (full scale)")
            p.add_argument("--studies", default=",".join(STUDIES),
                           help=f"comma-separated subset of {','.join(STUDIES)} (individual models, probes and base + fine-tuned heads always run)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    bench = importlib.import_module(f"{__package__}.{BENCHMARKS[args.experiment][0]}")
    extra = {}
    if args.experiment == "vision":
        studies = tuple(x.strip() for x in args.studies.split(",") if x.strip())
        if not set(studies) <= set(bench.STUDIES):
            ap.error(f"--studies: unknown {sorted(set(studies) - set(bench.STUDIES))}; "
                     f"choose from {','.join(bench.STUDIES)}")
        extra = {"data_root": args.data_root, "studies": studies}
    from .pipeline import write_csv
    t0 = time.time()
    try:
        df = bench.run(bench.setup(args.scale, args.seed, **extra), progress=not args.no_progress)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_csv(df, args.out)
    print(bench.summary(df).to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {len(df)} rows to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
