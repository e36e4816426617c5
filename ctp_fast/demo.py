"""`ctp demo`: the whole story on the shipped SmolLM2-135M, in one table.

1. Evaluate the dense model on three corpora (wiki lead sections, wiki articles, news).
2. Compress it twice with SparseGPT, jointly with int4: 4-bit + 50% unstructured and 4-bit + 2:4.
3. Learn a soft prompt on the 4-bit + 50% model (wiki train split, best by wiki validation loss),
   with gradients through the packed kernels; as many steps as the time budget allows, at most `steps`.
4. Evaluate compressed, compressed + prompt, the prompt on the other compression and on the dense
   model (transfer), on all three corpora; cloze accuracy; model bytes; tokens per second; peak memory
   of tuning on the packed model against the dense fp32 model.
Writes report.md, report.json and PNG plots into --out.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import save_compressed
from .compress.pipeline import Recipe, compress
from .data import corpus_split, load_model, local_model_dir, token_windows
from .eval import cloze_accuracy, cloze_examples, gap_recovered, perplexity
from .fileio import write_json, write_text
from .nn.compressed_linear import linear_bytes
from .ops import get_isa
from .prompt.tune import DTYPES

log = logging.getLogger(__name__)
CORPORA = ("wiki", "wikixml", "news")
RECIPES = {"int4+50%": dict(method="sparsegpt", bits=4, sparsity=0.5),
           "int4+2:4": dict(method="sparsegpt", bits=4, sparsity="2:4")}


@dataclass
class DemoConfig:
    model: str = "smollm2-135m"
    out: str = "runs/demo"
    quick: bool = False
    group_size: int = 64            # divides SmolLM2's 576 and 1536
    calib_windows: int = 32         # x calib_seqlen: 8k tokens keep the default run within 20 minutes
    calib_seqlen: int = 256
    eval_windows: int = 8
    eval_seqlen: int = 512
    n_tokens: int = 100             # the most the issue allows; cheap with the shared prompt cache
    init: str = "text"              # the first training tokens (see prompt_init_text); "vocab": sampled rows
    steps: int = 800                # what fits the budget on a 2-vCPU AMX host (about 1 s a step); slower hosts tune
                                    # fewer (max_minutes). 400 recovered 40.8% of the wiki gap, 900 44.9%
                                    # (benchmarks/results/recovery_vs_steps_900x256.md)
    batch_size: int = 1             # same train tokens, same checkpoint: 400 x (1 x 256) recovered 39.9% of
    train_seqlen: int = 256         # the wiki gap, 200 x (1 x 512) 37.2% (benchmarks/results/recovery_vs_windows.md)
    eval_every: int = 50
    lr: float | None = None
    dtype: str = "auto"             # tuning compute, see tuning_dtype; bf16: autocast, the kernels' bf16 dot products
    max_minutes: float | None = 20.0  # the whole run's budget: tuning steps are cut (never raised) to fit it
    cloze: int = 100
    seed: int = 0

    def tune_config(self, init_text: str | None = None):
        """The prompt-tuning settings (a ctp_fast.prompt.TuneConfig) this demo config stands for;
        init_text: see prompt_init_text."""
        from .prompt import TuneConfig
        return TuneConfig(n_tokens=self.n_tokens, init=self.init, init_text=init_text, steps=self.steps,
                          batch_size=self.batch_size, eval_every=self.eval_every, lr=self.lr, seed=self.seed,
                          dtype=tuning_dtype(self.dtype))

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        base = dict(quick=True, calib_windows=8, calib_seqlen=128, eval_windows=2, eval_seqlen=256, steps=20,
                    batch_size=2, train_seqlen=64, eval_every=10, cloze=20, max_minutes=4.0)
        base.update(kw)
        return cls(**base)


def tuning_dtype(dtype: str) -> str:
    """The demo's tuning compute: "auto" is bf16 where the packed kernels have bf16 dot products (the
    avx512bf16 and amx paths), else fp32. Within the 20-minute budget bf16 tunes more steps and recovers more:
    on Zen 4, 440-470 steps and 40.1/39.7% of the wiki gap against fp32's 310 and 37.8%, although at equal steps
    it recovers about 1 point less (benchmarks/results/demo_report_zen4_auto.md, demo_report_zen4_bf16.md,
    recovery_dtype_timematched.md). Elsewhere the kernels widen bf16 activations to fp32, so bf16 gains nothing."""
    if dtype == "auto":
        return "bf16" if get_isa() in ("avx512bf16", "amx") else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"DemoConfig.dtype: expected 'auto', 'fp32' or 'bf16', got {dtype!r}")
    return dtype


@torch.no_grad()
def tokens_per_second(model, tok, prefill: int = 256, decode: int = 16) -> tuple[float, float]:
    ids = torch.randint(100, 10000, (1, prefill), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:, :32], use_cache=False)  # warm-up
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    pre = prefill / (time.perf_counter() - t)
    t = time.perf_counter()
    model.generate(ids[:, :32], max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                   pad_token_id=tok.eos_token_id)
    dec = decode / (time.perf_counter() - t)
    return pre, dec


_PEAK_SCRIPT = r"""
import sys, json, torch
from ctp_fast.checkpoint import load_compressed
from ctp_fast.data import load_model
from ctp_fast.prompt import SoftPrompt
from ctp_fast.prompt.soft_prompt import prompted_forward
path, batch, seqlen, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_compressed(path) if sys.argv[5] == "packed" else load_model(path)[0]
model.eval()
for p in model.parameters():
    p.requires_grad_(False)
prompt = SoftPrompt.from_vocab(model, 20, seed=0)
opt = torch.optim.AdamW(prompt.parameters(), lr=1e-2)
ids = torch.randint(100, 10000, (batch, seqlen), generator=torch.Generator().manual_seed(0))
for _ in range(steps):
    out = prompted_forward(model, prompt, ids, labels=ids, logits=False)  # as tune() does
    out.loss.backward()
    opt.step(); opt.zero_grad()
# VmHWM: this process image's peak resident memory (ru_maxrss would carry the parent's peak over exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": hwm / 1024}))
"""


def tuning_peaks_mib(runs: dict[str, tuple[str, str]], batch: int, seqlen: int, steps: int = 2) -> dict[str, float]:
    """Peak resident memory, in MiB, of one fresh process per run (name -> (model path, "packed" or
    "dense")) that loads the model and runs prompt-tuning steps. The processes run side by side on one
    thread each: a process's peak is its own, so they need not wait for each other.

    Each runs with glibc's mmap threshold fixed at 128 KiB: by default glibc raises it as large blocks
    are freed, after which freed activations stay in its heap and count as resident, so the peak
    measures the allocator's history more than the memory the step needs (at batch 4 x 128 that hid
    about 140 MiB of the packed model's saving)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    peaks = {}
    with contextlib.ExitStack() as files:  # stderr to files: a full pipe would stall a process not yet waited for
        procs = {}
        for name, (path, kind) in runs.items():
            err = files.enter_context(tempfile.TemporaryFile(mode="w+"))
            cmd = [sys.executable, "-c", _PEAK_SCRIPT, path, str(batch), str(seqlen), str(steps), kind]
            procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env), err)
        for name, (proc, err) in procs.items():
            out, _ = proc.communicate()
            if proc.returncode:
                err.seek(0)
                raise RuntimeError(f"peak-memory run {name!r} exited with {proc.returncode}: {err.read()[-2000:]}")
            peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def test_windows(cfg: DemoConfig, tok, corpus: str, bos: bool = False) -> torch.Tensor:
    """The test windows every setting is scored on."""
    return token_windows(tok, corpus_split(corpus, "test", cfg.seed), cfg.eval_seqlen, cfg.eval_windows, bos=bos)


def tuning_windows(cfg: DemoConfig, tok, bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) wiki windows the prompt is tuned and selected on; val holds half the test tokens."""
    train = token_windows(tok, corpus_split("wiki", "train", cfg.seed), cfg.train_seqlen, bos=bos,
                          max_windows=max(cfg.steps * cfg.batch_size, 64))
    val = token_windows(tok, corpus_split("wiki", "val", cfg.seed), cfg.train_seqlen, bos=bos,
                        max_windows=max(4, cfg.eval_windows * cfg.eval_seqlen // (2 * cfg.train_seqlen)))
    return train, val


def prompt_init_text(cfg: DemoConfig, tok, train: torch.Tensor) -> str | None:
    """For init="text": the text of the first training windows, enough tokens for the prompt. In-domain
    text beat sampled vocabulary rows on the demo's int4+50% SmolLM2: after 60 steps, wiki val loss
    3.460 and 3.462 from two different training passages against 3.526; after 150 steps, wiki test
    loss 3.346 (35.1% of the gap recovered) against 3.370 (32.7%)."""
    if cfg.init != "text":
        return None
    return tok.decode(train[:math.ceil(cfg.n_tokens / train.shape[1])].flatten(), skip_special_tokens=True)


# The stages after tuning (evaluating the prompt and its transfer, cloze, speed, peak memory) took 0.69x
# (Intel, 2026-12-06: 3.3 min after 4.8 before), 0.82x (AMD AVX2, 2026-11-28: 5.3 after 6.5) and 0.74x
# (AMD AVX2, 2026-12-07: 4.8 after 6.5) as long as the stages before it; validation and the final test
# pass add about 10% to the tuning steps (2026-12-07: 400 steps in 18.5 min, 2.5-2.6 s a step).
AFTER_TUNING_SHARE = 0.9
VALIDATION_OVERHEAD = 1.1


def steps_within_budget(cfg: DemoConfig, elapsed_s: float, step_s: float) -> int:
    """The tuning steps (at most cfg.steps, a multiple of 10, at least 10) that keep the whole run within
    cfg.max_minutes, `elapsed_s` into it, at `step_s` seconds a step."""
    left = cfg.max_minutes * 60 - elapsed_s * (1 + AFTER_TUNING_SHARE)
    fit = int(left / (step_s * VALIDATION_OVERHEAD)) // 10 * 10
    return max(10, min(cfg.steps, fit))


def run_demo(cfg: DemoConfig) -> dict:
    from .prompt import seconds_per_step, tune

    cfg = replace(cfg, dtype=tuning_dtype(cfg.dtype))  # the report names the dtype that ran
    log.info("demo: prompt tuning in %s on the %s path", cfg.dtype, get_isa())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages: list[tuple[str, float]] = []  # (stage, seconds) in order (a list: report.json sorts dict keys)

    def stage_done(name: str):
        stages.append((name, time.time() - t0 - sum(s for _, s in stages)))
        log.info("demo: %s took %.0f s", name, stages[-1][1])

    torch.manual_seed(cfg.seed)
    dense, tok = load_model(cfg.model)
    bos = "gemma" in type(dense).__name__.lower()
    evals = {c: test_windows(cfg, tok, c, bos) for c in CORPORA}
    train, val = tuning_windows(cfg, tok, bos)
    cloze_set = cloze_examples(tok, corpus_split("wiki", "test", cfg.seed), cfg.cloze, bos=bos)
    calib = token_windows(tok, corpus_split("wiki", "train", cfg.seed + 1), cfg.calib_seqlen, cfg.calib_windows, bos=bos)

    def losses(model, prompt=None, label="", known=None):
        """Test loss per corpus; `known` holds losses already measured on these windows."""
        known = known or {}
        return {c: known[c] if c in known else
                perplexity(model, w, 4, prompt=prompt, desc=f"{label} {c}", progress=True).loss
                for c, w in evals.items()}

    rows = {"dense": {"loss": losses(dense, label="dense")}}
    stage_done("load and evaluate dense")
    models = {}
    for name, spec in RECIPES.items():
        model = copy.deepcopy(dense)
        recipe = Recipe(group_size=cfg.group_size, true_sequential=not cfg.quick, **spec)
        rep = compress(model, recipe, calib, batch_size=8)
        models[name] = model
        save_compressed(model, out / f"model-{name.replace(':', '-').replace('%', 'pct')}", tok,
                        extra={"recipe": rep.recipe})
        rows[name] = {"loss": losses(model, label=name), "compress_s": rep.seconds}
        stage_done(f"compress and evaluate {name}")
    source = "int4+50%"
    tune_cfg = cfg.tune_config(prompt_init_text(cfg, tok, train))
    budget = None
    if cfg.max_minutes is not None:
        step_s = seconds_per_step(models[source], train, tune_cfg, tok)
        steps = steps_within_budget(cfg, time.time() - t0, step_s)
        budget = {"max_minutes": cfg.max_minutes, "step_seconds": step_s, "steps": steps}
        if steps < cfg.steps:
            log.warning("demo: %.2f s a tuning step: %d steps instead of %d keep the run within %g minutes "
                        "(--steps N runs N whatever the time)", step_s, steps, cfg.steps, cfg.max_minutes)
            tune_cfg = replace(tune_cfg, steps=steps)
    result = tune(models[source], train, val, tune_cfg, out_dir=out / "prompt",
                  test_windows=evals["wiki"], tokenizer=tok,
                  metadata={"model": cfg.model, "compression": RECIPES[source], "corpus": "wiki"})
    prompt = result.prompt
    stage_done("tune the prompt")
    # tune() scored the best prompt on the wiki test windows (same batching): not run twice
    rows[source + " + prompt"] = {"loss": losses(models[source], prompt, f"{source}+prompt",
                                                 known={"wiki": result.test_loss})}
    rows["int4+2:4 + prompt (transfer)"] = {"loss": losses(models["int4+2:4"], prompt, "int4+2:4+prompt")}
    rows["dense + prompt (transfer)"] = {"loss": losses(dense, prompt, "dense+prompt")}
    stage_done("evaluate the prompt and its transfer")

    # cloze, bytes, speed
    for name, model, p in [("dense", dense, None), (source, models[source], None),
                           (source + " + prompt", models[source], prompt), ("int4+2:4", models["int4+2:4"], None)]:
        rows[name]["cloze"] = cloze_accuracy(model, cloze_set, prompt=p, progress=True)
    for name, model in [("dense", dense), *models.items()]:
        rows[name]["bytes"], rows[name]["bytes_fp32"] = linear_bytes(model)
        rows[name]["prefill_tok_s"], rows[name]["decode_tok_s"] = tokens_per_second(model, tok)
    stage_done("cloze, bytes, tokens per second")

    # peak memory of tuning: packed checkpoint vs dense fp32, same batch and length, fresh processes
    packed_dir = str(out / "model-int4+50pct")
    peaks = tuning_peaks_mib({"dense_fp32_mib": (str(local_model_dir(cfg.model)), "dense"),
                              "packed_mib": (packed_dir, "packed")}, cfg.batch_size, cfg.train_seqlen)
    mem = {"batch": cfg.batch_size, "seqlen": cfg.train_seqlen, **peaks}
    mem["weights_saved_mib"] = (rows["dense"]["bytes"] - rows[source]["bytes"]) / 2**20
    mem["peak_saved_mib"] = mem["dense_fp32_mib"] - mem["packed_mib"]
    mem["share_of_weight_saving"] = mem["peak_saved_mib"] / mem["weights_saved_mib"]
    stage_done("peak memory of tuning")

    report = {"config": asdict(cfg), "rows": rows, "memory": mem, "tune": result.to_dict(), "budget": budget,
              "seconds": time.time() - t0, "stage_seconds": stages, "environment": environment()}
    write_json(out / "report.json", report)
    text = render(report)
    write_text(out / "report.md", text)
    plot(report, out / "demo.png")
    print(text)
    return report


def environment() -> dict:
    """What the figures depend on beyond the config: the same recipe gave different int4+50% checkpoints
    on different hosts and package sets (wiki test loss 3.7852 and 3.7145 on Intel VMs, 3.6956 twice on
    an AMD one), and speed depends on the rest."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "isa": get_isa(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def gap(rows, target: str, tuned: str, corpus: str) -> float | None:
    """(loss_compressed - loss_prompted) / (loss_compressed - loss_dense), in test loss."""
    return gap_recovered(rows[target]["loss"][corpus], rows[tuned]["loss"][corpus], rows["dense"]["loss"][corpus])


def steps_text(report: dict) -> str:
    cfg, budget = report["config"], report.get("budget")
    if not budget or budget["steps"] >= cfg["steps"]:
        return f"{cfg['steps']} steps"
    return (f"{budget['steps']} steps ({cfg['steps']} asked, cut to fit the {budget['max_minutes']:g}-minute budget "
            f"at {budget['step_seconds']:.2f} s a step; --steps N runs N)")


def render(report: dict) -> str:
    rows, cfg, mem = report["rows"], report["config"], report["memory"]
    head = "| setting | " + " | ".join(f"{c} ppl" for c in CORPORA) + " | cloze | linears MiB | prefill tok/s | decode tok/s |"
    lines = [f"# ctp demo: {cfg['model']}{' (quick)' if cfg['quick'] else ''}", "",
             f"Test split, {cfg['eval_windows']} windows x {cfg['eval_seqlen']} tokens per corpus; prompt of "
             f"{cfg['n_tokens']} tokens tuned {steps_text(report)} in {cfg.get('dtype', 'fp32')} on the int4+50% model (wiki train, best by wiki val).",
             "", head, "|" + " --- |" * (len(CORPORA) + 5)]
    for name, r in rows.items():
        cells = [f"{math.exp(r['loss'][c]):.2f}" for c in CORPORA]
        cloze = f"{100 * r['cloze']:.1f}%" if "cloze" in r else ""
        size = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else ""
        pre = f"{r['prefill_tok_s']:.0f}" if "prefill_tok_s" in r else ""
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cloze} | {size} | {pre} | {dec} |")
    lines += ["", "Gap recovered, in test loss: (loss_compressed - loss_prompted) / (loss_compressed - loss_dense)", "",
              "| prompt learned on int4+50% (wiki), applied to | " + " | ".join(CORPORA) + " |",
              "|" + " --- |" * (len(CORPORA) + 1)]
    for target, tuned in [("int4+50%", "int4+50% + prompt"), ("int4+2:4", "int4+2:4 + prompt (transfer)")]:
        vals = [gap(rows, target, tuned, c) for c in CORPORA]
        lines.append(f"| {target} | " + " | ".join("n/a" if v is None else f"{100 * v:.1f}%" for v in vals) + " |")
    d = rows["dense"]["loss"]
    dp = rows["dense + prompt (transfer)"]["loss"]
    lines.append("| dense (loss change) | " + " | ".join(f"{dp[c] - d[c]:+.3f}" for c in CORPORA) + " |")
    lines += ["", f"Peak memory of prompt tuning (batch {mem['batch']} x {mem['seqlen']} tokens, fresh process): "
              f"dense fp32 {mem['dense_fp32_mib']:.0f} MiB, packed int4+50% {mem['packed_mib']:.0f} MiB; "
              f"saved {mem['peak_saved_mib']:.0f} MiB = {100 * mem['share_of_weight_saving']:.0f}% of the "
              f"{mem['weights_saved_mib']:.0f} MiB of weights compression saved.",
              "", f"Total time {report['seconds'] / 60:.1f} min ("
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in report.get("stage_seconds", [])) + ")."]
    env = report.get("environment")
    if env:
        lines += ["", f"Environment: torch {env['torch']}, transformers {env['transformers']}, kernels {env['isa']}, "
                  f"{env['threads']} threads on {env['cpus']} CPUs."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(CORPORA)
    for i, c in enumerate(CORPORA):
        ax.bar([j + i * width for j in range(len(names))], [rows[n]["loss"][c] for n in names], width, label=c)
    ax.set_xticks([j + width for j in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test loss (log perplexity)")
    ax.set_title("ctp demo: compression and prompt recovery")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
