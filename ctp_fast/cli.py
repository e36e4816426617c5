"""The `ctp` command line (also `python -m ctp_fast`).

  ctp compress --model smollm2-135m --method gptq --bits 4 --group-size 128 --out runs/gptq4
  ctp eval --model runs/gptq4 --corpora wiki,wikixml,news
  ctp tune --model runs/gptq4 --corpus wiki --out runs/prompt
  torchrun --nproc_per_node 2 -m ctp_fast tune --model runs/gptq4 --out runs/prompt   (data parallel)
  ctp transfer --prompts runs/prompt/best --models gemma=gemma3-270m --dense smollm2-135m,gemma3-270m --bridge auto
  ctp demo [--quick] [--steps N] [--max-minutes M] [--dtype auto|fp32|bf16]
  ctp bench kernels|formats|prefix|e2e [--quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

from . import distributed

log = logging.getLogger("ctp_fast")


def _sparsity(value: str):
    if value in ("", "none", "None"):
        return None
    return value if ":" in value else float(value)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    from .compress.pipeline import METHODS

    p.add_argument("--method", default="gptq", choices=METHODS)
    p.add_argument("--bits", default="4", help="3, 4, 8, or 'none' to prune only")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 for per channel")
    p.add_argument("--asym", action="store_true", help="asymmetric quantization (zero points)")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (columns by decreasing Hessian diagonal)")
    p.add_argument("--sparsity", type=_sparsity, default=None, help="'2:4', '4:8' or a fraction such as 0.5")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--no-true-sequential", action="store_true")


def _add_data_args(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=windows, help="token windows used")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def _device(value: str) -> str:
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
    return value


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="cpu",
                   help="cpu or cuda (under torchrun: cuda:LOCAL_RANK with NCCL; cpu with gloo)")


def _load_any(path: str):
    """A compressed checkpoint directory, a shipped model name or a local HF directory."""
    from .checkpoint import QUANT_METHOD, load_compressed
    from .data import load_model

    cfg = Path(path) / "config.json"
    if cfg.exists() and (json.loads(cfg.read_text()).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        from transformers import AutoTokenizer

        model = load_compressed(path)
        model.eval()
        return model, AutoTokenizer.from_pretrained(path)
    return load_model(path)


def cmd_compress(args) -> int:
    import torch

    from .checkpoint import save_compressed
    from .compress.pipeline import Recipe, compress
    from .data import corpus_split, load_model, local_model_dir, token_windows

    torch.manual_seed(args.seed)
    recipe = Recipe(method=args.method, bits=None if args.bits == "none" else int(args.bits),
                    group_size=args.group_size, symmetric=not args.asym, act_order=args.act_order,
                    sparsity=args.sparsity, damp=args.damp, true_sequential=not args.no_true_sequential)
    model, tok = load_model(args.model)
    calib = None
    if recipe.needs_calibration:
        calib = token_windows(tok, corpus_split(args.calib_corpus, "train", args.seed), args.seqlen, args.windows)
        log.info("calibration: %d windows of %d tokens from %s (train split)", len(calib), args.seqlen, args.calib_corpus)
    resume = Path(args.out).with_name(Path(args.out).name + ".resume") if args.resume else None
    report = compress(model, recipe, calib, batch_size=args.batch_size, resume_dir=resume, device=args.device)
    print(report)
    if recipe.bits is None:
        print("prune-only recipe: weights stay dense floats (with zeros); nothing packed to save")
        return 0
    save_compressed(model, args.out, tok, extra={"recipe": report.recipe, "calibration_corpus": args.calib_corpus,
                                                 "calibration_windows": report.calibration_windows})
    disk = (Path(args.out) / "model.safetensors").stat().st_size
    dense_disk = sum(f.stat().st_size for f in Path(local_model_dir(args.model)).glob("*.safetensors"))
    print(f"saved to {args.out}: {disk / 2**20:.1f} MiB on disk (dense fp32 checkpoint {dense_disk / 2**20:.1f} MiB); "
          f"compressed linears {report.bytes_compressed / 2**20:.1f} MiB in memory vs {report.bytes_dense / 2**20:.1f} MiB")
    if args.export_compressed_tensors:
        from .export import export_compressed_tensors

        export_compressed_tensors(model, args.export_compressed_tensors, tok)
        print(f"exported (compressed-tensors pack-quantized) to {args.export_compressed_tensors}")
    return 0


def cmd_eval(args) -> int:
    from .data import corpus_split, token_windows
    from .eval import perplexity
    from .prompt import load_prompt

    # Texts and prompt first: a bad name fails before the model loads, not after the first corpus's run.
    texts = {corpus: corpus_split(corpus, args.split, args.seed) for corpus in args.corpora.split(",")}
    prompt = load_prompt(args.prompt)[0] if args.prompt else None
    model, tok = _load_any(args.model)
    model.to(args.device)
    if prompt is not None:
        prompt = prompt.to(args.device)
    bos = "gemma" in type(model).__name__.lower()
    rows = []
    for corpus, text in texts.items():
        windows = token_windows(tok, text, args.seqlen, args.windows, bos=bos)
        r = perplexity(model, windows.to(args.device), args.batch_size, prompt=prompt, progress=True,
                       desc=f"{corpus} ({args.split})")
        rows.append((corpus, len(windows), r.tokens, r.loss, r.ppl))
    if not distributed.is_main():
        return 0
    print(f"{'corpus':10} {'windows':>8} {'tokens':>8} {'loss':>8} {'ppl':>10}")
    for corpus, n, t, loss, ppl in rows:
        print(f"{corpus:10} {n:8d} {t:8d} {loss:8.4f} {ppl:10.3f}")
    return 0


def cmd_transfer(args) -> int:
    """Source prompt x target model matrix: perplexity and gap recovered (in test loss). A target of another
    width (another model) gets the prompt through an embedding bridge (--bridge), and its own windows."""
    from .data import corpus_split, token_windows
    from .eval import gap_recovered, perplexity
    from .prompt import load_prompt
    from .prompt.bridge import prompt_for_model

    targets = dict(item.split("=", 1) for item in args.models.split(","))
    prompts = {p: load_prompt(p) for p in args.prompts.split(",")}
    corpora = args.corpora.split(",")
    denses = {d: _load_any(d) for d in args.dense.split(",")}  # one dense reference per model family
    windows, bridges, dense_loss = {}, {}, {}

    def loss(m, tok, p, c):
        key = (getattr(tok, "name_or_path", None), len(tok), c)
        if key not in windows:
            windows[key] = token_windows(tok, corpus_split(c, args.split, args.seed), args.seqlen, args.windows,
                                         bos="gemma" in type(m).__name__.lower())
        return perplexity(m, windows[key], args.batch_size, prompt=p).loss

    def base(m, c):  # the dense model with the target's embedding shape, if any
        shape = m.get_input_embeddings().weight.shape
        ref = [(d, dm, dt) for d, (dm, dt) in denses.items() if dm.get_input_embeddings().weight.shape == shape]
        if not ref:
            return None
        if (ref[0][0], c) not in dense_loss:
            dense_loss[ref[0][0], c] = loss(ref[0][1], ref[0][2], None, c)
        return dense_loss[ref[0][0], c]

    print(f"{'source prompt':28} {'target':14} {'corpus':8} {'ppl':>9} {'no prompt':>10} {'dense':>8} {'gap recovered':>14}")
    for tname, path in targets.items():
        model, tok = denses[path] if path in denses else _load_any(path)
        ready = {}
        for pname, (prompt, meta) in prompts.items():
            ready[pname], b = prompt_for_model(prompt, meta, model, tok, args.bridge,
                                                lambda name: denses.get(name) or _load_any(name), bridges)
            if b is not None:
                print(f"bridged {pname} (hidden {prompt.hidden}) to {tname} (hidden {ready[pname].hidden}): "
                      f"{b.stats.get('method')} map from {b.stats.get('source')}, {b.stats.get('anchors')} anchor "
                      f"tokens, held-out R2 {b.stats.get('heldout_r2', float('nan')):.3f}, "
                      f"cosine {b.stats.get('heldout_cosine', float('nan')):.3f}")
        for c in corpora:
            lc, ld = loss(model, tok, None, c), base(model, c)
            for pname, prompt in ready.items():
                lp = loss(model, tok, prompt, c)
                share = None if ld is None else gap_recovered(lc, lp, ld)
                rec = ("n/a (no dense)" if ld is None else "n/a (no gap)" if share is None
                       else f"{100 * share:.1f}%")
                dense_ppl = "n/a" if ld is None else f"{math.exp(ld):.3f}"
                print(f"{pname[-28:]:28} {tname:14} {c:8} {math.exp(lp):9.3f} {math.exp(lc):10.3f} "
                      f"{dense_ppl:>8} {rec:>14}")
    return 0


def cmd_tune(args) -> int:
    from .data import corpus_split, token_windows
    from .prompt import TuneConfig, tune

    # The config and texts first: a bad option or corpus fails before the model loads.
    cfg = TuneConfig(n_tokens=args.n_tokens, init=args.init, init_text=args.init_text, optimizer=args.optimizer,
                     lr=args.lr, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     eval_every=args.eval_every, dtype=args.dtype, schedule=args.schedule, seed=args.seed,
                     warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm)
    texts = {split: corpus_split(args.corpus, split, args.seed) for split in ("train", "val", "test")}
    model, tok = _load_any(args.model)
    model.to(args.device)
    bos = "gemma" in type(model).__name__.lower()
    win = lambda split, n: token_windows(tok, texts[split], args.seqlen, n, bos=bos)  # noqa: E731
    qcfg = (getattr(model.config, "quantization_config", None) or {})
    result = tune(model, win("train", None), win("val", args.val_windows), cfg, out_dir=args.out, resume=args.resume,
                  test_windows=win("test", args.val_windows), tokenizer=tok,
                  metadata={"model": args.model, "corpus": args.corpus,
                            "compression": qcfg.get("recipe") if isinstance(qcfg, dict) else None})
    if not distributed.is_main():
        return 0
    print(f"best val ppl {result.best_val_ppl:.3f} at step {result.best_step}; test ppl {result.test_ppl:.3f}; "
          f"prompt saved in {args.out}/best")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    kw = {"out": args.out, "model": args.model}
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"ctp demo: --steps: expected a positive integer, got {args.steps}")
        kw["steps"] = args.steps
        kw["max_minutes"] = None  # asked for N steps: N steps, however long they take
    if args.max_minutes is not None:
        if not args.max_minutes >= 0:
            raise SystemExit(f"ctp demo: --max-minutes: expected a number >= 0 (0: no budget), got {args.max_minutes}")
        kw["max_minutes"] = args.max_minutes or None
    if args.dtype is not None:
        kw["dtype"] = args.dtype
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    run_demo(cfg)
    return 0


BENCH_SCRIPTS = {"kernels": "bench_int4.py", "formats": "bench_formats.py", "prefix": "bench_prefix.py",
                 "e2e": "bench_e2e.py"}


def cmd_bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCH_SCRIPTS[args.what]
    if not script.exists():
        print(f"benchmark script not found at {script} (run from a source checkout)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ctp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="under torchrun: fail when another rank does not answer within this time "
                             f"(default ${distributed.TIMEOUT_ENV} or {distributed.DEFAULT_TIMEOUT:g})")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("compress", help="compress a model and save it")
    p.add_argument("--model", default="smollm2-135m", help="shipped model name or local HF directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib-corpus", default="wiki", help="corpus name or text file / folder")
    p.add_argument("--resume", action="store_true", help="keep a resume point per finished block in OUT.resume")
    p.add_argument("--device", type=_device, default=None, help="calibrate one block at a time on this device (e.g. cuda:0), the rest "
                                                  "of the model staying on CPU / memory-mapped from disk")
    p.add_argument("--export-compressed-tensors", metavar="DIR", default=None,
                   help="also write the model in compressed-tensors pack-quantized layout (dense symmetric int4)")
    _add_recipe_args(p)
    _add_data_args(p, windows=128)
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("eval", help="perplexity on corpora")
    p.add_argument("--model", default="smollm2-135m", help="compressed checkpoint, shipped model name or HF directory")
    p.add_argument("--corpora", default="wiki,wikixml,news")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--prompt", default=None, help="a soft prompt folder to prepend (PEFT layout)")
    _add_device_arg(p)
    _add_data_args(p, windows=8)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("transfer", help="prompts x compressed models: perplexity and gap recovered")
    p.add_argument("--prompts", required=True, help="comma-separated prompt folders (ctp tune --out .../best)")
    p.add_argument("--models", required=True, help="comma-separated NAME=PATH targets (checkpoints or model names)")
    p.add_argument("--dense", default="smollm2-135m",
                   help="the uncompressed model(s) the gap is measured to, comma-separated: one per model family")
    p.add_argument("--bridge", default="auto", help="for a target of another width: auto (fit an embedding bridge "
                   "from the prompt's source model), none (refuse), or a saved bridge folder")
    p.add_argument("--corpora", default="wiki,wikixml,news")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    _add_data_args(p, windows=8)
    p.set_defaults(fn=cmd_transfer)

    p = sub.add_parser("tune", help="learn a soft prompt for a (compressed) model")
    p.add_argument("--model", default="smollm2-135m", help="compressed checkpoint, shipped model name or HF directory")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out exactly")
    p.add_argument("--n-tokens", type=int, default=20)
    p.add_argument("--init", default="vocab", choices=("vocab", "text", "random"))
    p.add_argument("--init-text", default=None)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"))
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    _add_device_arg(p)
    _add_data_args(p, windows=0)
    p.set_defaults(fn=cmd_tune, seqlen=256)

    p = sub.add_parser("demo", help="the main job: compress SmolLM2, learn a prompt, print the table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a small run (about 4 minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=None,
                   help="prompt-tuning steps, run whatever the time (default: 800, quick 20, cut to fit --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="the run's time budget: fewer tuning steps on a slow machine (default 20, quick 4; 0: none)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None,
                   help="prompt-tuning compute (default auto: bf16 on CPUs with AVX512_BF16 or AMX, where it tunes "
                        "more steps in the budget, else fp32)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=tuple(BENCH_SCRIPTS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    try:
        if distributed.launched():
            if args.cmd not in ("tune", "eval"):
                raise ValueError(f"torchrun: only 'tune' and 'eval' run data parallel, not {args.cmd!r}; "
                                 "run it as one process")
            args.device = str(distributed.init(args.device, args.dist_timeout))
            distributed.setup_logging(level)
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ctp {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except distributed.DistributedError as e:
        print(f"ctp {args.cmd}: error: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
