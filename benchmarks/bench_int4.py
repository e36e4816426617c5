#!/usr/bin/env python
"""CPU benchmark of the packed int4 kernels against torch baselines, with cold (out-of-cache) weights.

For each weight shape (N, K) and batch size M it times, in one process with torch's thread count:

  forward        ours  int4_linear(x, w)                    x fp32 [M, K]
                 fp32  x @ W.T                               W fp32 [N, K]
                 bf16  x.bfloat16() @ Wb.T                   Wb bf16 [N, K]
                 ti4   torch's int4 CPU kernel  _weight_int4pack_mm_for_cpu(x.bfloat16(), ...)
  grad_input     ours  int4_linear_grad_input(gy, w)        gy fp32 [M, N]
                 fp32  gy @ W
                 bf16  gy.bfloat16() @ Wb                    (the layout autograd uses for a linear)
                 bf16T gy.bfloat16() @ WbT.T, WbT = Wb.T.contiguous() [K, N] (an extra copy)

On an AVX2 CPU without native bf16, torch's `gy_bf16 @ Wb` (contiguous [N, K] right operand) takes
a slow path, ~50-100x slower than the NT GEMM that `x @ Wb.T` uses; bf16T is the same product through
that fast path, i.e. the best bf16 grad_input torch offers here.

All methods compute with the same weight: W is our RTN weight dequantized (w.unpack()), and torch's
int4 kernel gets our codes with our (fp16) scales rounded to bf16 and zero point 0 (torch computes
(q - 8) * scale + zero). Conversions of x / gy to bf16 are inside the timed call.

Cold weights: every method cycles over enough distinct copies of its weight ("layers") that their
total bytes exceed 4x the last-level cache, so each call streams its weight from DRAM. Layer counts
are capped (--max-layers, --mem-cap-mib per method); fp32/bf16 need fewer copies than int4.

Timing: a warm-up pass, then samples taken round-robin over the methods of a cell (so drift on a
shared machine hits them alike). A sample is one call, or for fast calls a run of consecutive calls
(on consecutive layers) lasting ~20 ms, divided by the call count. Each method stops after --reps
samples, or once it has >= 3 samples and has spent --budget seconds. Medians are reported.
Very slow calls are limited: a method whose single (warm-up) call takes over --max-call-s keeps that
one call as its only sample (marked *), and one predicted (linearly in M from the previous M of the
same shape) to take over --skip-call-s is not run at all; the prediction is reported instead (~).

Bandwidth: the machine's read bandwidth is measured in this process (a >= 1 GiB fp32 tensor read by
sum / amax / dot, median of several each; the best is the reference). Our effective bandwidth is
packed weight bytes (w.nbytes, scales included) / time. GB = 1e9 bytes.

    python benchmarks/bench_int4.py --quick
    python benchmarks/bench_int4.py [--shapes 4096x4096 11008x4096] [--ms 1,8,64,512] [--reps N]
                                    [--budget S] [--json out.json] [--png out.png]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from ctp_fast import Int4Weight, get_isa, int4_linear, int4_linear_grad_input, set_isa, supported_isas

GROUP_SIZE = 128
DEFAULT_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DEFAULT_MS = [1, 8, 64, 512]
FWD_METHODS = ("ours", "fp32", "bf16", "ti4")
GRAD_METHODS = ("ours", "fp32", "bf16", "bf16T")
BASELINES = ("fp32", "bf16", "ti4", "bf16T")
BASELINE_LABEL = {"fp32": "fp32 matmul", "bf16": "bf16 matmul", "ti4": "torch int4",
                  "bf16T": "bf16 matmul, [K,N] weight copy"}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SAMPLE_TARGET_S = 0.02      # fast calls are grouped into samples of about this length
MIN_REPS = 3

# targets (reported, never asserted)
T_M1_VS_TI4 = 1.5
T_M1_BW_FRAC = 0.70
T_M512_VS_BF16 = 0.9
T_GRAD_OVER_FWD = 1.3


# ---------------------------------------------------------------------------------------------- machine
def llc_bytes() -> tuple[int, str]:
    path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    try:
        s = open(path).read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult, path
    except (OSError, ValueError):
        return 32 << 20, "default (could not read " + path + ")"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes over an interval: the busy time in
    /proc/stat minus this process's own CPU time, over wall time x logical cpus. None if unreadable."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = None
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def frac(self) -> float | None:
        t1, busy1, own1 = self._read()
        if busy1 is None or self.busy0 is None or t1 <= self.t0:
            return None
        other = (busy1 - self.busy0) - (own1 - self.own0)
        return min(1.0, max(0.0, other / ((t1 - self.t0) * (os.cpu_count() or 1))))


def measure_bandwidth(gib: float, reps: int) -> dict:
    """Read bandwidth (GB/s) of a large fp32 tensor, by a few simple read-only reductions."""
    n = int(gib * (1 << 30)) // 4
    n -= n % 2
    t = torch.empty(n, dtype=torch.float32)
    t.fill_(1.0)  # first touch
    a, b = t[: n // 2], t[n // 2:]
    nbytes = n * 4
    methods = {
        "sum_fp32": lambda: t.sum(),
        "amax_fp32": lambda: t.amax(),
        "dot_fp32": lambda: torch.dot(a, b),
    }
    out = {"bytes": nbytes, "reps": reps, "methods": {}}
    for name, fn in methods.items():
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out["methods"][name] = {"median_s": med, "gbps": nbytes / med / 1e9,
                                "best_gbps": nbytes / min(times) / 1e9}
    del t, a, b
    best = max(out["methods"], key=lambda k: out["methods"][k]["gbps"])
    out["best_method"] = best
    out["gbps"] = out["methods"][best]["gbps"]
    return out


# ---------------------------------------------------------------------------------------------- weights
def ti4_inputs(weight: torch.Tensor, scale_dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's int4 CPU operands for symmetric RTN of `weight` (group 128, scale = 2 max|w| / 15, zero 8, the
    scale rounded to scale_dtype like ours, then to bf16): the packed weight, scales_and_zeros [K/g, N, 2]
    (torch computes (q - 8) * scale + zero, so zero = 0) and the dense weight (q - 8) * scale it means."""
    n, k = weight.shape
    if k % GROUP_SIZE:
        raise SystemExit(f"K={k}: torch's int4 kernel needs K divisible by the group size {GROUP_SIZE}")
    wg = weight.float().view(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = 2 * wg.abs().amax(-1) / 15
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(wg / scale[..., None]) + 8, 0, 15)
    s = scale.to(scale_dtype).float()
    dense = ((q - 8) * s[..., None]).view(n, k)
    wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32).contiguous(), 1)
    sz = torch.stack([s.t(), torch.zeros(k // GROUP_SIZE, n)], -1).to(torch.bfloat16).contiguous()
    return wp, sz, dense


def plan_layers(bytes_per_layer: int, target: int, max_layers: int, mem_cap: int) -> int:
    n = target // bytes_per_layer + 1                                    # strictly more than target
    return max(1, min(n, max_layers, mem_cap // bytes_per_layer))


def build_shape(n: int, k: int, target: int, max_layers: int, mem_cap: int, seed: int = 0) -> dict:
    """Weights of every method for one shape, as lists of distinct copies (the layers)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.02
    w0 = Int4Weight.pack(weight, group_size=GROUP_SIZE, symmetric=True, scale_dtype=torch.float16)
    wp0, sz0, ti4_dense = ti4_inputs(weight)
    del weight
    wf0 = w0.unpack(torch.float32).contiguous()
    # same weight? (torch int4 then rounds the fp16 scales to bf16)
    ti4_vs_ours = float((ti4_dense - wf0).abs().max())
    del ti4_dense
    wb0 = wf0.to(torch.bfloat16)
    per_layer = {"ours": w0.nbytes, "fp32": wf0.nbytes, "bf16": wb0.nbytes, "ti4": wp0.nbytes + sz0.nbytes}
    counts = {m: plan_layers(b, target, max_layers, mem_cap) for m, b in per_layer.items()}

    def copies(first, count, clone):
        return [first] + [clone(first) for _ in range(count - 1)]

    counts["bf16T"] = counts["bf16"]
    per_layer["bf16T"] = per_layer["bf16"]
    layers = {
        "ours": copies(w0, counts["ours"], copy.deepcopy),
        "fp32": copies(wf0, counts["fp32"], torch.clone),
        "bf16": copies(wb0, counts["bf16"], torch.clone),
        "bf16T": copies(wb0.t().contiguous(), counts["bf16"], torch.clone),
        "ti4": copies((wp0, sz0), counts["ti4"], lambda p: (p[0].clone(), p[1].clone())),
    }
    info = {m: {"layers": counts[m], "bytes_per_layer": per_layer[m], "total_bytes": counts[m] * per_layer[m],
                "exceeds_target": counts[m] * per_layer[m] > target} for m in per_layer}
    return {"layers": layers, "info": info, "ti4_weight_max_abs_diff": ti4_vs_ours}


def sanity_check(ws: dict, n: int, k: int) -> dict:
    """Max |error| / max |ref| of each method against fp64 with the dequantized weight (M=4)."""
    lay = ws["layers"]
    x = torch.randn(4, k)
    gy = torch.randn(4, n)
    wd = lay["fp32"][0].double()
    ref_y, ref_g = x.double() @ wd.T, gy.double() @ wd
    fwd, grad = fwd_fns(x, lay), grad_fns(gy, lay)

    def rel(out, ref):
        return float((out.double() - ref).abs().max() / ref.abs().max())

    return {"fwd": {m: rel(f(0), ref_y) for m, f in fwd.items()},
            "grad_input": {m: rel(f(0), ref_g) for m, f in grad.items()}}


# ---------------------------------------------------------------------------------------------- ops
def fwd_fns(x: torch.Tensor, lay: dict) -> dict:
    ours, wf, wb, ti4 = lay["ours"], lay["fp32"], lay["bf16"], lay["ti4"]
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    return {
        "ours": lambda i: int4_linear(x, ours[i % len(ours)]),
        "fp32": lambda i: x @ wf[i % len(wf)].T,
        "bf16": lambda i: x.bfloat16() @ wb[i % len(wb)].T,
        "ti4": lambda i: mm4(x.bfloat16(), ti4[i % len(ti4)][0], GROUP_SIZE, ti4[i % len(ti4)][1]),
    }


def grad_fns(gy: torch.Tensor, lay: dict) -> dict:
    ours, wf, wb, wbt = lay["ours"], lay["fp32"], lay["bf16"], lay["bf16T"]
    return {
        "ours": lambda i: int4_linear_grad_input(gy, ours[i % len(ours)]),
        "fp32": lambda i: gy @ wf[i % len(wf)],
        "bf16": lambda i: gy.bfloat16() @ wb[i % len(wb)],
        "bf16T": lambda i: gy.bfloat16() @ wbt[i % len(wbt)].T,
    }


# ---------------------------------------------------------------------------------------------- timing
class _Runner:
    def __init__(self, name: str, fn, nlayers: int):
        self.name, self.fn, self.nlayers = name, fn, nlayers
        self.i = 0
        self.samples: list[float] = []
        self.spent = 0.0
        self.calls_per_sample = 1

    def run(self, calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            self.fn(self.i)
            self.i += 1
        return time.perf_counter() - t0


def time_cell(fns: dict, nlayers: dict, reps: int, budget: float, max_call_s: float = math.inf,
              skip: dict | None = None) -> dict:
    """Median seconds per call of each fn, sampled round-robin (see the module docstring).

    skip: {method: predicted seconds} for methods not to run (reported as that prediction)."""
    skip = skip or {}
    out = {m: {"median_s": t, "min_s": None, "reps": 0, "calls_per_sample": 0, "layers": nlayers[m],
               "samples_s": [], "flag": "estimated"} for m, t in skip.items()}
    runners = [_Runner(m, f, nlayers[m]) for m, f in fns.items() if m not in skip]
    capped = []
    for r in runners:  # warm-up: a pass over the layers, cut short after budget/2 (at least one call)
        calls, spent = 0, 0.0
        while calls < 1 or (calls < r.nlayers and spent < budget / 2):
            dt = r.run(1)
            spent += dt
            calls += 1
            if dt > max_call_s:  # too slow to repeat: this call is the only sample
                r.samples, r.spent = [dt], dt
                capped.append(r)
                break
        est = spent / calls
        r.calls_per_sample = max(1, min(r.nlayers, math.ceil(SAMPLE_TARGET_S / max(est, 1e-9))))
    active = [r for r in runners if r not in capped]
    while active:
        for r in list(active):
            dt = r.run(r.calls_per_sample)
            r.samples.append(dt / r.calls_per_sample)
            r.spent += dt
            if len(r.samples) >= reps or (len(r.samples) >= MIN_REPS and r.spent >= budget):
                active.remove(r)
    for r in runners:
        out[r.name] = {"median_s": statistics.median(r.samples), "min_s": min(r.samples),
                       "reps": len(r.samples), "calls_per_sample": r.calls_per_sample,
                       "layers": r.nlayers, "samples_s": r.samples, "flag": "single" if r in capped else None}
    return {m: out[m] for m in fns}


# ---------------------------------------------------------------------------------------------- report
def _f(v, fmt, width):
    return (fmt.format(v) if v is not None else "-").rjust(width)


def derived(rows: list, bw_gbps: float) -> None:
    """Add speedups (baseline time / ours), GB/s, %BW and grad/fwd to each row in place."""
    fwd_ours = {(tuple(r["shape"]), r["M"]): r["times"]["ours"]["median_s"] for r in rows if r["op"] == "fwd"}
    for r in rows:
        t = {m: v["median_s"] for m, v in r["times"].items()}
        r["speedup"] = {m: t[m] / t["ours"] for m in t if m != "ours"}
        r["ours_gbps"] = r["weight_bytes"] / t["ours"] / 1e9
        r["ours_bw_frac"] = r["ours_gbps"] / bw_gbps
        key = (tuple(r["shape"]), r["M"])
        r["grad_over_fwd"] = t["ours"] / fwd_ours[key] if r["op"] == "grad_input" and key in fwd_ours else None


def _ms(v: dict | None, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    ms = v["median_s"] * 1e3
    txt = f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"
    return {"estimated": "~" + txt, "single": txt + "*"}.get(v.get("flag"), txt).rjust(width)


def _x(r: dict, m: str, width: int) -> str:
    if m not in r["speedup"]:
        return "-".rjust(width)
    mark = {"estimated": "~", "single": "*"}.get(r["times"][m].get("flag"), "")
    return (("~" if mark == "~" else "") + f"{r['speedup'][m]:.2f}x" + ("*" if mark == "*" else "")).rjust(width)


def print_table(rows: list) -> None:
    hdr = (f"{'shape NxK':>11} {'M':>4} {'op':>4} {'ours ms':>9} {'fp32 ms':>9} {'bf16 ms':>9} {'ti4 ms':>9} "
           f"{'bf16T ms':>9} {'x fp32':>7} {'x bf16':>8} {'x ti4':>7} {'x bf16T':>7} {'GB/s':>5} {'%BW':>4} "
           f"{'grad/fwd':>8} {'other':>5}")
    print(hdr)
    print("-" * len(hdr))
    prev = None
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if prev is not None and shape != prev:
            print()
        prev = shape
        t = r["times"]
        m1 = r["M"] == 1
        print(f"{shape:>11} {r['M']:>4} {'fwd' if r['op'] == 'fwd' else 'grad':>4} {_ms(t['ours'], 9)} "
              f"{_ms(t.get('fp32'), 9)} {_ms(t.get('bf16'), 9)} {_ms(t.get('ti4'), 9)} {_ms(t.get('bf16T'), 9)} "
              f"{_x(r, 'fp32', 7)} {_x(r, 'bf16', 8)} {_x(r, 'ti4', 7)} {_x(r, 'bf16T', 7)} "
              f"{_f(r['ours_gbps'] if m1 else None, '{:.1f}', 5)} "
              f"{_f(100 * r['ours_bw_frac'] if m1 else None, '{:.0f}%', 4)} "
              f"{_f(r['grad_over_fwd'], '{:.2f}', 8)} {_f(None if r.get('other_cpu_frac') is None else 100 * r['other_cpu_frac'], '{:.0f}%', 5)}")
    print("x <base> = speedup of ours over that baseline (base ms / ours ms; > 1 = ours faster). GB/s = packed\n"
          "weight bytes / ours time (M=1), %BW = of the measured read bandwidth. ti4 = torch int4 (fwd only);\n"
          "grad: bf16 = gy.bf16() @ Wb (autograd's layout), bf16T = same product via a [K,N] weight copy.\n"
          "* = a single call (slower than --max-call-s); ~ = not run, predicted linearly in M (> --skip-call-s).\n"
          "other = CPU share used by other processes while the row was measured (contention: multi-threaded\n"
          "calls then wait on descheduled threads; rows with a high share are unreliable).")


def targets(rows: list, shapes: list, bw: dict, max_other: float) -> list:
    out = []
    by = {(tuple(r["shape"]), r["M"], r["op"]): r for r in rows}

    def add(shape, name, ok, figure, *used):
        others = [r["other_cpu_frac"] for r in used if r and r.get("other_cpu_frac") is not None]
        if others and max(others) > max_other:
            figure += f"  [contended: other processes {100 * max(others):.0f}% CPU]"
        out.append({"shape": list(shape), "target": name, "status": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                    "figure": figure})

    for shape in shapes:
        r1, r512, g512 = by.get((shape, 1, "fwd")), by.get((shape, 512, "fwd")), by.get((shape, 512, "grad_input"))
        if r1:
            s = r1["speedup"]["ti4"]
            add(shape, f"M=1 fwd >= {T_M1_VS_TI4}x torch int4", s >= T_M1_VS_TI4,
                f"{s:.2f}x ({r1['times']['ours']['median_s'] * 1e3:.3f} ms vs {r1['times']['ti4']['median_s'] * 1e3:.3f} ms)", r1)
            f = r1["ours_bw_frac"]
            add(shape, f"M=1 fwd >= {T_M1_BW_FRAC:.0%} of measured bandwidth", f >= T_M1_BW_FRAC,
                f"{100 * f:.0f}% ({r1['ours_gbps']:.1f} of {bw['gbps']:.1f} GB/s)", r1)
        else:
            add(shape, "M=1 targets", None, "M=1 not measured")
        if r512:
            s = r512["speedup"]["bf16"]
            add(shape, f"M=512 fwd >= {T_M512_VS_BF16}x bf16 matmul speed", s >= T_M512_VS_BF16,
                f"{s:.2f}x ({r512['times']['ours']['median_s'] * 1e3:.1f} ms vs bf16 "
                f"{r512['times']['bf16']['median_s'] * 1e3:.1f} ms)", r512)
        else:
            add(shape, "M=512 fwd vs bf16", None, "M=512 not measured")
        if g512 and g512["grad_over_fwd"] is not None:
            q = g512["grad_over_fwd"]
            add(shape, f"M=512 grad_input <= {T_GRAD_OVER_FWD}x forward time", q <= T_GRAD_OVER_FWD,
                f"{q:.2f}x ({g512['times']['ours']['median_s'] * 1e3:.1f} ms vs fwd "
                f"{r512['times']['ours']['median_s'] * 1e3:.1f} ms)", g512, r512)
        else:
            add(shape, "M=512 grad/fwd", None, "M=512 not measured")
    return out


def print_targets(tg: list) -> None:
    print("\ntargets (reported, not asserted)")
    for t in tg:
        shape = f"{t['shape'][0]}x{t['shape'][1]}"
        print(f"  {t['status']:<4}  {shape:>10}  {t['target']:<42} {t['figure']}")
    npass = sum(t["status"] == "PASS" for t in tg)
    nmiss = sum(t["status"] == "MISS" for t in tg)
    print(f"  {npass} PASS, {nmiss} MISS")


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in ("fwd", "grad_input") if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 1.1 * len(rows) / len(ops) + 3), 4.2 * len(ops)),
                             squeeze=False)
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "ti4": "tab:green", "bf16T": "tab:red"}
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op]
        bases = [b for b in BASELINES if b in sel[0]["speedup"]]
        width = 0.8 / len(bases)
        for j, b in enumerate(bases):
            xs = [i + (j - (len(bases) - 1) / 2) * width for i in range(len(sel))]
            vals = [r["speedup"][b] for r in sel]
            bars = ax.bar(xs, vals, width, label=f"vs {BASELINE_LABEL[b]}", color=colors[b])
            for bar, r in zip(bars, sel):
                if r["times"][b].get("flag") == "estimated":
                    bar.set_hatch("//")
                    bar.set_alpha(0.5)
            for bar, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        vals = [v for r in sel for v in r["speedup"].values()]
        ax.set_ylim(min(min(vals), 1.0) / 1.5, max(max(vals), 1.0) * 2.0)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([f"{r['shape'][0]}x{r['shape'][1]}\nM={r['M']}" for r in sel], fontsize=7)
        ax.set_ylabel("speedup of ours (x)")
        ax.set_title(f"{op}: baseline time / ours time (hatched: predicted, not run)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_shapes(items: list[str]) -> list[tuple[int, int]]:
    out = []
    for item in items:
        for s in item.split(","):
            if s.strip():
                n, k = s.lower().split("x")
                out.append((int(n), int(k)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape (4096x4096), few reps: ~1-2 min")
    p.add_argument("--shapes", nargs="+", help="NxK shapes, e.g. 4096x4096 11008x4096 (or comma separated)")
    p.add_argument("--ms", default=None, help="comma-separated batch sizes M (default 1,8,64,512)")
    p.add_argument("--reps", type=int, default=None, help="max samples per method and cell (default 25; quick 8)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per method and cell after which sampling stops once >= 3 samples (default 3; quick 0.6)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="a call slower than this is run once, not repeated (default 5; quick 2)")
    p.add_argument("--skip-call-s", type=float, default=None,
                   help="a call predicted slower than this is not run; the prediction is reported (default 15; quick 5)")
    p.add_argument("--max-other", type=float, default=0.15,
                   help="re-measure a cell when other processes used more than this share of the CPUs (default 0.15)")
    p.add_argument("--retries", type=int, default=None, help="re-measurements of a contended cell (default 2; quick 1)")
    p.add_argument("--retry-max-s", type=float, default=20.0, help="only cells measured faster than this are re-measured")
    p.add_argument("--retry-total-s", type=float, default=None,
                   help="cap on the time spent re-measuring, whole run (default 180; quick 30)")
    p.add_argument("--retry-wait-s", type=float, default=2.0, help="pause before re-measuring a contended cell")
    p.add_argument("--ops", default="fwd,grad_input", help="comma-separated: fwd, grad_input")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--isa", default=None, help=f"force our ISA (supported: {supported_isas()})")
    p.add_argument("--cache-mult", type=float, default=4.0, help="layers per method: total bytes > this x LLC")
    p.add_argument("--max-layers", type=int, default=64, help="cap on layers (weight copies) per method")
    p.add_argument("--mem-cap-mib", type=int, default=1024, help="cap on the weight bytes of one method (MiB)")
    p.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth-test tensor (GiB)")
    p.add_argument("--json", default=None, help="JSON output (default benchmarks/results/bench_int4_<mode>.json)")
    p.add_argument("--png", default=None, help="PNG chart (default benchmarks/results/bench_int4_<mode>.png)")
    p.add_argument("--no-save", action="store_true", help="write neither JSON nor PNG")
    args = p.parse_args(argv)

    mode = "quick" if args.quick else "full"
    shapes = parse_shapes(args.shapes) if args.shapes else ([(4096, 4096)] if args.quick else DEFAULT_SHAPES)
    if args.retries is None:
        args.retries = 1 if args.quick else 2
    retry_total_s = args.retry_total_s if args.retry_total_s is not None else (30.0 if args.quick else 180.0)
    ms = sorted(int(m) for m in args.ms.split(",")) if args.ms else DEFAULT_MS
    max_call_s = args.max_call_s if args.max_call_s is not None else (2.0 if args.quick else 5.0)
    skip_call_s = args.skip_call_s if args.skip_call_s is not None else (5.0 if args.quick else 15.0)
    reps = args.reps or (8 if args.quick else 25)
    budget = args.budget if args.budget is not None else (0.6 if args.quick else 3.0)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    json_path = args.json or os.path.join(RESULTS_DIR, f"bench_int4_{mode}.json")
    png_path = args.png or os.path.join(RESULTS_DIR, f"bench_int4_{mode}.png")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        set_isa(args.isa)

    t_start = time.perf_counter()
    run_load = OtherLoad()
    load_start = os.getloadavg()
    llc, llc_src = llc_bytes()
    target = int(args.cache_mult * llc)
    mem_cap = args.mem_cap_mib << 20
    print(f"ctp_fast int4 benchmark ({mode})")
    print(f"  torch {torch.__version__}, threads {torch.get_num_threads()}, ctp_fast ISA in use '{get_isa()}' "
          f"(supported {supported_isas()})")
    print(f"  cpu {cpu_model()}, {os.cpu_count()} logical cpus, load avg {load_start[0]:.2f}")
    print(f"  LLC {llc / 2**20:.0f} MiB ({llc_src}); weights per method cycled over layers with total > "
          f"{args.cache_mult:g}x LLC = {target / 2**20:.0f} MiB (caps: {args.max_layers} layers, "
          f"{args.mem_cap_mib} MiB per method)")
    print(f"  group_size {GROUP_SIZE}, symmetric, fp16 scales; x/gy fp32; reps <= {reps}, budget {budget:g} s "
          f"per method and cell, >= {MIN_REPS} reps, medians; calls > {max_call_s:g} s run once, "
          f"predicted > {skip_call_s:g} s not run")

    bw_reps = 3 if args.quick else 7

    def bandwidth(when):
        load = OtherLoad()
        b = measure_bandwidth(args.bw_gib, reps=bw_reps)
        b["other_cpu_frac"], b["when"] = load.frac(), when
        print(f"  read bandwidth at {when} ({args.bw_gib:g} GiB fp32, {torch.get_num_threads()} threads): " +
              ", ".join(f"{k} {v['gbps']:.1f}" for k, v in b["methods"].items()) + " GB/s" +
              ("" if b["other_cpu_frac"] is None else f" [other processes {100 * b['other_cpu_frac']:.0f}% CPU]"),
              flush=True)
        return b

    bw_runs = [bandwidth("start")]

    rows, layer_info, sanity = [], {}, {}
    retry_spent = 0.0  # seconds spent on re-measurements, capped by --retry-total-s
    for (n, k) in shapes:
        t0 = time.perf_counter()
        ws = build_shape(n, k, target, args.max_layers, mem_cap)
        key = f"{n}x{k}"
        layer_info[key] = ws["info"]
        sanity[key] = sanity_check(ws, n, k)
        print(f"\n[{key}] built in {time.perf_counter() - t0:.1f} s; layers: " + ", ".join(
            f"{m} {i['layers']} x {i['bytes_per_layer'] / 2**20:.1f} MiB = {i['total_bytes'] / 2**20:.0f} MiB"
            + ("" if i["exceeds_target"] else " (capped, below target!)") for m, i in ws["info"].items()))
        print(f"[{key}] max rel. error vs fp64 (same weight): " + "; ".join(
            f"{op}: " + ", ".join(f"{m} {e:.1e}" for m, e in errs.items()) for op, errs in sanity[key].items())
            + f"; torch-int4 codes/scales vs ours (before bf16 scales): max |diff| {ws['ti4_weight_max_abs_diff']:.1e}")
        sanity[key]["ti4_weight_max_abs_diff_before_bf16_scales"] = ws["ti4_weight_max_abs_diff"]
        nl = {m: i["layers"] for m, i in ws["info"].items()}
        last = {}  # (op, method) -> (M, seconds) of the last measured cell, for predicting slow calls
        for m in ms:
            for op in ops:
                tc = time.perf_counter()
                if op == "fwd":
                    fns = fwd_fns(torch.randn(m, k), ws["layers"])
                elif op == "grad_input":
                    fns = grad_fns(torch.randn(m, n), ws["layers"])
                else:
                    raise SystemExit(f"unknown op {op!r}")
                skip = {}
                for meth in fns:
                    if (op, meth) in last:
                        m0, t0_ = last[(op, meth)]
                        if t0_ * m / m0 > skip_call_s:
                            skip[meth] = t0_ * m / m0
                best, attempt = None, 0
                while True:  # re-measure a contended cell (if it is cheap) and keep the least contended try
                    ta, load = time.perf_counter(), OtherLoad()
                    times = time_cell(fns, nl, reps, budget, max_call_s, skip)
                    other = load.frac()
                    if best is None or (other is not None and other < best[1]):
                        best = (times, other)
                    attempt += 1
                    if (other is None or other <= args.max_other or attempt > args.retries
                            or time.perf_counter() - ta > args.retry_max_s or retry_spent >= retry_total_s):
                        break
                    retry_spent += time.perf_counter() - ta + args.retry_wait_s
                    print(f"[{key}] M={m:<4} {op:<10} other processes used {100 * other:.0f}% CPU: "
                          f"re-measuring after {args.retry_wait_s:g} s", flush=True)
                    time.sleep(args.retry_wait_s)
                times, other = best
                for meth, v in times.items():
                    if v["flag"] != "estimated":
                        last[(op, meth)] = (m, v["median_s"])
                rows.append({"shape": [n, k], "M": m, "op": op, "weight_bytes": ws["info"]["ours"]["bytes_per_layer"],
                             "times": times, "other_cpu_frac": other, "attempts": attempt})
                print(f"[{key}] M={m:<4} {op:<10} " + "  ".join(
                    f"{meth} {v['median_s'] * 1e3:.3f} ms ({v['reps'] or 'predicted'})" for meth, v in times.items())
                    + f"   [{time.perf_counter() - tc:.1f} s"
                    + ("" if other is None else f", other processes {100 * other:.0f}% CPU") + "]", flush=True)
        del ws

    bw_runs.append(bandwidth("end"))
    bw = dict(max(bw_runs, key=lambda b: b["gbps"]))
    bw["runs"] = bw_runs
    print(f"  reference read bandwidth {bw['gbps']:.1f} GB/s ({bw['best_method']} at {bw['when']}; the best of "
          f"{len(bw_runs) * len(bw['methods'])} medians of {bw_reps})")
    derived(rows, bw["gbps"])
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()
    other_run = run_load.frac()
    print(f"\nresults: median ms per call; ISA '{get_isa()}', {torch.get_num_threads()} threads; read bandwidth "
          f"{bw['gbps']:.1f} GB/s; load avg {load_start[0]:.2f} -> {load_end[0]:.2f}"
          + ("" if other_run is None else f"; other processes used {100 * other_run:.0f}% of the CPUs"))
    print_table(rows)
    tg = targets(rows, shapes, bw, args.max_other)
    print_targets(tg)

    if not args.no_save:
        meta = {"mode": mode, "torch": torch.__version__, "threads": torch.get_num_threads(), "isa": get_isa(),
                "supported_isas": supported_isas(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                "llc_bytes": llc, "llc_source": llc_src, "cache_target_bytes": target, "group_size": GROUP_SIZE,
                "reps": reps, "budget_s": budget, "max_call_s": max_call_s, "skip_call_s": skip_call_s, "min_reps": MIN_REPS, "loadavg_start": load_start,
                "loadavg_end": load_end, "other_cpu_frac": other_run,
                "max_other": args.max_other, "retries": args.retries, "retry_total_s": retry_total_s, "elapsed_s": elapsed, "argv": sys.argv[1:],
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "bandwidth": bw, "layers": layer_info, "sanity_rel_err": sanity,
                       "results": rows, "targets": tg}, f, indent=1)
        plot(rows, png_path, f"ctp_fast int4 vs torch, ISA {get_isa()}, {torch.get_num_threads()} threads, "
                             f"{cpu_model()} ({mode})")
        print(f"\nwrote {json_path}\nwrote {png_path}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
