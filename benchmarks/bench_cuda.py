"""GPU benchmarks of the CUDA kernels against torch fp16 matmul, in the same process.

Per-layer time of y = x W^T for the packed int4 formats (dense g128, 2:4, unstructured 50% / 75%) at
LLaMA-7B shapes and M = 1, 4, 16, 128, 512, against torch.nn.functional.linear on the fp16 weight;
and prompt-prefixed attention decode (L = 1, 2048 cached keys) with a 100-token prompt against the
same op without a prompt (and torch SDPA on the own keys for reference). Weights rotate over enough
copies to exceed the L2 cache; times are medians of CUDA-event timings. Prints a table (targets beside)
and writes it, plus JSON, under --out.

    python benchmarks/bench_cuda.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ctp_fast import DenseWeight, Sparse24Weight, UnstructuredWeight, packed_linear
from ctp_fast.compress import nm_mask

TARGETS = {("dense", "small"): 3.0, ("2:4", "small"): 4.0, ("dense", 128): 1.3}


def time_ms(fns, iters=50, repeats=5) -> float:
    """Median over repeats of the mean time per call, cycling through fns (distinct buffers). The calls
    are captured in a CUDA graph and replayed (as a decode loop would run them), so host-side launch
    overhead stays out of both sides; eager timing where capture fails."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    run = lambda: [fns[i % len(fns)]() for i in range(iters)]  # noqa: E731
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print(f"  (no CUDA graph: {type(e).__name__}: {e}; timing eagerly)", flush=True)
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def pack(fmt: str, n: int, k: int):
    w = torch.randn(n, k) * 0.02
    if fmt == "dense":
        return DenseWeight.pack(w, group_size=128), w
    if fmt == "2:4":
        return Sparse24Weight.pack(w, group_size=128, mask=nm_mask(w.abs(), 2, 4)), w
    density = 0.5 if fmt == "unstructured50" else 0.25
    return UnstructuredWeight.pack(w, group_size=128, mask=torch.rand(n, k) < density), w


def bench_gemm(rows, ms, shapes, formats):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for n, k in shapes:
        copies16 = max(2, math.ceil(3 * l2 / (n * k * 2)))
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies16)]
        packs = {}
        for fmt in formats:
            t = time.time()
            pw, _ = pack(fmt, n, k)
            cw = pw.to("cuda")
            copies = max(2, math.ceil(3 * l2 / cw.nbytes))
            packs[fmt] = [cw] + [cw.map(torch.clone) for _ in range(copies - 1)]
            print(f"  packed {fmt} {n}x{k} in {time.time() - t:.1f} s ({cw.bytes_per_weight:.3f} B/weight)", flush=True)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = time_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in w16])
            row = {"N": n, "K": k, "M": m, "fp16_ms": base}
            for fmt in formats:
                t = time_ms([lambda cw=cw: packed_linear(x, cw) for cw in packs[fmt]])
                row[f"{fmt}_ms"], row[f"{fmt}_speedup"] = t, base / t
            rows.append(row)
            print("  " + "  ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()),
                  flush=True)
        del w16, packs
        torch.cuda.empty_cache()


def bench_attention(out):
    B, H, Hkv, S, D = 8, 32, 8, 2048, 128
    op = torch.ops.ctp_fast.prefix_attention
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    scale = 1 / math.sqrt(D)
    res = {}
    for P in (0, 100):
        kp = torch.randn(Hkv, P, D, device="cuda", dtype=torch.float16)
        vp = torch.randn_like(kp)
        res[P] = time_ms([lambda: op(q, k, v, kp, vp, None, True, scale)], iters=100)
    try:
        sdpa = time_ms([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)], iters=100)
    except TypeError:  # older torch: no enable_gqa
        kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        sdpa = time_ms([lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv)], iters=100)
    out.update({"B": B, "H": H, "Hkv": Hkv, "S": S, "D": D, "prompt100_ms": res[100], "no_prompt_ms": res[0],
                "ratio": res[100] / res[0], "torch_sdpa_no_prompt_ms": sdpa})


def table(rows, attn, formats) -> str:
    lines = ["| N x K | M | fp16 ms | " + " | ".join(f"{f} ms (speedup)" for f in formats) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in formats) + " |"]
    for r in rows:
        cells = []
        for f in formats:
            key = ("dense" if f == "dense" else f, "small" if r["M"] <= 16 else r["M"])
            target = TARGETS.get(key)
            mark = "" if target is None else f", target >= {target}x {'ok' if r[f'{f}_speedup'] >= target else 'MISSED'}"
            cells.append(f"{r[f'{f}_ms']:.4f} ({r[f'{f}_speedup']:.2f}x{mark})")
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['fp16_ms']:.4f} | " + " | ".join(cells) + " |")
    if attn:
        ok = "ok" if attn["ratio"] <= 1.1 else "MISSED"
        lines += ["", f"prefix attention decode (B={attn['B']}, H={attn['H']}, Hkv={attn['Hkv']}, S={attn['S']}, "
                      f"D={attn['D']}, fp16): 100-token prompt {attn['prompt100_ms']:.4f} ms, no prompt "
                      f"{attn['no_prompt_ms']:.4f} ms, ratio {attn['ratio']:.3f} (target <= 1.1, {ok}); "
                      f"torch SDPA without prompt {attn['torch_sdpa_no_prompt_ms']:.4f} ms"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer M")
    args = ap.parse_args()
    torch.manual_seed(0)
    formats = ["dense", "2:4", "unstructured50", "unstructured75"]
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    ms = [1, 16, 128] if args.quick else [1, 4, 16, 128, 512]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows, attn = [], {}
    bench_attention(attn)
    print(f"  attention: {attn}", flush=True)
    bench_gemm(rows, ms, shapes, formats)
    text = table(rows, attn, formats)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cuda.md").write_text(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n{text}\n")
    (out / "bench_cuda.json").write_text(json.dumps({"gemm": rows, "attention": attn}, indent=1))


if __name__ == "__main__":
    main()
