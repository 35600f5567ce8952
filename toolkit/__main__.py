"""The command line: `python -m toolkit` (or `toolkit`) merge | fisher | methods.

    python -m toolkit merge CONFIG.yaml [--overwrite] [--quiet]
    python -m toolkit fisher MODEL_DIR --data texts.txt --out fisher.safetensors [--kind mc] ...
    accelerate launch -m toolkit fisher MODEL_DIR --data texts.jsonl --out fisher.safetensors
    python -m toolkit methods

Exit codes: 0 done; 2 bad input (a config value, flag, file or path), with ONE line
`error: ...` on stderr naming the key or file and nothing written; 130 interrupted (Ctrl-C or
SIGTERM; the temporary output is removed); 1 an internal error (a bug: a traceback, please report it).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from . import validate
from .errors import MergeError

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`error: ...`, status 2) like every other error."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n")


def _checked(within: str | None = None, integer: bool = False):
    """An argparse type: a number (int if `integer`) inside the interval `within`."""
    def parse(s: str):
        try:
            v = int(s) if integer else float(s)
        except ValueError:
            want = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        try:
            return validate.number(v, "it", within, integer=integer)
        except MergeError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("it ")) from None
    parse.__name__ = "integer" if integer else "number"
    return parse


POSITIVE_INT = _checked("[1, inf)", integer=True)


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
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    info = estimate_fisher_file(args.model, args.data, args.out, kind=args.kind, n_samples=args.n_samples,
                                max_examples=args.max_examples, dataset_size=args.dataset_size,
                                batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                backend=args.backend, text_key=args.text_key, dtype=args.dtype,
                                progress=not args.quiet, per=args.per)
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
    p = _Parser(prog="toolkit", description="Model merging by uncertainty-based gradient matching.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints on disk as a YAML config says (see toolkit.stream)")
    m.add_argument("config", help="YAML config: base, models, method, output, ...")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--threads", type=POSITIVE_INT, default=None, help="worker threads reading and merging "
                   "chunks in parallel (default: torch's thread count, i.e. the cores)")
    m.set_defaults(run=_merge)

    f = sub.add_parser("fisher", help="estimate a diagonal Fisher of a causal LM and write a Fisher file")
    f.add_argument("model", help="Hugging Face model directory (safetensors weights + tokenizer)")
    f.add_argument("--data", required=True, help=".txt (one example per line) or .jsonl ({'text': ...} per line)")
    f.add_argument("--out", required=True, help="Fisher file to write (.safetensors)")
    f.add_argument("--kind", default="mc", help="Fisher estimator, as toolkit.curvature.fisher (default mc)")
    f.add_argument("--n-samples", type=POSITIVE_INT, default=1, help="sampled labels per example (mc)")
    f.add_argument("--max-examples", type=POSITIVE_INT, default=None, help="use the first N examples only")
    f.add_argument("--dataset-size", type=_checked("(0, inf)"), default=None,
                   help="N_t recorded for H_t = N_t F_t (default: the number of examples in --data)")
    f.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per forward/backward pass "
                   "(per-example gradients are formed inside the batch)")
    f.add_argument("--max-length", type=_checked("[2, inf)", integer=True), default=128,
                   help="tokens per example (truncation; at least 2: one to predict from, one to predict)")
    f.add_argument("--seed", type=_checked(integer=True), default=0)
    f.add_argument("--backend", default="auto", help="as toolkit.curvature.fisher")
    f.add_argument("--per", default="sequence", choices=["sequence", "token"],
                   help="mean over sequences (default) or over counted tokens (N_t then counts tokens)")
    f.add_argument("--text-key", default="text", help="field of a .jsonl line holding the text")
    f.add_argument("--dtype", default="float32", help="dtype to load the model in")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    f.set_defaults(run=_fisher)

    ls = sub.add_parser("methods", help="list the merge methods and their options")
    ls.set_defaults(run=_methods)
    return p


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m toolkit` and the `toolkit` console script; returns the exit code."""
    args = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # clean up on kill (not -9)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn
            args.run(args)
    except MergeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # disk full, permissions, a file that vanished: the file and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
