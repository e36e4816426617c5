"""The AMX path (ISA amx, csrc/cpu/qlinear_amx.cpp) against the AVX-512 kernels it replaces at M >= 16,
and against torch's bf16 matmul on the dense bf16 weight (oneDNN, itself on AMX), all in one process and
harness (bench_int4.time_cell: round-robin medians, weights cycled over > 4x the last-level cache).

For each shape (N, K), M and layout (dense int4, 2:4, unstructured 50%, group 64 as in the demo),
forward and grad_input:

    amx fp32     packed_linear(x_fp32, w) on amx     (this path: exact W, hi/lo split of x)
    avx512 fp32  packed_linear(x_fp32, w) on avx512  (the fp32 FMA kernels, the baseline)
    amx bf16     packed_linear(x_bf16, w) on amx     (lo halves all zero: half the tile products)
    torch bf16   x_bf16 @ Wb.T                       (dense bf16 weight: 4x the bytes, W rounded)

    python benchmarks/bench_amx.py [--quick] [--shapes 1536x576,576x1536,4096x4096] [--ms 16,64,356,512]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16 import on_isa, sweep_args, weight_grid, write_results  # noqa: E402  (the same sweep, ISA switch, outputs)
from bench_int4 import llc_bytes, time_cell  # noqa: E402  (one timing harness)

import ctp_fast  # noqa: E402
from ctp_fast import packed_linear, packed_linear_grad_input  # noqa: E402

METHODS = ("amx fp32", "avx512 fp32", "amx bf16", "torch bf16")


def cell_fns(op: str, m: int, n: int, k: int, ws: list, wb: list, wbt: list) -> dict:
    x = torch.randn(m, k if op == "fwd" else n)
    xb = x.bfloat16()
    kernel = packed_linear if op == "fwd" else packed_linear_grad_input
    dense = wb if op == "fwd" else wbt
    ours = lambda a: (lambda i: kernel(a, ws[i % len(ws)]))  # noqa: E731
    return {"amx fp32": on_isa("amx", ours(x)), "avx512 fp32": on_isa("avx512", ours(x)),
            "amx bf16": on_isa("amx", ours(xb)), "torch bf16": lambda i: xb @ dense[i % len(dense)].T}


def main(argv=None) -> int:
    args, shapes, ms = sweep_args(argv, __doc__, "16,64,356,512", 356, 1.0, "benchmarks/results/bench_amx")
    if "amx" not in ctp_fast.supported_isas():
        print("this CPU (or OS) offers no AMX tiles: there is no amx path to measure", file=sys.stderr)
        return 2
    previous = ctp_fast.get_isa()
    llc, _ = llc_bytes()
    load_before = os.getloadavg()
    rows = []
    print(f"{torch.get_num_threads()} threads; weights cycled over > 4x the {llc >> 20} MiB LLC")
    print(f"{'shape':>10} {'M':>4} {'op':>4} {'layout':>9} " + " ".join(f"{m:>11}" for m in METHODS)
          + "  avx512 / amx, torch / amx")
    try:
        for n, k, name, m, op, ws, wb, wbt in weight_grid(shapes, ms, llc):
            nl = {meth: len(ws) for meth in METHODS[:3]} | {"torch bf16": len(wb)}
            cell = time_cell(cell_fns(op, m, n, k, ws, wb, wbt), nl, reps=5 if args.quick else args.reps,
                             budget=0.5 if args.quick else args.budget)
            t = {meth: cell[meth]["median_s"] for meth in METHODS}
            row = {"shape": f"{n}x{k}", "M": m, "op": op, "layout": name,
                   "ms": {meth: v * 1e3 for meth, v in t.items()},
                   "speedup": t["avx512 fp32"] / t["amx fp32"], "torch_vs": t["torch bf16"] / t["amx fp32"]}
            rows.append(row)
            print(f"{row['shape']:>10} {m:4d} {op:>4} {name:>9} "
                  + " ".join(f"{row['ms'][meth]:8.3f} ms" for meth in METHODS)
                  + f"  {row['speedup']:.2f}x, {row['torch_vs']:.2f}x")
    finally:
        ctp_fast.set_isa(previous)
    write_results(args, load_before, rows, markdown, plot)
    return 0


def markdown(rows, meta) -> str:
    la, lb = meta["load_before"], meta["load_after"]
    out = ["# bench_amx: the AMX path against the AVX-512 kernels (same process, round-robin medians)", "",
           f"{meta['threads']} threads, {meta['reps']} samples per cell, group size 64; load average (1/5/15 min) "
           f"before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} on {meta['cpus']} CPUs.",
           "", "Speed-up = avx512 fp32 time / amx fp32 time; torch/amx = torch bf16 time / amx fp32 time.", "",
           "| shape | M | op | layout | " + " | ".join(f"{m} ms" for m in METHODS) + " | speed-up | torch/amx |",
           "|---|---|---|---|" + "---|" * (len(METHODS) + 2)]
    for r in rows:
        out.append(f"| {r['shape']} | {r['M']} | {r['op']} | {r['layout']} | "
                   + " | ".join(f"{r['ms'][m]:.3f}" for m in METHODS) + f" | {r['speedup']:.2f}x | {r['torch_vs']:.2f}x |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    labels = [f"{r['shape']} M={r['M']}\n{r['op']} {r['layout']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], 0.6, label="avx512 fp32 time / amx fp32 time")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("speed-up of the AMX path")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
