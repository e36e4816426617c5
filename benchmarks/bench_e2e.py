"""End to end on the shipped model (SmolLM2-135M): prefill and decode speed and peak memory, with and
without a 100-token soft prompt, for dense fp32, dense bf16, int4, int4 + 2:4 and int4 + 50%.

Each cell runs in a fresh process (its peak resident memory, VmHWM, is the cell's own). Compressed
models are made once (round to nearest, group 64, magnitude pruning: quality is not the point here)
and loaded packed from a checkpoint, so no dense copy of their weights ever exists in the cell. With a
prompt, the prompt's keys and values are computed once (`build_prompt_cache`) and shared by every
sequence through prompt-prefixed attention.

    python benchmarks/bench_e2e.py [--quick] [--batch 4] [--prompt-len 100]     (also: ctp bench e2e)

Writes benchmarks/results/bench_e2e.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (dtype, swap_linears kwargs or None for dense)
    "dense fp32": (torch.float32, None),
    "dense bf16": (torch.bfloat16, None),
    "int4": (torch.float32, dict(bits=4, group_size=64)),
    "int4 + 2:4": (torch.float32, dict(bits=4, group_size=64, sparsity="2:4")),
    "int4 + 50%": (torch.float32, dict(bits=4, group_size=64, sparsity=0.5)),
}
MODEL = "smollm2-135m"


def checkpoint_for(variant: str, root: Path) -> Path | None:
    """The packed checkpoint of a compressed variant (made once, kept under root)."""
    kwargs = VARIANTS[variant][1]
    if kwargs is None:
        return None
    path = root / variant.replace(" ", "").replace("+", "_").replace(":", "").replace("%", "pct")
    if not (path / "config.json").exists():
        import ctp_fast
        from ctp_fast.checkpoint import save_compressed
        from ctp_fast.data.assets import load_model
        model, tok = load_model(MODEL)
        ctp_fast.swap_linears(model, **kwargs)
        save_compressed(model, path, tok)
    return path


def decode_steps(model, out, mask, pos, new_tokens: int) -> list[float]:
    """Greedy single-token steps after a prefill `out` (its KV cache, the mask and positions so far);
    returns the seconds of each step."""
    steps = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        t0 = time.perf_counter()
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
        steps.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return steps


def decode_loop(model, ids, mask, new_tokens: int, cache=None):
    """Greedy prefill + `new_tokens` single-token steps with a KV cache; returns (prefill s, [step s])."""
    from contextlib import nullcontext

    from ctp_fast.nn.prefix_attention import attend
    ctx = attend(model, cache) if cache is not None else nullcontext()
    with torch.no_grad(), ctx:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        prefill = time.perf_counter() - t0
        return prefill, decode_steps(model, out, mask, pos, new_tokens)


def cell(variant: str, checkpoint: str | None, prompt_len: int, batch: int, seqlen: int, new_tokens: int,
         reps: int) -> dict:
    """One measurement in this process: load, (build the prompt cache), prefill + decode `reps` times."""
    from ctp_fast.checkpoint import load_compressed
    from ctp_fast.data.assets import load_model
    from ctp_fast.nn.prefix_attention import build_prompt_cache
    from ctp_fast.prompt.soft_prompt import SoftPrompt

    dtype = VARIANTS[variant][0]
    model = load_compressed(checkpoint) if checkpoint else load_model(MODEL, dtype=dtype)[0]
    model.eval()
    ids = torch.randint(100, 10000, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cache, cache_s = None, 0.0
    if prompt_len:
        prompt = SoftPrompt.from_vocab(model, prompt_len, seed=0)
        with torch.no_grad():
            t0 = time.perf_counter()
            cache = build_prompt_cache(model, prompt)
            cache_s = time.perf_counter() - t0
    decode_loop(model, ids[:, :8], mask[:, :8], 2, cache)  # warm-up
    prefills, steps = [], []
    for _ in range(reps):
        p, s = decode_loop(model, ids, mask, new_tokens, cache)
        prefills.append(p)
        steps.extend(s)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    prefill = statistics.median(prefills)
    step = statistics.median(steps)
    return {"variant": variant, "prompt_len": prompt_len, "batch": batch, "seqlen": seqlen,
            "prefill_ms": prefill * 1e3, "prefill_tok_s": batch * seqlen / prefill,
            "decode_ms_per_step": step * 1e3, "decode_tok_s": batch / step, "prompt_cache_ms": cache_s * 1e3,
            "peak_rss_mib": hwm / 1024, "threads": torch.get_num_threads()}


def run_cell(args, variant: str, checkpoint: Path | None, prompt_len: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", variant, "--checkpoint", str(checkpoint or ""),
           "--prompt-len", str(prompt_len), "--batch", str(args.batch), "--seqlen", str(args.seqlen),
           "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cell {variant} (prompt {prompt_len}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | prompt | prefill tok/s | decode tok/s | decode ms/step | prompt cache ms | peak RSS MiB |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['prompt_len']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['prompt_cache_ms']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ctp_fast.fileio import atomic_path
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(12, 3.8))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
                                      ("peak_rss_mib", "peak RSS (MiB)"))):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, with_prompt in enumerate((False, True)):
            vals = [next((r[key] for r in rows if r["variant"] == v and bool(r["prompt_len"]) == with_prompt), 0)
                    for v in variants]
            ax.bar([x + 0.4 * j for x in range(len(variants))], vals, width=0.4,
                   label="with prompt (shared cache)" if with_prompt else "no prompt")
        ax.set_xticks([x + 0.2 for x in range(len(variants))], variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128, help="prompt-free text tokens per sequence in the prefill")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ctp_fast" / "bench_e2e"))
    ap.add_argument("--out", default="benchmarks/results/bench_e2e")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(cell(args.cell, args.checkpoint or None, args.prompt_len, args.batch, args.seqlen,
                              args.new_tokens, args.reps)))
        return 0
    if args.quick:
        args.seqlen, args.new_tokens, args.reps = 64, 8, 2
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    from tqdm.auto import tqdm

    from ctp_fast.fileio import write_json, write_text
    rows = []
    cells = [(v, p) for v in variants for p in (0, args.prompt_len)]
    for variant, prompt_len in tqdm(cells, desc="e2e cells"):
        rows.append(run_cell(args, variant, checkpoint_for(variant, Path(args.cache_dir)), prompt_len))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), {"rows": rows, "args": vars(args)})
    write_text(out.with_suffix(".md"), f"# End to end, {MODEL}, batch {args.batch}, {args.seqlen} text tokens, "
                                       f"{args.new_tokens} decode steps\n\n{text}\n")
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
