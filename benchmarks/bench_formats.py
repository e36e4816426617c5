"""Every packed format against dense int4, in the same process and harness as bench_int4.py.

For shapes (N, K) and M in {1, 512}: forward (and grad_input at M=512) of dense int4, 2:4 int4,
unstructured int4 at 50 / 75 / 90 % sparsity, dense int8 and int3, each cycling over enough copies of
its weight to exceed 4x the last-level cache. Prints ms, speed relative to dense int4, and bytes per
weight; writes JSON, a Markdown table (with the machine's load average before and after) and a PNG;
checks issue 3's targets (reported, never asserted).

    python benchmarks/bench_formats.py [--quick] [--shapes 4096x4096,11008x4096] [--ms 1,512]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4 import llc_bytes, plan_layers, time_cell  # noqa: E402  (one timing harness for both)

from ctp_fast import DenseWeight, Sparse24Weight, UnstructuredWeight, get_isa, packed_linear, packed_linear_grad_input  # noqa: E402
from ctp_fast.compress import magnitude_mask  # noqa: E402

FORMATS = {
    "int4": (DenseWeight, 4, None),
    "int4 2:4": (Sparse24Weight, 4, "2:4"),
    "int4 50%": (UnstructuredWeight, 4, 0.5),
    "int4 75%": (UnstructuredWeight, 4, 0.75),
    "int4 90%": (UnstructuredWeight, 4, 0.9),
    "int8": (DenseWeight, 8, None),
    "int3": (DenseWeight, 3, None),
}
TARGETS = [  # (format, M, op, minimum speed-up over dense int4)
    ("int4 2:4", 1, "fwd", 1.25), ("int4 50%", 1, "fwd", 1.15), ("int4 75%", 1, "fwd", 1.6),
    ("int4 2:4", 512, "fwd", 1.0),
]


def build(n: int, k: int, target_bytes: int, max_layers: int) -> dict:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    out = {}
    for name, (cls, bits, sparsity) in FORMATS.items():
        mask = magnitude_mask(weight, sparsity)
        w = cls.pack(weight, group_size=128, bits=bits, mask=mask)
        layers = plan_layers(w.nbytes, target_bytes, max_layers, 2 << 30)
        out[name] = {"weights": [w] + [w.map(torch.clone) for _ in range(layers - 1)],
                     "bytes_per_weight": w.bytes_per_weight}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer samples")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--ms", default="1,512")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per method and cell")
    ap.add_argument("--out", default="benchmarks/results/bench_formats")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (["4096x4096"] if args.quick else args.shapes.split(","))]
    ms = [int(m) for m in args.ms.split(",")]
    llc, _ = llc_bytes()
    rows = []
    load_before = os.getloadavg()
    print(f"ISA {get_isa()}, {torch.get_num_threads()} threads, weights cycled over > 4x the {llc >> 20} MiB LLC")
    print(f"{'shape':>11} {'M':>4} {'op':>4} {'format':>9} {'B/weight':>9} {'ms':>9} {'vs int4':>8}")
    for n, k in shapes:
        fmts = build(n, k, 4 * llc, 64)
        for m in ms:
            ops = [("fwd", torch.randn(m, k))] + ([("grad", torch.randn(m, n))] if m >= 512 else [])
            for op, inp in ops:
                fn = packed_linear if op == "fwd" else packed_linear_grad_input
                fns = {f: (lambda i, ws=d["weights"], inp=inp, fn=fn: fn(inp, ws[i % len(ws)])) for f, d in fmts.items()}
                cell = time_cell(fns, {f: len(d["weights"]) for f, d in fmts.items()},
                                 reps=5 if args.quick else args.reps, budget=0.5 if args.quick else args.budget)
                base = cell["int4"]["median_s"]
                for f, r in cell.items():
                    row = {"shape": f"{n}x{k}", "M": m, "op": op, "format": f, "ms": r["median_s"] * 1e3,
                           "speedup_vs_int4": base / r["median_s"], "bytes_per_weight": fmts[f]["bytes_per_weight"]}
                    rows.append(row)
                    print(f"{row['shape']:>11} {m:4d} {op:>4} {f:>9} {row['bytes_per_weight']:9.3f} {row['ms']:9.3f} "
                          f"{row['speedup_vs_int4']:7.2f}x")
    verdicts = target_lines(rows)
    print("\ntargets (speed-up over dense int4; reported, not asserted)")
    print("\n".join(verdicts))
    meta = {"isa": get_isa(), "threads": torch.get_num_threads(), "load_before": load_before,
            "load_after": os.getloadavg(), "reps": args.reps, "budget_s": args.budget}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, out.with_suffix(".png"))
    return 0


def target_lines(rows) -> list[str]:
    lines = []
    for f, m, op, need in TARGETS:
        for r in (r for r in rows if r["format"] == f and r["M"] == m and r["op"] == op):
            verdict = "PASS" if r["speedup_vs_int4"] >= need else "MISS"
            lines.append(f"  {verdict}  {r['shape']:>11} M={m:<4} {f:9} >= {need:.2f}x: {r['speedup_vs_int4']:.2f}x")
    return lines


def markdown(rows, meta) -> str:
    """The results as a Markdown table: one row per (shape, M, op), per format ms and speed-up over int4."""
    fmts = list(FORMATS)
    la, lb = meta["load_before"], meta["load_after"]
    out = [f"# bench_formats: packed formats vs dense int4 (same process, round-robin medians)", "",
           f"ISA {meta['isa']}, {meta['threads']} threads, {meta['reps']} samples per cell; load average "
           f"(1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} "
           f"on {os.cpu_count()} CPUs.", "",
           "Bytes per weight: " + ", ".join(f"{f} {next(r['bytes_per_weight'] for r in rows if r['format'] == f):.3f}"
                                             for f in fmts), "",
           "| shape | M | op | " + " | ".join(fmts) + " |", "|---|---|---|" + "---|" * len(fmts)]
    for cell in dict.fromkeys((r["shape"], r["M"], r["op"]) for r in rows):
        got = {r["format"]: r for r in rows if (r["shape"], r["M"], r["op"]) == cell}
        out.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | " +
                   " | ".join(f"{got[f]['ms']:.3f} ms ({got[f]['speedup_vs_int4']:.2f}x)" for f in fmts) + " |")
    out += ["", "Targets (speed-up over dense int4):", "", "```", *target_lines(rows), "```", ""]
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["shape"], r["M"], r["op"]) for r in rows}, key=str)
    fmts = list(FORMATS)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(fmts)
    for i, f in enumerate(fmts):
        vals = [next(r["speedup_vs_int4"] for r in rows if (r["shape"], r["M"], r["op"]) == c and r["format"] == f)
                for c in cells]
        ax.bar([j + i * width for j in range(len(cells))], vals, width, label=f)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(cells))], [f"{s}\nM={m} {op}" for s, m, op in cells], fontsize=7)
    ax.set_ylabel("speed-up over dense int4")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
