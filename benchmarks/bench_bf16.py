"""bf16 activations on the packed kernels: the bf16 dot-product path (ISA avx512bf16) against the same
call on the avx512 path (activations widened to fp32, the only way before), our fp32 activations, and
torch's bf16 matmul on the dense bf16 weight, all in one process and harness (bench_int4.time_cell:
round-robin medians, weights cycled over > 4x the last-level cache).

For each shape (N, K), M and layout (dense int4, 2:4, unstructured 50%), forward and grad_input:

    bf16 dot   packed_linear(x_bf16, w) on avx512bf16                 (this path)
    bf16 wide  packed_linear(x_bf16, w) on avx512                     (widen to fp32, the fp32 kernels)
    fp32       packed_linear(x_fp32, w)
    torch bf16 x_bf16 @ Wb.T (grad: gy_bf16 @ WbT.T, WbT = Wb.T contiguous, torch's fast layout)

    python benchmarks/bench_bf16.py [--quick] [--shapes 1536x576,576x1536,4096x4096] [--ms 64,256,512]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4 import llc_bytes, plan_layers, time_cell  # noqa: E402  (one timing harness)

import ctp_fast  # noqa: E402
from ctp_fast import DenseWeight, Sparse24Weight, UnstructuredWeight, packed_linear, packed_linear_grad_input  # noqa: E402
from ctp_fast.compress import magnitude_mask, nm_mask  # noqa: E402

LAYOUTS = {"int4": (DenseWeight, None), "int4 2:4": (Sparse24Weight, "2:4"), "int4 50%": (UnstructuredWeight, 0.5)}
METHODS = ("bf16 dot", "bf16 wide", "fp32", "torch bf16")


def on_isa(isa: str, fn):
    def run(i):
        ctp_fast.set_isa(isa)
        return fn(i)
    return run


def cell_fns(op: str, m: int, n: int, k: int, ws: list, wb: list, wbt: list) -> dict:
    if op == "fwd":
        x = torch.randn(m, k)
        xb = x.bfloat16()
        ours = lambda a: (lambda i: packed_linear(a, ws[i % len(ws)]))  # noqa: E731
        dense = lambda i: xb @ wb[i % len(wb)].T  # noqa: E731
    else:
        x = torch.randn(m, n)
        xb = x.bfloat16()
        ours = lambda a: (lambda i: packed_linear_grad_input(a, ws[i % len(ws)]))  # noqa: E731
        dense = lambda i: xb @ wbt[i % len(wbt)].T  # noqa: E731
    return {"bf16 dot": on_isa("avx512bf16", ours(xb)), "bf16 wide": on_isa("avx512", ours(xb)),
            "fp32": on_isa("avx512bf16", ours(x)), "torch bf16": dense}


def weight_grid(shapes, ms, llc):
    """Every cell (n, k, layout, m, op, ws, wb, wbt) of a shape x layout x M x op sweep: ws the packed
    weight (group size 64) and its copies, wb the dense bf16 weight's copies and wbt their transposes (torch's
    fast grad layout), each list cycling over > 4x the last-level cache. One weight per shape and seed 0."""
    for n, k in shapes:
        torch.manual_seed(0)
        weight = torch.randn(n, k) * 0.02
        wb0 = weight.bfloat16()
        wb = [wb0.clone() for _ in range(plan_layers(wb0.numel() * 2, 4 * llc, 64, 1 << 30))]
        wbt = [w.T.contiguous() for w in wb]
        for name, (cls, sparsity) in LAYOUTS.items():
            mask = nm_mask(weight, 2, 4) if sparsity == "2:4" else magnitude_mask(weight, sparsity)
            w0 = cls.pack(weight, group_size=64, mask=mask)
            ws = [w0] + [w0.map(torch.clone) for _ in range(plan_layers(w0.nbytes, 4 * llc, 64, 1 << 30) - 1)]
            for m in ms:
                for op in ("fwd", "grad"):
                    yield n, k, name, m, op, ws, wb, wbt


def write_results(args, load_before, rows, markdown, plot) -> None:
    """args.out + .json (rows and the run's meta), .md (markdown(rows, meta)) and .png (plot(rows, path))."""
    meta = {"threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg(),
            "reps": args.reps, "budget_s": args.budget, "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png")


def sweep_args(argv, doc: str, ms: str, quick_m: int, budget: float, out: str):
    """The command line of a shape x M sweep (this script, bench_amx): (args, shapes [(n, k)], ms);
    --quick: one shape (1536x576), one M (quick_m)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, one M, fewer samples")
    ap.add_argument("--shapes", default="1536x576,576x1536,4096x4096", help="NxK[,NxK...]")
    ap.add_argument("--ms", default=ms)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--budget", type=float, default=budget, help="seconds per method and cell")
    ap.add_argument("--out", default=out)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (["1536x576"] if args.quick else args.shapes.split(","))]
    return args, shapes, [quick_m] if args.quick else [int(m) for m in args.ms.split(",")]


def main(argv=None) -> int:
    args, shapes, ms = sweep_args(argv, __doc__, "64,256,512", 256, 1.5, "benchmarks/results/bench_bf16")
    if "avx512bf16" not in ctp_fast.supported_isas():
        print("this CPU lacks AVX512_BF16: there is no bf16 dot-product path to measure", file=sys.stderr)
        return 2
    previous = ctp_fast.get_isa()
    llc, _ = llc_bytes()
    load_before = os.getloadavg()
    rows = []
    print(f"{torch.get_num_threads()} threads; weights cycled over > 4x the {llc >> 20} MiB LLC")
    print(f"{'shape':>10} {'M':>4} {'op':>4} {'layout':>9} " + " ".join(f"{m:>11}" for m in METHODS)
          + "  dot vs wide / fp32 / torch")
    try:
        for n, k, name, m, op, ws, wb, wbt in weight_grid(shapes, ms, llc):
            fns = cell_fns(op, m, n, k, ws, wb, wbt)
            nl = {"bf16 dot": len(ws), "bf16 wide": len(ws), "fp32": len(ws), "torch bf16": len(wb)}
            cell = time_cell(fns, nl, reps=5 if args.quick else args.reps, budget=0.5 if args.quick else args.budget)
            t = {meth: cell[meth]["median_s"] for meth in METHODS}
            row = {"shape": f"{n}x{k}", "M": m, "op": op, "layout": name,
                   "ms": {meth: v * 1e3 for meth, v in t.items()},
                   "dot_vs": {meth: t[meth] / t["bf16 dot"] for meth in METHODS[1:]}}
            rows.append(row)
            print(f"{row['shape']:>10} {m:4d} {op:>4} {name:>9} "
                  + " ".join(f"{row['ms'][meth]:8.3f} ms" for meth in METHODS)
                  + "  " + " / ".join(f"{row['dot_vs'][meth]:.2f}x" for meth in METHODS[1:]))
    finally:
        ctp_fast.set_isa(previous)
    write_results(args, load_before, rows, markdown, plot)
    return 0


def markdown(rows, meta) -> str:
    la, lb = meta["load_before"], meta["load_after"]
    out = ["# bench_bf16: bf16 activations on the packed kernels (same process, round-robin medians)", "",
           f"{meta['threads']} threads, {meta['reps']} samples per cell; load average (1/5/15 min) before "
           f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} on {meta['cpus']} CPUs.",
           "", "Speed-up = other method's time / bf16 dot's time (> 1: the bf16 dot-product path is faster).", "",
           "| shape | M | op | layout | " + " | ".join(f"{m} ms" for m in METHODS)
           + " | vs bf16 wide | vs fp32 | vs torch bf16 |", "|---|---|---|---|" + "---|" * (len(METHODS) + 3)]
    for r in rows:
        out.append(f"| {r['shape']} | {r['M']} | {r['op']} | {r['layout']} | "
                   + " | ".join(f"{r['ms'][m]:.3f}" for m in METHODS) + " | "
                   + " | ".join(f"{r['dot_vs'][m]:.2f}x" for m in METHODS[1:]) + " |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    labels = [f"{r['shape']} M={r['M']}\n{r['op']} {r['layout']}" for r in rows]
    width = 0.27
    for i, meth in enumerate(METHODS[1:]):
        ax.bar([j + i * width for j in range(len(rows))], [r["dot_vs"][meth] for r in rows], width,
               label=f"{meth} time / bf16 dot time")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width for j in range(len(rows))], labels, fontsize=6, rotation=90)
    ax.set_ylabel("speed-up of the bf16 dot-product path")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
