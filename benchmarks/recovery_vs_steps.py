"""How much of the compression gap the demo's prompt recovers as tuning runs longer (issue 5).

Takes the int4+50% checkpoint a `ctp demo` run wrote, tunes a prompt with the demo's settings (100 tokens,
the demo's train windows, best by wiki validation loss) for several step counts, each a full run
with its own cosine schedule, and reports the wiki test loss (the demo's 8 x 512 test windows) and the gap
recovered, (loss_compressed - loss_prompted) / (loss_compressed - loss_dense), beside tuning time. --init
compares prompt initialisations (text: the demo's, the first training tokens; vocab: sampled rows), --lr
peak learning rates (default: tune's, 3e-2 for AdamW), --window train windows per step, BATCHxTOKENS
(default: the demo's), --dtype the tuning compute (fp32, the demo's; bf16: autocast, the packed kernels'
bf16 dot products on AVX512_BF16 CPUs).

    python benchmarks/recovery_vs_steps.py --model runs/demo/model-int4+50pct [--steps 150,600] [--init text,vocab]
                                           [--lr 3e-2,1e-1] [--window 1x256,1x512] [--dtype fp32,bf16]

Writes benchmarks/results/recovery_vs_steps.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ctp_fast

from ctp_fast.checkpoint import load_compressed
from ctp_fast.data import load_model
from ctp_fast.demo import DemoConfig, prompt_init_text, test_windows, tuning_windows
from ctp_fast.eval import gap_recovered, perplexity
from ctp_fast.fileio import write_json, write_text
from ctp_fast.prompt import tune

OUT = Path(__file__).resolve().parent / "results"


def percent(share: float | None) -> str:
    return "n/a (no gap)" if share is None else f"{100 * share:.1f}%"


def parse_window(ap: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """"1x256" -> (1, 256); anything else ends the run with a message naming --window."""
    parts = text.strip().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        ap.error(f"--window: expected BATCHxTOKENS with positive integers (e.g. 1x256), got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model-int4+50pct", help="the demo's int4+50%% checkpoint")
    ap.add_argument("--steps", default="150,600", help="comma-separated step counts, one tuning run each")
    ap.add_argument("--init", default="text", help="comma-separated prompt initialisations: text, vocab")
    ap.add_argument("--lr", default="", help="comma-separated peak learning rates (empty: tune's default)")
    ap.add_argument("--window", default="", help="comma-separated train windows BATCHxTOKENS, e.g. 1x256,1x512 "
                    "(empty: the demo's)")
    ap.add_argument("--dtype", default="fp32", help="comma-separated tuning compute dtypes: fp32, bf16")
    ap.add_argument("--out", default=str(OUT / "recovery_vs_steps"))
    args = ap.parse_args(argv)
    cfg = DemoConfig()
    windows = [parse_window(ap, w) for w in args.window.split(",")] if args.window else \
        [(cfg.batch_size, cfg.train_seqlen)]
    dtypes = args.dtype.split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--dtype: expected fp32 and/or bf16, comma-separated, got {args.dtype!r}")
    dense, tok = load_model(cfg.model)
    model = load_compressed(args.model)
    test = test_windows(cfg, tok, "wiki")
    ld = perplexity(dense, test, 4).loss
    lc = perplexity(model, test, 4).loss
    rows = []
    lrs = [float(v) for v in args.lr.split(",")] if args.lr else [None]
    for (batch, seqlen), init, lr, steps, dtype in itertools.product(windows, args.init.split(","), lrs,
                                                                    [int(s) for s in args.steps.split(",")], dtypes):
        run = dataclasses.replace(cfg, steps=steps, init=init, lr=lr, batch_size=batch, train_seqlen=seqlen)
        train, val = tuning_windows(run, tok)
        tune_config = dataclasses.replace(run.tune_config(prompt_init_text(run, tok, train)), dtype=dtype)
        t = time.perf_counter()
        result = tune(model, train, val, tune_config, test_windows=test, tokenizer=tok)
        rows.append({"init": init, "lr": tune_config.resolved_lr, "steps": steps, "dtype": dtype,
                     "window": f"{batch} x {seqlen}",
                     "train_tokens": steps * batch * seqlen, "windows_available": len(train),
                     "seconds": time.perf_counter() - t, "best_step": result.best_step, "test_loss": result.test_loss,
                     "gap_recovered": gap_recovered(lc, result.test_loss, ld)})
        print(rows[-1], flush=True)
    report = {"model": args.model, "dense_loss": ld, "compressed_loss": lc, "rows": rows}
    write_json(Path(args.out + ".json"), report)
    lines = ["# Gap recovered on wiki test against tuning steps, initialisation and peak learning rate "
             "(demo settings, int4+50% SmolLM2-135M)", "",
             f"Dense test loss {ld:.4f}, int4+50% {lc:.4f} (8 x 512 wiki test tokens). Each row is its own run.", "",
             "| init | lr | dtype | steps | batch x tokens | train tokens | tuning min | best step | test loss | gap recovered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['init']} | {r['lr']:g} | {r['dtype']} | {r['steps']} | {r['window']} | {r['train_tokens']} | {r['seconds'] / 60:.1f} | "
              f"{r['best_step']} | {r['test_loss']:.4f} | {percent(r['gap_recovered'])} |" for r in rows]
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
