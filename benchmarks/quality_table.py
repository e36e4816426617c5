"""Quality of every compression method on the shipped SmolLM2-135M (issue 4's table).

For each recipe: compress a fresh copy of the model (block by block, calibration windows from the wiki
train split), evaluate test perplexity with the real packed kernels, and, for packed models, again with
every CompressedLinear replaced by its dequantized nn.Linear (the same weights in dense fp32), to show
the kernels compute what the weights say. Results accumulate in a JSON file, so an interrupted run
resumes where it stopped; a markdown table and a PNG are written at the end.

    python benchmarks/quality_table.py [--calib-windows 128 --calib-seqlen 128 --eval-windows 8]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ctp_fast import CompressedLinear
from ctp_fast.nn import dequantized_copy, linear_bytes
from ctp_fast.compress.pipeline import Recipe, compress
from ctp_fast.data import corpus_split, load_model, token_windows
from ctp_fast.eval import perplexity
from ctp_fast.fileio import write_json, write_text

RECIPES = {
    "dense": None,
    "RTN int4 g128": dict(method="rtn", bits=4),
    "GPTQ int4 g128": dict(method="gptq", bits=4),
    "magnitude 50%": dict(method="magnitude", bits=None, sparsity=0.5),
    "Wanda 50%": dict(method="wanda", bits=None, sparsity=0.5),
    "SparseGPT 50%": dict(method="sparsegpt", bits=None, sparsity=0.5),
    "magnitude 2:4": dict(method="magnitude", bits=None, sparsity="2:4"),
    "Wanda 2:4": dict(method="wanda", bits=None, sparsity="2:4"),
    "SparseGPT 2:4": dict(method="sparsegpt", bits=None, sparsity="2:4"),
    "joint SparseGPT int4 + 50%": dict(method="sparsegpt", bits=4, sparsity=0.5),
    "joint SparseGPT int4 + 2:4": dict(method="sparsegpt", bits=4, sparsity="2:4"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--out", default="benchmarks/results/quality")
    args = ap.parse_args()
    out = Path(args.out)
    results_file = out / "quality.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    base, tok = load_model(args.model)
    calib = token_windows(tok, corpus_split("wiki", "train"), args.calib_seqlen, args.calib_windows)
    test = token_windows(tok, corpus_split("wiki", "test"), args.eval_seqlen, args.eval_windows)
    names = [n for n in RECIPES if not args.only or n in args.only.split(",")]
    for name in names:
        if name in results:
            print(f"{name}: done already ({results[name]['ppl']:.2f})")
            continue
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        row = {"calib_windows": args.calib_windows, "calib_seqlen": args.calib_seqlen}
        if RECIPES[name] is not None:
            recipe = Recipe(group_size=args.group_size, true_sequential=args.true_sequential, **RECIPES[name])
            t = time.time()
            compress(model, recipe, calib if recipe.needs_calibration else None, batch_size=8)
            row["compress_s"] = time.time() - t
        t = time.time()
        nll = perplexity(model, test, batch_size=4, progress=True, desc=name)
        row.update(loss=nll.loss, ppl=nll.ppl, eval_s=time.time() - t, tokens=nll.tokens)
        row["bytes_stored"], row["bytes_fp32"] = linear_bytes(model)
        if any(isinstance(m, CompressedLinear) for m in model.modules()):
            ref = perplexity(dequantized_copy(model), test, batch_size=4)
            row["ppl_dequantized_dense"] = ref.ppl
            row["loss_abs_diff_vs_dequantized"] = abs(ref.loss - nll.loss)
        results[name] = row
        write_json(results_file, results)
        print(f"{name}: ppl {row['ppl']:.2f}" + (f" (dequantized dense {row['ppl_dequantized_dense']:.2f})"
                                                 if "ppl_dequantized_dense" in row else ""))
    table = render(results, args)
    write_text(out / "quality.md", table)
    plot(results, out / "quality.png")
    print(table)


def render(results: dict, args) -> str:
    lines = [f"SmolLM2-135M, wiki test split, {args.eval_windows} windows x {args.eval_seqlen} tokens; calibration "
             f"{args.calib_windows} windows x {args.calib_seqlen} tokens (wiki train); group size {args.group_size}",
             "", "| recipe | test ppl | loss | linears stored (MiB) | vs fp32 | kernel ppl vs dequantized-dense ppl |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in sorted(results, key=lambda n: list(RECIPES).index(n) if n in RECIPES else len(RECIPES)):
        r = results[name]
        match = (f"{r['ppl']:.3f} vs {r['ppl_dequantized_dense']:.3f} (|d loss| {r['loss_abs_diff_vs_dequantized']:.1e})"
                 if "ppl_dequantized_dense" in r else "dense floats (no packed kernel)")
        lines.append(f"| {name} | {r['ppl']:.2f} | {r['loss']:.3f} | {r['bytes_stored'] / 2**20:.1f} | "
                     f"{r['bytes_stored'] / r['bytes_fp32']:.3f} | {match} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names, [math.log(results[n]["ppl"]) for n in names], color="tab:blue")
    ax.set_xlabel("test loss = log perplexity (lower is better)")
    ax.invert_yaxis()
    ax.set_title("SmolLM2-135M compression quality (wiki test)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
