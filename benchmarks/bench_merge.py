"""Benchmark the streaming merge (`python -m toolkit merge`) against the read+write floor and mergekit.

Makes T+1 random Llama-style fp32 checkpoints (sharded safetensors + config.json) and T Fisher
files in --workdir, warms the page cache, then times, each as its own process:
  floor      cat of every input shard > /dev/null, then dd of as many bytes as the output has
             (and again with the Fisher files, gradient matching's floor)
  toolkit TA our task arithmetic theta_0 + sum_t alpha_t tau_t
  mergekit   mergekit-yaml with task_arithmetic (skipped with a message if not found)
  toolkit GM our gradient matching (also reads the T Fisher files)
  TA + Fishers  task arithmetic's arithmetic, but reading and checking the T Fisher files as
             gradient matching does (a method registered for the run): gradient matching's floor
             within our merge, so its own arithmetic is what lies between the two
and the interpreter's startup (python -c "import toolkit.stream", which every run of ours pays;
mostly importing torch), and prints wall time (fastest of --repeat runs, unsampled), peak private
memory (Private_* of /proc/PID/smaps_rollup, sampled every 20 ms in one more run), peak anonymous
private memory (Private_Dirty: the heap; Private_Clean also counts page-cache pages of mapped input
chunks) and peak RSS, with ratios, and the merge's own time as its summary line reports it (the
process less its startup). Outputs are checked
against base + sum alpha_t tau_t computed in float64 (max |err| / max |ref| over tensors).

    python benchmarks/bench_merge.py --params 551M --models 4 --shards 3
    python benchmarks/bench_merge.py --mergekit /tmp/mkvenv/bin/mergekit-yaml   # or MERGEKIT=...
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from toolkit.checkpoint import Checkpoint, parse_size
from toolkit.measure import measure

GiB = 2**30


def llama_shapes(params: int) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama-style config and its tensor shapes with about `params` parameters."""
    vocab = 32000
    hidden = 1536 if params >= 300e6 else 1024 if params >= 100e6 else 256
    inter, heads, kv, hd = int(hidden * 8 / 3) // 64 * 64, hidden // 128 or 2, max(hidden // 384, 1), 128
    heads = hidden // hd
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * hd + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
                   p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
              "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    return config, shapes


def write_checkpoint(path: Path, shapes: dict, make, n_shards: int, config: dict | None, meta=None) -> None:
    """Sharded safetensors written with safetensors' own save_file (independent of our writer)."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    groups, acc, cur = [[]], 0, 0
    for n in names:
        if acc > (cur + 1) * total / n_shards and groups[-1]:
            groups.append([])
            cur += 1
        groups[-1].append(n)
        acc += torch.Size(shapes[n]).numel()
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: make(n, shapes[n]) for n in g}, path / fname, metadata={"format": "pt", **(meta or {})})
        weight_map |= {n: fname for n in g}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 4},
                                                                   "weight_map": weight_map}))
    if config:
        (path / "config.json").write_text(json.dumps(config, indent=2))


def make_inputs(work: Path, params: int, n_models: int, n_shards: int) -> tuple[list[Path], list[Path]]:
    config, shapes = llama_shapes(params)
    base_of = lambda n, s: torch.randn(s, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) * 0.02  # noqa: E731
    write_checkpoint(work / "base", shapes, base_of, n_shards, config)
    dirs, fishers = [], []
    for t in range(n_models):
        g = torch.Generator().manual_seed(1000 + t)
        write_checkpoint(work / f"model{t}", shapes, lambda n, s: base_of(n, s) + 1e-3 * torch.randn(s, generator=g),
                         n_shards, config)
        write_checkpoint(work / f"fisher{t}", shapes, lambda n, s: torch.rand(s, generator=g), n_shards, None,
                         {"dataset_size": str(1000.0 * (t + 1))})
        dirs.append(work / f"model{t}")
        fishers.append(work / f"fisher{t}")
    return dirs, fishers


def timed(cmd, repeat: int, **kw) -> dict:
    """Times from `repeat` unsampled runs, peak memory from one more run sampled every 20 ms
    (sampling holds the memory-map lock our merge takes for every chunk, and would slow it)."""
    t = measure(cmd, repeat=repeat, interval=None, **kw)
    return {**measure(cmd, repeat=1, **kw), **{k: t[k] for k in ("wall", "cpu", "stdout", "stdouts")}}


# The CLI with one more registered method: task arithmetic that also takes (so reads and checks) Fishers
TA_READING_FISHERS = """
import sys
from toolkit.__main__ import main
from toolkit.merge import register, task_arithmetic

@register("task_arithmetic_reading_fishers", uses_fisher=True, elementwise=True)
def ta_reading_fishers(base, thetas, alphas, fishers, sizes):
    return task_arithmetic(base, thetas, alphas)

sys.exit(main(sys.argv[1:]))
"""


def shard_files(d: Path) -> list[str]:
    return sorted(str(p) for p in d.glob("*.safetensors"))


def max_rel_err(out: Path, base: Path, models: list[Path], alphas: list[float], other: Path | None = None):
    """max over tensors of max|out - ref| / max|ref|, ref = base + sum alpha tau in float64; and
    the same between `out` and `other` (e.g. mergekit's output)."""
    worst, worst_other = 0.0, 0.0
    with Checkpoint(out) as o, Checkpoint(base) as b:
        cks = [Checkpoint(m) for m in models]
        oth = Checkpoint(other) if other else None
        for k in b.infos:
            bb = b.tensor(k).double()
            ref = bb + sum(a * (c.tensor(k).double() - bb) for a, c in zip(alphas, cks))
            got = o.tensor(k).double()
            scale = ref.abs().max().clamp_min(1e-30)
            worst = max(worst, ((got - ref).abs().max() / scale).item())
            if oth is not None:
                worst_other = max(worst_other, ((got - oth.tensor(k).double()).abs().max() / scale).item())
        for c in cks + ([oth] if oth else []):
            c.close()
    return worst, worst_other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="551M", help="parameters per checkpoint, e.g. 551M, 100M")
    ap.add_argument("--models", type=int, default=4, help="number of fine-tuned models T")
    ap.add_argument("--shards", type=int, default=3, help="shards per input checkpoint")
    ap.add_argument("--shard-size", default="1GB", help="output shard size")
    ap.add_argument("--workdir", default="/tmp/bench_merge", help="where checkpoints are generated")
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT", shutil.which("mergekit-yaml") or ""),
                    help="path of mergekit-yaml (default: $MERGEKIT or on PATH)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="worker threads for ours and OMP_NUM_THREADS for mergekit (default: torch's, the cores)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each command; the fastest counts")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 correctness check")
    args = ap.parse_args()

    params = parse_size(args.params.upper().rstrip("B") if args.params[-1:] in "mM" else args.params)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    alphas = [round(1.0 / args.models + 0.1 * t, 3) for t in range(args.models)]
    try:
        t0 = time.perf_counter()
        models, fishers = make_inputs(work, params, args.models, args.shards)
        base = work / "base"
        in_bytes = sum(os.path.getsize(f) for d in [base, *models] for f in shard_files(d))
        print(f"generated {args.models + 1} checkpoints of {in_bytes / (args.models + 1) / 1e9:.2f} GB "
              f"({params / 1e6:.0f}M params, {args.shards} shards) + {args.models} Fisher files "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        inputs = [f for d in [base, *models] for f in shard_files(d)]
        all_inputs = inputs + [f for d in fishers for f in shard_files(d)]
        subprocess.run(["cat", *all_inputs], stdout=subprocess.DEVNULL, check=True)  # warm page cache
        load0 = os.getloadavg()[0]
        out_bytes = sum(os.path.getsize(f) for f in shard_files(base))
        rows = {}

        floor = f"cat {' '.join(inputs)} > /dev/null && dd if=/dev/zero of={work}/floor.bin bs=16M " \
                f"count={out_bytes // 2**24 + 1} status=none"
        rows["read+write floor (cat+dd)"] = timed(floor, shell=True, repeat=args.repeat)
        gm_floor = floor.replace(f"cat {' '.join(inputs)}", f"cat {' '.join(all_inputs)}")
        rows["floor with the Fisher files"] = timed(gm_floor, shell=True, repeat=args.repeat)
        os.remove(work / "floor.bin")
        rows["startup (import toolkit.stream)"] = timed([sys.executable, "-c", "import toolkit.stream"],
                                                          repeat=args.repeat)

        def toolkit_run(method: str, out: str) -> dict:
            cfg = {"base": str(base), "models": [{"path": str(m), "alpha": a} for m, a in zip(models, alphas)],
                   "method": method, "output": str(work / out), "shard_size": args.shard_size}
            if method != "task_arithmetic":
                for e, f in zip(cfg["models"], fishers):
                    e["fisher"] = str(f)
            if method == "gradient_matching":
                cfg["delta"] = 1e-3
            (work / f"{out}.yaml").write_text(json.dumps(cfg))
            cli = ["-m", "toolkit"] if method in ("task_arithmetic", "gradient_matching") else ["-c", TA_READING_FISHERS]
            r = timed([sys.executable, *cli, "merge", str(work / f"{out}.yaml"), "--quiet",
                       "--threads", str(args.threads)], repeat=args.repeat, clean=work / out)
            print(f"  {r['stdout'].strip()}", flush=True)
            return r

        rows["toolkit task_arithmetic"] = ta = toolkit_run("task_arithmetic", "out_ta")
        mk_out = None
        if args.mergekit and Path(args.mergekit).exists():
            mk_cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                      "models": [{"model": str(m), "parameters": {"weight": a}} for m, a in zip(models, alphas)]}
            (work / "mk.yaml").write_text(json.dumps(mk_cfg))
            mk_out = work / "out_mk"
            rows["mergekit task_arithmetic"] = timed([args.mergekit, str(work / "mk.yaml"), str(mk_out),
                                                        "--out-shard-size", str(parse_size(args.shard_size))],
                                                       env={"OMP_NUM_THREADS": str(args.threads)},
                                                       repeat=args.repeat, clean=mk_out)
        else:
            print(f"mergekit not found (--mergekit / $MERGEKIT = {args.mergekit!r}): skipping it. Install it in "
                  "its own venv: python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit")
        shutil.rmtree(work / "out_gm", ignore_errors=True)
        rows["toolkit TA + Fishers"] = toolkit_run("task_arithmetic_reading_fishers", "out_gm")
        shutil.rmtree(work / "out_gm", ignore_errors=True)
        rows["toolkit gradient_matching"] = toolkit_run("gradient_matching", "out_gm")
        shutil.rmtree(work / "out_gm", ignore_errors=True)

        print(f"\n{args.models} x {params / 1e6:.0f}M-param fp32 checkpoints, inputs {in_bytes / 1e9:.2f} GB, "
              f"output {out_bytes / 1e9:.2f} GB, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
              f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        print(f"{'run':32} {'time s':>7} {'x floor':>8} {'x ours':>7} {'CPU s':>7} {'x floor':>8} {'x ours':>7} "
              f"{'private GiB':>12} {'anon GiB':>9} {'peak RSS GiB':>13}")
        fl, ta = rows["read+write floor (cat+dd)"], rows["toolkit task_arithmetic"]
        for name, r in rows.items():
            print(f"{name:32} {r['wall']:7.2f} {r['wall'] / fl['wall']:8.2f} {r['wall'] / ta['wall']:7.2f} "
                  f"{r['cpu']:7.2f} {r['cpu'] / fl['cpu']:8.2f} {r['cpu'] / ta['cpu']:7.2f} "
                  f"{r['private'] / GiB:12.2f} {r['dirty'] / GiB:9.2f} {r['rss'] / GiB:13.2f}")
        mk = rows.get("mergekit task_arithmetic")
        gm = rows["toolkit gradient_matching"]
        st = rows["startup (import toolkit.stream)"]
        for what in ("wall", "cpu"):
            print(f"\ntargets ({what} time): ours <= 1/3 mergekit: "
                  f"{'%.2f' % (ta[what] / mk[what]) if mk else 'n/a'}; ours <= 2x floor: {ta[what] / fl[what]:.2f}; "
                  f"gradient matching <= 1.5x ours: {gm[what] / ta[what]:.2f}; without the {st[what]:.2f} s startup: "
                  f"ours {(ta[what] - st[what]) / fl[what]:.2f}x floor, gradient matching "
                  f"{(gm[what] - st[what]) / (ta[what] - st[what]):.2f}x ours")
        own = {k: min(float(re.search(r" in ([0-9.]+) s ", o).group(1)) for o in rows[k]["stdouts"])
               for k in ("toolkit task_arithmetic", "toolkit TA + Fishers", "toolkit gradient_matching")}
        print(f"\nthe merge's own time (its summary line, fastest run): task arithmetic "
              f"{own['toolkit task_arithmetic']:.2f} s = {own['toolkit task_arithmetic'] / fl['wall']:.2f}x floor; "
              f"gradient matching {own['toolkit gradient_matching']:.2f} s = "
              f"{own['toolkit gradient_matching'] / own['toolkit task_arithmetic']:.2f}x task arithmetic, "
              f"{own['toolkit gradient_matching'] / rows['floor with the Fisher files']['wall']:.2f}x its own floor "
              f"(which is {rows['floor with the Fisher files']['wall'] / fl['wall']:.2f}x task arithmetic's: it also "
              f"reads {args.models} Fisher files)")
        print(f"gradient matching's floor in our merge (task arithmetic reading and checking the Fishers): "
              f"{own['toolkit TA + Fishers']:.2f} s = {own['toolkit TA + Fishers'] / own['toolkit task_arithmetic']:.2f}x "
              f"task arithmetic; its own arithmetic adds "
              f"{own['toolkit gradient_matching'] - own['toolkit TA + Fishers']:.2f} s")
        print(f"private < 1 GiB: {ta['private'] / GiB:.2f}")
        if not args.no_check:
            err, err_mk = max_rel_err(work / "out_ta", base, models, alphas, mk_out)
            print(f"max relative error vs float64 base + sum alpha tau: {err:.2e}"
                  + (f"; max relative difference from mergekit: {err_mk:.2e}" if mk_out else ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
