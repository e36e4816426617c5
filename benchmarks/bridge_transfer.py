"""Cross-model prompt transfer through an embedding bridge: SmolLM2-135M -> Gemma-3-270m (issue 5).

1. Compress both models the same way (default: int4 RTN per channel, no calibration needed).
2. Learn a soft prompt on compressed SmolLM2 (wiki train split, best by wiki validation loss).
3. Fit a bridge from SmolLM2's input-embedding space (576) to Gemma's (640) on the tokens both vocabularies
   share; map the prompt through it.
4. On compressed Gemma, wiki test windows (BOS first): loss with no prompt, the bridged prompt, a random
   prompt with the same row norms, the bridged *initial* (untuned) prompt, and a prompt tuned directly on
   Gemma for the same number of steps (the upper reference). Gap recovered (in test loss):
   (loss_compressed - loss_prompted) / (loss_compressed - loss_dense).

    python benchmarks/bridge_transfer.py [--steps 30 --windows 4 --seqlen 256]

Writes benchmarks/results/bridge_transfer.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ctp_fast

from ctp_fast.compress.pipeline import Recipe, compress
from ctp_fast.data import corpus_split, load_model, token_windows
from ctp_fast.eval import gap_recovered, perplexity
from ctp_fast.fileio import write_json, write_text
from ctp_fast.prompt import TuneConfig, save_prompt, tune
from ctp_fast.prompt.bridge import bridge_prompt, fit_bridge, same_norm_random
from ctp_fast.prompt.tune import init_prompt

log = logging.getLogger("bridge_transfer")
OUT = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--sparsity", default=None)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--windows", type=int, default=4, help="test windows per model")
    ap.add_argument("--seqlen", type=int, default=256, help="test window length")
    ap.add_argument("--n-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--tune-seqlen", type=int, default=128)
    ap.add_argument("--val-windows", type=int, default=4)
    ap.add_argument("--max-anchors", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bridge_transfer", help="the bridge and the source prompt go here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.time()
    sparsity = None if args.sparsity in (None, "none") else (args.sparsity if ":" in args.sparsity else float(args.sparsity))
    recipe = dict(method=args.method, bits=args.bits, group_size=args.group_size, sparsity=sparsity)
    cfg = TuneConfig(n_tokens=args.n_tokens, steps=args.steps, batch_size=args.batch_size,
                     eval_every=max(1, args.steps // 3), seed=0)

    def setup(name):
        dense, tok = load_model(name)
        bos = "gemma" in type(dense).__name__.lower()
        win = lambda split, seqlen, n: token_windows(tok, corpus_split(args.corpus, split, 0), seqlen, n, bos=bos)  # noqa: E731
        data = {"train": win("train", args.tune_seqlen, args.steps * args.batch_size),
                "val": win("val", args.tune_seqlen, args.val_windows), "test": win("test", args.seqlen, args.windows)}
        model = copy.deepcopy(dense)
        compress(model, Recipe(**recipe))
        return dense, model, tok, data

    def loss(model, windows, prompt=None, desc=""):
        return perplexity(model, windows, batch_size=1, prompt=prompt, progress=True, desc=desc).loss

    # source: compress, learn the prompt
    s_dense, s_comp, s_tok, s_data = setup(args.source)
    src = {"dense": loss(s_dense, s_data["test"], desc="source dense"),
           "compressed": loss(s_comp, s_data["test"], desc="source compressed")}
    s_init = init_prompt(s_comp, cfg)
    s_tuned = tune(s_comp, s_data["train"], s_data["val"], cfg, test_windows=s_data["test"])
    src["prompt"] = s_tuned.test_loss

    # target: compress, bridge, evaluate; direct prompt as the upper reference
    t_dense, t_comp, t_tok, t_data = setup(args.target)
    bridge = fit_bridge(s_dense, s_tok, t_dense, t_tok, max_anchors=args.max_anchors, src_name=args.source,
                        dst_name=args.target)
    bridge.save(Path(args.out) / "bridge")
    save_prompt(Path(args.out) / "source_prompt", s_tuned.prompt, s_comp, metadata={"model": args.source, "recipe": recipe})
    bridged = bridge_prompt(s_tuned.prompt, bridge, {"model": args.source, "recipe": recipe})
    prompts = {"bridged prompt": bridged,
               "bridged prompt, rows at target token norm": bridge_prompt(s_tuned.prompt, bridge, norm="target"),
               "random prompt (same norms)": same_norm_random(bridged),
               "bridged untuned init": bridge_prompt(s_init, bridge)}
    tgt = {"dense": loss(t_dense, t_data["test"], desc="target dense"),
           "compressed": loss(t_comp, t_data["test"], desc="target compressed")}
    for name, p in prompts.items():
        tgt[name] = loss(t_comp, t_data["test"], p, desc=name)
    t_direct = tune(t_comp, t_data["train"], t_data["val"], cfg, test_windows=t_data["test"])
    tgt["direct prompt (tuned on target)"] = t_direct.test_loss

    def rows(losses):
        return {k: {"loss": v, "ppl": math.exp(v),
                    "gap_recovered": None if k in ("dense", "compressed") else
                    gap_recovered(losses["compressed"], v, losses["dense"])} for k, v in losses.items()}

    stats = {k: v for k, v in bridge.stats.items() if k != "candidates"}
    result = {"args": vars(args), "recipe": recipe, "seconds": time.time() - started,
              "test_tokens_per_model": {"source": int(s_data["test"].numel() - len(s_data["test"])),
                                        "target": int(t_data["test"].numel() - len(t_data["test"]))},
              "source": rows(src), "target": rows(tgt), "bridge": stats,
              "bridge_candidates": bridge.stats["candidates"],
              "prompt_norms": {"source_tuned_mean_row": float(s_tuned.prompt.embeddings.norm(dim=1).mean()),
                               "bridged_mean_row": float(bridged.embeddings.norm(dim=1).mean()),
                               "direct_mean_row": float(t_direct.prompt.embeddings.norm(dim=1).mean()),
                               "target_token_embedding_mean_row": float(
                                   t_dense.get_input_embeddings()(torch.arange(5000)).norm(dim=1).mean())}}
    write_json(OUT / "bridge_transfer.json", result)
    write_text(OUT / "bridge_transfer.md", markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    a, b = r["args"], r["bridge"]
    lines = [f"# Prompt transfer {a['source']} -> {a['target']} through an embedding bridge", "",
             f"Both models compressed with {r['recipe']}; prompt of {a['n_tokens']} tokens, {a['steps']} steps "
             f"(batch {a['batch_size']} x {a['tune_seqlen']} tokens) on {a['corpus']} train; test: {a['windows']} "
             f"{a['corpus']} test windows of {a['seqlen']} tokens per model (Gemma's start with BOS). "
             f"Run time {r['seconds'] / 60:.1f} min on a shared 2-core CPU.", "",
             f"Bridge: {b['method']} (penalty {b['penalty']}), {b['anchors']} anchor tokens "
             f"({b['heldout_anchors']} held out); held-out R² {b['heldout_r2']:.3f}, cosine {b['heldout_cosine']:.3f} "
             f"(around the target mean {b.get('heldout_cosine_centered', float('nan')):.3f}); "
             f"all anchors R² {b['train_r2']:.3f}, cosine {b['train_cosine']:.3f}.", ""]
    for side in ("source", "target"):
        lines += [f"## {side}: {a[side]}", "", "| | test loss | ppl | gap recovered |", "| --- | --- | --- | --- |"]
        for k, v in r[side].items():
            g = "" if v["gap_recovered"] is None else f"{100 * v['gap_recovered']:.1f}%"
            lines.append(f"| {k} | {v['loss']:.4f} | {v['ppl']:.2f} | {g} |")
        lines.append("")
    lines += ["Candidates (held-out R²): " + ", ".join(f"{c['method']} {c['penalty']:g}: {c['heldout_r2']:.3f}"
                                                     for c in r["bridge_candidates"]), "",
              f"Prompt row norms: {r['prompt_norms']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
