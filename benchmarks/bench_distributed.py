"""Data-parallel prompt-tuning throughput on this machine: 1 rank with 2 threads, 1 rank with 1 thread,
and 2 ranks (gloo, torchrun) with 1 thread each, on SmolLM2-135M compressed to int4 (RTN, g64) or dense.

Each configuration runs `ctp_fast.prompt.tune` for `--steps` optimizer steps on the same global batch
(`--batch-size` windows of `--seqlen` tokens from the wiki corpus's train split); the time of every step
is taken on rank 0 (a step ends after the gradient all-reduce, so it includes communication) and the
median over the steps after `--warmup` gives tokens/s = batch * seqlen / median step time. The machine
is shared, so medians, and a column with the CPU time other processes took while each run ran.

    python benchmarks/bench_distributed.py [--steps 10] [--seqlen 64] [--batch-size 4] [--dense]

Writes benchmarks/results/bench_distributed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [  # (name, ranks, threads per rank)
    ("1 rank x 2 threads", 1, 2),
    ("1 rank x 1 thread", 1, 1),
    ("2 ranks x 1 thread (gloo)", 2, 1),
]


def worker(args) -> int:
    """One rank: load (and compress) the model, tune, write the per-step times (rank 0)."""
    import torch

    torch.set_num_threads(args.threads)
    from ctp_fast import Recipe, compress_model, distributed
    from ctp_fast.data import corpus_split, load_model, token_windows
    from ctp_fast.prompt import TuneConfig, tune

    distributed.init("cpu")
    model, tok = load_model("smollm2-135m")
    if not args.dense:
        compress_model(model, Recipe(method="rtn", bits=4, group_size=64), progress=False)
    train = token_windows(tok, corpus_split("wiki", "train", 0), args.seqlen, args.batch_size * (args.steps + 1))
    stamps = []
    cfg = TuneConfig(n_tokens=20, steps=args.steps, batch_size=args.batch_size, eval_every=args.steps + 1, seed=0)
    stamps.append(time.perf_counter())
    tune(model, train, None, cfg, progress=False, callback=lambda step, rec: stamps.append(time.perf_counter()))
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"step_seconds": [b - a for a, b in zip(stamps, stamps[1:])]}))
    distributed.close()
    return 0


def cpu_of_others(seconds_before: tuple[float, float], own_cpu: float) -> float:
    """CPU seconds all processes used since `seconds_before` (/proc/stat), minus this run's own."""
    busy, _ = _cpu_times()
    return max(0.0, busy - seconds_before[0] - own_cpu)


def _cpu_times() -> tuple[float, float]:
    vals = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / tick, idle / tick


def run_config(name: str, ranks: int, threads: int, args, tmp: Path) -> dict:
    result = tmp / f"r{ranks}t{threads}.json"
    me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--result", str(result),
          "--steps", str(args.steps), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    me += ["--dense"] if args.dense else []
    cmd = [sys.executable, *me] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    before = _cpu_times()
    children_before = os.times()
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    after = os.times()
    own = (after.children_user - children_before.children_user) + (after.children_system - children_before.children_system)
    steps = json.loads(result.read_text())["step_seconds"][args.warmup:]
    med = statistics.median(steps)
    return {"config": name, "ranks": ranks, "threads_per_rank": threads, "steps_timed": len(steps),
            "median_step_s": med, "min_step_s": min(steps), "max_step_s": max(steps),
            "tokens_per_s": args.batch_size * args.seqlen / med, "wall_s": wall,
            "other_cpu_share": cpu_of_others(before, own) / (wall * (os.cpu_count() or 1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4, help="global windows per step")
    ap.add_argument("--dense", action="store_true", help="the dense model instead of int4 RTN g64")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_distributed"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.steps <= args.warmup:
        ap.error(f"--steps: expected more than --warmup ({args.warmup}), got {args.steps}")
    import tempfile

    from ctp_fast.fileio import write_json, write_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, threads in CONFIGS:
            print(f"running {name} ...", flush=True)
            rows.append(run_config(name, ranks, threads, args, Path(tmp)))
    base = next(r for r in rows if r["ranks"] == 1 and r["threads_per_rank"] == 1)["tokens_per_s"]
    model = "SmolLM2-135M " + ("dense fp32" if args.dense else "int4 RTN g64")
    lines = [f"Prompt tuning throughput, {model}, global batch {args.batch_size} x {args.seqlen} tokens, "
             f"20 prompt tokens; median of {args.steps - args.warmup} steps ({os.cpu_count()} CPUs, shared).", "",
             "| configuration | median s/step | min-max s/step | tokens/s | vs 1 rank x 1 thread | other procs' CPU |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_step_s']:.2f} | {r['min_step_s']:.2f}-{r['max_step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {100 * r['other_cpu_share']:.0f}% |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"model": model, "batch_size": args.batch_size, "seqlen": args.seqlen,
                                          "steps": args.steps, "warmup": args.warmup, "rows": rows})
    write_text(out.with_suffix(".md"), table + "\n")
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
