"""The command line: `python -m toolkit` (or `toolkit`) merge | fisher | methods.

    python -m toolkit merge CONFIG.yaml [--overwrite] [--quiet]
    python -m toolkit fisher MODEL_DIR --data texts.txt --out fisher.safetensors [--kind mc] ...
    accelerate launch -m toolkit fisher MODEL_DIR --data texts.jsonl --out fisher.safetensors
    python -m toolkit methods

Bad input exits with status 2 and one line `error: ...` (a MergeError), never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import MergeError


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _merge(args: argparse.Namespace) -> None:
    from .stream import merge_config

    overrides = {"progress": not args.quiet, "threads": args.threads}
    if args.overwrite:
        overrides["overwrite"] = True
    print(merge_config(args.config, **overrides))


def _fisher(args: argparse.Namespace) -> None:
    from .fisherfile import describe, estimate_fisher_file

    _threads(args)
    info = estimate_fisher_file(args.model, args.data, args.out, kind=args.kind, n_samples=args.n_samples,
                                max_examples=args.max_examples, dataset_size=args.dataset_size,
                                batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                backend=args.backend, text_key=args.text_key, dtype=args.dtype,
                                progress=not args.quiet)
    if info is not None:
        print(f"wrote {describe(info)}")


def _methods(args: argparse.Namespace) -> None:
    from .merge import METHODS

    for m in METHODS.values():
        opts = ", ".join(m.options) or "-"
        stats = ",".join(m.stats) or "-"
        flags = "".join(c for c, on in (("E", m.elementwise), ("A", m.alpha_cancels)) if on) or "-"
        print(f"{m.name:18} stats: {stats:8} {flags:2}  options: {opts:40} {m.summary}")
    print("\nE: elementwise (streamed in chunks); A: a common alpha cancels out")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolkit", description="Model merging by uncertainty-based gradient matching.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints on disk as a YAML config says (see toolkit.stream)")
    m.add_argument("config", help="YAML config: base, models, method, output, ...")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--threads", type=int, default=None, help="worker threads reading and merging "
                   "chunks in parallel (default: torch's thread count, i.e. the cores)")
    m.set_defaults(run=_merge)

    f = sub.add_parser("fisher", help="estimate a diagonal Fisher of a causal LM and write a Fisher file")
    f.add_argument("model", help="Hugging Face model directory (safetensors weights + tokenizer)")
    f.add_argument("--data", required=True, help=".txt (one example per line) or .jsonl ({'text': ...} per line)")
    f.add_argument("--out", required=True, help="Fisher file to write (.safetensors)")
    f.add_argument("--kind", default="mc", help="Fisher estimator, as toolkit.curvature.fisher (default mc)")
    f.add_argument("--n-samples", type=int, default=1, help="sampled labels per example (mc)")
    f.add_argument("--max-examples", type=int, default=None, help="use the first N examples only")
    f.add_argument("--dataset-size", type=float, default=None, help="N_t recorded for H_t = N_t F_t "
                   "(default: the number of examples in --data)")
    f.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward pass "
                   "(per-example gradients are formed inside the batch)")
    f.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--backend", default="auto", help="as toolkit.curvature.fisher")
    f.add_argument("--text-key", default="text", help="field of a .jsonl line holding the text")
    f.add_argument("--dtype", default="float32", help="dtype to load the model in")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    f.set_defaults(run=_fisher)

    ls = sub.add_parser("methods", help="list the merge methods and their options")
    ls.set_defaults(run=_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m toolkit` and the `toolkit` console script."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
