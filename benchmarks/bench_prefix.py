"""Prompt-prefixed attention on SmolLM2-135M (int4, group 64): issue 6's two targets.

1. Decode with a 100-token prompt, batch 1 and 8: time per generated token for
   - no prompt (the floor),
   - the shared prompt cache (ours: prompt K/V computed once, attended through prefix_attention),
   - a per-sequence copy of the prompt cache (prompt K/V copied into every sequence's KV cache, sdpa),
   - recomputing the prompt per request (PEFT style: prefill [prompt; text] every request, sdpa);
   and the prefill time of each (the recompute path pays for the prompt there).
   Target: ours <= 1.1x the no-prompt time per token.
2. A training step (forward + backward to the prompt), B=8, P=100, L=256: shared prefix against the
   concatenated path, median step time and peak memory (each path in a fresh process, VmHWM).
   Target: >= 1.15x faster, lower peak memory.

    python benchmarks/bench_prefix.py [--quick]        writes benchmarks/results/bench_prefix.{json,md}
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import checkpoint_for, decode_loop, decode_steps  # noqa: E402  (one model cache and decode loop)

VARIANT = "int4"


def load(cache_dir: Path):
    from ctp_fast.checkpoint import load_compressed
    model = load_compressed(checkpoint_for(VARIANT, cache_dir))
    return model.eval()


def copied_cache(model, prompt_cache, batch: int):
    """A transformers DynamicCache holding a copy of the prompt's K/V for every sequence."""
    from transformers import DynamicCache
    kv = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(prompt_cache.keys, prompt_cache.values)):
        kv.update(k.unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
                  v.unsqueeze(0).expand(batch, -1, -1, -1).contiguous(), layer)
    return kv


def decode_with_cache(model, ids, kv, n_prompt: int, new_tokens: int):
    """Prefill the text after a KV cache that already holds the prompt, then decode (sdpa)."""
    batch, length = ids.shape
    with torch.no_grad():
        mask = torch.ones(batch, n_prompt + length, dtype=torch.long)
        pos = torch.arange(n_prompt, n_prompt + length).expand(batch, -1)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=kv, use_cache=True)
        prefill = time.perf_counter() - t0
        return prefill, decode_steps(model, out, mask, pos, new_tokens)


def decode_recompute(model, prompt, ids, new_tokens: int):
    """PEFT style: [prompt; text] embeddings prefilled per request, then decode (sdpa)."""
    from ctp_fast.prompt.soft_prompt import prompted_inputs
    with torch.no_grad():
        t0 = time.perf_counter()
        inputs = prompted_inputs(model, prompt, ids)
        out = model(**inputs, use_cache=True)
        prefill = time.perf_counter() - t0
        return prefill, decode_steps(model, out, inputs["attention_mask"], inputs["position_ids"], new_tokens)


def decode_rows(args, cache_dir: Path) -> list[dict]:
    from ctp_fast.nn.prefix_attention import build_prompt_cache
    from ctp_fast.prompt.soft_prompt import SoftPrompt
    model = load(cache_dir)
    prompt = SoftPrompt.from_vocab(model, args.prompt_len, seed=0)
    with torch.no_grad():
        pcache = build_prompt_cache(model, prompt)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(100, 10000, (batch, args.text_len), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        methods = {
            "no prompt": lambda: decode_loop(model, ids, mask, args.new_tokens),
            "shared prompt cache (ours)": lambda: decode_loop(model, ids, mask, args.new_tokens, pcache),
            "per-sequence cache copy": lambda: decode_with_cache(model, ids, copied_cache(model, pcache, batch),
                                                                 args.prompt_len, args.new_tokens),
            "recompute prompt per request": lambda: decode_recompute(model, prompt, ids, args.new_tokens),
        }
        results = {name: ([], []) for name in methods}
        for name, fn in methods.items():  # warm-up
            fn()
        for _ in range(args.reps):  # interleaved, so load changes hit every method alike
            for name, fn in methods.items():
                p, s = fn()
                results[name][0].append(p)
                results[name][1].extend(s)
        base = statistics.median(results["no prompt"][1])
        for name, (pre, steps) in results.items():
            step = statistics.median(steps)
            rows.append({"batch": batch, "method": name, "prefill_ms": statistics.median(pre) * 1e3,
                         "ms_per_token": step * 1e3, "vs_no_prompt": step / base})
    return rows


def train_cell(cache_dir: str, shared: bool, batch: int, prompt_len: int, seqlen: int, steps: int) -> dict:
    from ctp_fast.prompt.soft_prompt import SoftPrompt, prompted_forward
    model = load(Path(cache_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = SoftPrompt.from_vocab(model, prompt_len, seed=0)
    ids = torch.randint(100, 10000, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        prompt.embeddings.grad = None
        t0 = time.perf_counter()
        prompted_forward(model, prompt, ids, shared_prefix=shared).loss.backward()
        times.append(time.perf_counter() - t0)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"path": "shared prefix" if shared else "concatenated", "step_s": statistics.median(times[1:]),
            "steps": times[1:], "peak_rss_mib": hwm / 1024}


def train_rows(args, cache_dir: Path) -> list[dict]:
    rows = []
    for shared in (True, False):
        cmd = [sys.executable, __file__, "--train-cell", "1" if shared else "0", "--cache-dir", str(cache_dir),
               "--steps", str(args.steps), "--train-len", str(args.train_len), "--prompt-len", str(args.prompt_len)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"training cell failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--text-len", type=int, default=32, help="text tokens before decoding")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ctp_fast" / "bench_e2e"))
    ap.add_argument("--out", default="benchmarks/results/bench_prefix")
    ap.add_argument("--train-cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_cell is not None:
        print(json.dumps(train_cell(args.cache_dir, args.train_cell == "1", 8, args.prompt_len, args.train_len,
                                    args.steps)))
        return 0
    if args.quick:
        args.new_tokens, args.reps, args.steps, args.train_len = 8, 2, 1, 64
    from ctp_fast.fileio import write_json, write_text
    cache_dir = Path(args.cache_dir)
    checkpoint_for(VARIANT, cache_dir)
    decode = decode_rows(args, cache_dir)
    lines = [f"## Decode, SmolLM2-135M {VARIANT}, {args.prompt_len}-token prompt, {args.text_len} text tokens, "
             f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads", "",
             "| batch | method | prefill ms | ms / token | vs no prompt |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['method']} | {r['prefill_ms']:.1f} | {r['ms_per_token']:.2f} | "
              f"{r['vs_no_prompt']:.3f}x |" for r in decode]
    train = [] if args.skip_train else train_rows(args, cache_dir)
    if train:
        shared, concat = train
        lines += ["", f"## Training step (forward + backward), B=8, P={args.prompt_len}, L={args.train_len}, "
                      f"median of {args.steps}", "", "| path | step s | peak RSS MiB |", "| --- | ---: | ---: |"]
        lines += [f"| {r['path']} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} |" for r in train]
        lines += ["", f"speed-up {concat['step_s'] / shared['step_s']:.2f}x (target >= 1.15x); peak memory "
                      f"{shared['peak_rss_mib']:.0f} vs {concat['peak_rss_mib']:.0f} MiB"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), {"decode": decode, "train": train, "args": vars(args)})
    write_text(out.with_suffix(".md"), f"# Prompt-prefixed attention\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
