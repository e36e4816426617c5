"""Learn a soft prompt for a frozen (compressed or dense) causal LM.

Only the prompt trains: every model parameter is frozen (requires_grad False, restored afterwards) and the
model stays in eval mode (no dropout), so a run is determined by its seed: the prompt's initialisation and
the order of the training windows (a seeded permutation per epoch) are the only random choices.

With `out_dir`, the run keeps:
    out_dir/best/         the best prompt so far by validation loss (PEFT layout, see ctp_fast.prompt.io)
    out_dir/state.pt      a checkpoint (prompt, optimizer, scheduler, RNG, data position, history, best),
                          every `save_every` steps; `resume=True` continues from it exactly
    out_dir/curves.png    training and validation loss curves
    out_dir/result.json   the TuneResult (best / test loss and perplexity, history)
Every file is written atomically.

Data parallel (under torchrun, see ctp_fast.distributed): `batch_size` is the global micro-batch; each
rank runs its contiguous shard of it and the prompt gradients are summed across ranks, weighted so that
the step equals the one-process step (the loss is a mean over the scored tokens of the whole global
micro-batch). The checkpoint holds the global data position, so a run resumes on any number of ranks.
Only rank 0 writes files; every rank returns the same result.

Learning rates. AdamW (default) moves every element by about `lr` per step whatever the gradient's
scale; the default 3e-2 is what PEFT's causal-LM prompt-tuning examples use, and it was the best of
3e-3 / 1e-2 / 3e-2 in a short check here (SmolLM2-135M, int4 per-channel RTN, 24 steps of 2x64-token
wiki windows: validation ppl 49.0 without a prompt, 64.7 with the vocab-initialised prompt, then 41.8 /
40.4 / 37.3; SmolLM2's embedding entries have std ~0.12). torch's Adafactor scales its step by the
parameter's RMS (a relative step), so its lr is a fraction of the prompt's RMS per step: 0.3 as in the
prompt-tuning paper (Lester et al. 2021); 39.4 in the same check, still falling.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..eval.perplexity import NLL, perplexity
from ..fileio import atomic_path, write_json
from .io import save_prompt
from .soft_prompt import (MAX_TOKENS, VOCAB_INIT_RANGE, SoftPrompt, _check_n_tokens, _embed, prompted_forward,
                          scored_targets)

log = logging.getLogger(__name__)

INITS = ("vocab", "text", "random")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16")
DEFAULT_LR = {"adamw": 3e-2, "adafactor": 0.3}
STATE_NAME = "state.pt"
STATE_VERSION = 1
# fields that may differ between a run and its resumption (they do not change the trajectory)
_RESUME_FREE = ("save_every", "eval_batch_size", "steps", "eval_every", "shared_prefix")


@dataclass
class TuneConfig:
    """How to tune a prompt (see the module docstring for the learning-rate defaults)."""
    n_tokens: int = 20                 # prompt length, 1..100
    init: str = "vocab"                # vocab (rows of the first 5,000 token ids) | text | random
    init_text: str | None = None       # for init="text" (needs tune(..., tokenizer=...))
    init_std: float | None = None      # for init="random": None = the std of the model's token embeddings
    optimizer: str = "adamw"           # adamw | adafactor (torch.optim.Adafactor)
    lr: float | None = None            # None: 3e-2 for adamw, 0.3 for adafactor
    weight_decay: float = 0.0
    warmup_steps: int | None = None    # None: 5% of steps (at most 100)
    schedule: str = "cosine"           # cosine | linear (decay to 0 after warmup) | constant
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    grad_accum: int = 1                # micro-batches per optimizer step
    batch_size: int = 4                # windows per micro-batch
    eval_batch_size: int | None = None  # None: batch_size
    steps: int = 200                   # optimizer steps
    eval_every: int = 50               # validation every N steps (and at step 0 and at the end)
    save_every: int | None = None      # checkpoint every N steps; None: eval_every
    dtype: str = "fp32"                # fp32 | bf16 (autocast of the model compute, packed linears included:
                                       # bf16 dot products on avx512bf16; the prompt and the loss head stay fp32)
    seed: int = 0
    shared_prefix: bool | None = None  # prompt K/V computed once per step (None: when the model supports it)

    def __post_init__(self):
        _check_n_tokens(self.n_tokens, MAX_TOKENS)

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}: expected one of {options}, got {getattr(self, name)!r}")
        choice("init", INITS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("dtype", DTYPES)
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text")
        for name in ("grad_accum", "batch_size", "steps", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("eval_batch_size", "save_every", "warmup_steps"):
            v = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"{name}: expected {'a non-negative' if name == 'warmup_steps' else 'a positive'} "
                                 f"integer or None, got {v!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm: expected >= 0 or None, got {self.max_grad_norm!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std: expected a positive number or None, got {self.init_std!r}")

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_warmup(self) -> int:
        return min(100, round(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult:
    prompt: SoftPrompt                  # the best prompt (by validation loss)
    best_step: int
    best_val_loss: float | None
    init_val_loss: float | None         # the initial prompt's validation loss (step 0)
    test_loss: float | None             # the best prompt's loss on test_windows
    test_tokens: int | None
    steps: int
    seconds: float
    history: dict = field(default_factory=dict)  # {"train": [{step, loss, lr, grad_norm}], "val": [{step, loss, ppl}]}
    out_dir: str | None = None

    @property
    def best_val_ppl(self) -> float | None:
        return None if self.best_val_loss is None else math.exp(self.best_val_loss)

    @property
    def test_ppl(self) -> float | None:
        return None if self.test_loss is None else math.exp(self.test_loss)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prompt"}
        d.update(best_val_ppl=self.best_val_ppl, test_ppl=self.test_ppl, n_tokens=self.prompt.n_tokens,
                 hidden=self.prompt.hidden)
        return d


# ---------------------------------------------------------------------------------------------- helpers
def _check_windows(name: str, w, required: bool = True):
    if w is None:
        if required:
            raise ValueError(f"{name}: expected a LongTensor [n, seqlen] of token windows, got None")
        return None
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.long:
        raise ValueError(f"{name}: expected a LongTensor [n, seqlen], got "
                         f"{(w.dtype, tuple(w.shape)) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.shape[0] < 1 or w.shape[1] < 2:
        raise ValueError(f"{name}: expected at least one window of at least 2 tokens, got shape {tuple(w.shape)}")
    return w


def _fingerprint(w: torch.Tensor) -> list:
    """Shape and a position-weighted checksum: resuming on different training data is an error."""
    weights = torch.arange(1, w.numel() + 1, dtype=torch.float64) % 9973 + 1
    return [list(w.shape), float((w.reshape(-1).double() * weights).sum())]


def _autocast(model, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    device = model.get_input_embeddings().weight.device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def _lr_lambda(config: TuneConfig):
    warm, total, kind = config.resolved_warmup, config.steps, config.schedule

    def factor(step: int) -> float:  # step = optimizer steps taken before this one
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return factor


def _optimizer(params, config: TuneConfig):
    lr = config.resolved_lr
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if not hasattr(torch.optim, "Adafactor"):
        raise RuntimeError("optimizer 'adafactor' needs torch>=2.5 (torch.optim.Adafactor)")
    return torch.optim.Adafactor(params, lr=lr, weight_decay=config.weight_decay)


def init_prompt(model, config: TuneConfig, tokenizer=None) -> SoftPrompt:
    """The initial prompt of a run (seeded)."""
    if config.init == "vocab":
        return SoftPrompt.from_vocab(model, config.n_tokens, seed=config.seed)
    if config.init == "text":
        if tokenizer is None:
            raise ValueError("init='text' needs the tokenizer: tune(..., tokenizer=tok)")
        return SoftPrompt.from_text(model, tokenizer, config.init_text, config.n_tokens)
    std = config.init_std
    if std is None:
        vocab = model.get_input_embeddings().weight.shape[0]
        std = float(_embed(model, torch.arange(min(vocab, VOCAB_INIT_RANGE))).std())
    hidden = model.get_input_embeddings().weight.shape[1]
    return SoftPrompt.random(config.n_tokens, hidden, std=std, seed=config.seed)


def evaluate(model, windows: torch.Tensor, prompt: SoftPrompt | None, batch_size: int = 4,
             dtype: str = "fp32", desc: str = "eval", progress: bool = False) -> NLL:
    """Perplexity-protocol NLL of `windows` with `prompt` (prompt positions never scored)."""
    device = model.get_input_embeddings().weight.device
    with _autocast(model, dtype):
        return perplexity(model, windows.to(device), batch_size=batch_size, prompt=prompt, progress=progress,
                          desc=desc)


@contextmanager
def _frozen(model):
    """Every model parameter frozen and the model in eval mode; both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


def _step_loss(model, prompt: SoftPrompt, ids: torch.Tensor, config: TuneConfig) -> torch.Tensor:
    """One micro-batch's training loss, as every tuning step computes it."""
    with _autocast(model, config.dtype):
        return prompted_forward(model, prompt, ids, shared_prefix=config.shared_prefix, logits=False).loss


def seconds_per_step(model, train_windows: torch.Tensor, config: TuneConfig, tokenizer=None,
                     repeats: int = 3) -> float:
    """Median wall seconds of one tuning step's forward and backward passes (grad_accum micro-batches of
    batch_size training windows) on `model`, after one untimed step; the prompt is a throwaway copy of
    the run's initial one and nothing of the model changes. For fitting a run into a time budget."""
    train_windows = _check_windows("train_windows", train_windows)
    device = model.get_input_embeddings().weight.device
    times = []
    with _frozen(model):
        prompt = init_prompt(model, config, tokenizer).to(device)
        for i in range(repeats + 1):
            t = time.perf_counter()
            for j in range(config.grad_accum):
                first = (i * config.grad_accum + j) * config.batch_size
                ids = train_windows[torch.arange(first, first + config.batch_size) % len(train_windows)].to(device)
                (_step_loss(model, prompt, ids, config) / config.grad_accum).backward()
            prompt.embeddings.grad = None
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


class _Order:
    """The training windows in a seeded permutation per epoch; `pos` counts windows consumed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch) % (2**63)))}
        return self._perms[epoch]

    def take(self, pos: int, k: int) -> torch.Tensor:
        return torch.stack([self.perm(g // self.n)[g % self.n] for g in range(pos, pos + k)])


def _token_share(ids: torch.Tensor, step: int) -> float:
    """This rank's scored tokens over those of the whole global micro-batch (1.0 with one process), so
    that summing `loss * share` over ranks gives the mean over the global micro-batch."""
    if distributed.world_size() == 1:
        return 1.0
    local = int((scored_targets(0, ids) != -100).sum())
    total = int(distributed.all_reduce_sum(torch.tensor([local], dtype=torch.long),
                                           f"all_reduce of the token count (step {step + 1})"))
    return local / total


def _write_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def plot_curves(history: dict, path, title: str = "soft prompt tuning") -> Path | None:
    """Training loss (per step and smoothed) and validation loss against step, as a PNG (Agg)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but the curves are optional
        log.warning("matplotlib is not installed: no curves written")
        return None
    train, val = history.get("train", []), history.get("val", [])
    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (step)")
        k = max(1, len(loss) // 20)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"train loss (mean of {k})")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="tab:orange", linewidth=1.6,
                label="validation loss")
        best = min(val, key=lambda r: r["loss"])
        last = max(r["step"] for r in val) or 1
        ax.annotate(f"best {best['loss']:.3f} (ppl {math.exp(best['loss']):.2f})", (best["step"], best["loss"]),
                    textcoords="offset points", xytext=(0, 8), fontsize=8, color="tab:orange",
                    ha="right" if best["step"] > 0.7 * last else "left" if best["step"] < 0.3 * last else "center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- tune
def tune(model, train_windows: torch.Tensor, val_windows: torch.Tensor | None, config: TuneConfig | None = None,
         out_dir=None, resume: bool = False, test_windows: torch.Tensor | None = None, metadata: dict | None = None,
         progress: bool = True, tokenizer=None, callback=None) -> TuneResult:
    """Tune a soft prompt for the frozen `model` on `train_windows` [n, seqlen]; keep the best by loss on
    `val_windows` (evaluated at step 0, every eval_every steps and at the end); report `test_windows`
    on the best prompt. `metadata` (model name, recipe, corpus...) goes into the saved prompt's
    ctp_prompt.json. `callback(step, record)` runs after every optimizer step (raising stops the run;
    the last checkpoint stays). `tokenizer` is needed for init='text' only."""
    config = config or TuneConfig()
    train_windows = _check_windows("train_windows", train_windows)
    val_windows = _check_windows("val_windows", val_windows, required=False)
    distributed.check_batch(config.batch_size)
    test_windows = _check_windows("test_windows", test_windows, required=False)
    out = Path(out_dir) if out_dir is not None else None
    save_every = config.save_every or config.eval_every
    eval_bs = config.eval_batch_size or config.batch_size
    device = model.get_input_embeddings().weight.device
    started = time.perf_counter()

    with _frozen(model):
        prompt = init_prompt(model, config, tokenizer).to(device)
        optimizer = _optimizer([prompt.embeddings], config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
        order = _Order(len(train_windows), config.seed)
        fingerprint = _fingerprint(train_windows)
        step, pos, elapsed_before = 0, 0, 0.0
        history: dict = {"train": [], "val": []}
        best = {"step": 0, "loss": None, "embeddings": prompt.embeddings.detach().clone()}
        init_val = None

        if distributed.broadcast_object(fingerprint, "check of the training windows") != fingerprint:
            raise ValueError(f"train_windows: rank {distributed.rank()} holds other training windows than rank 0 "
                             f"(shape {fingerprint[0]}); every rank must load the same data")
        state_path = out / STATE_NAME if out is not None else None
        state = None
        if resume and state_path is not None:  # rank 0 reads (other machines may not share its disk)
            state = distributed.broadcast_object(
                torch.load(state_path, map_location="cpu", weights_only=True)
                if distributed.is_main() and state_path.exists() else None, "broadcast of the resume state")
        if state is not None:
            _check_resume(state, config, fingerprint, state_path)
            with torch.no_grad():
                prompt.embeddings.copy_(state["prompt"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step, pos, history, init_val = state["step"], state["pos"], state["history"], state["init_val_loss"]
            best = {"step": state["best"]["step"], "loss": state["best"]["loss"],
                    "embeddings": state["best"]["embeddings"].to(device)}
            elapsed_before = state.get("seconds", 0.0)
            log.info("resuming %s at step %d of %d (saved with %s rank(s), now %d)", state_path, step, config.steps,
                     state.get("world_size", 1), distributed.world_size())
        elif resume:
            log.info("resume: no checkpoint in %s, starting afresh", out)
        elif state_path is not None and state_path.exists() and distributed.is_main():
            log.warning("%s exists and resume=False: starting afresh (it will be overwritten)", state_path)
        distributed.broadcast(prompt.embeddings.data, "broadcast of the initial prompt")  # ranks start equal
        writes = out is not None and distributed.is_main()
        progress = progress and distributed.is_main()

        def meta_for(val_loss):
            m = dict(metadata or {})
            m.update(tune_config=config.to_dict(), lr=config.resolved_lr, best_step=best["step"], val_loss=val_loss,
                     val_ppl=None if val_loss is None else math.exp(val_loss), steps=config.steps,
                     train_windows=len(train_windows), seqlen=int(train_windows.shape[1]),
                     val_windows=None if val_windows is None else len(val_windows))
            return m

        def save_best(extra=None):
            if not writes:
                return
            p = SoftPrompt(best["embeddings"], prompt.init, prompt.init_text)
            save_prompt(out / "best", p, model=model, metadata={**meta_for(best["loss"]), **(extra or {})})

        def validate(at_step: int) -> float:
            nll = evaluate(model, val_windows, prompt, eval_bs, config.dtype, desc=f"val@{at_step}")
            history["val"].append({"step": at_step, "loss": nll.loss, "ppl": nll.ppl, "tokens": nll.tokens})
            log.info("step %d: val loss %.4f ppl %.3f", at_step, nll.loss, nll.ppl)
            if best["loss"] is None or nll.loss < best["loss"]:
                best.update(step=at_step, loss=nll.loss, embeddings=prompt.embeddings.detach().clone())
                save_best()
            return nll.loss

        def checkpoint():
            if not writes:
                return
            _write_state(state_path, {
                "version": STATE_VERSION, "config": config.to_dict(), "fingerprint": fingerprint,
                "step": step, "pos": pos, "prompt": prompt.embeddings.detach().cpu().clone(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "init_val_loss": init_val,
                "best": {"step": best["step"], "loss": best["loss"], "embeddings": best["embeddings"].cpu().clone()},
                "seconds": elapsed_before + time.perf_counter() - started, "world_size": distributed.world_size()})

        if step == 0 and val_windows is not None and not history["val"]:
            init_val = validate(0)

        bar = tqdm(total=config.steps, initial=step, desc="tune", disable=not progress, dynamic_ncols=True)
        ema = None
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                ids = distributed.shard(train_windows[order.take(pos, config.batch_size)]).to(device)
                pos += config.batch_size
                share = _token_share(ids, step)  # this rank's fraction of the micro-batch's scored tokens
                loss = _step_loss(model, prompt, ids, config)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"step {step + 1}: training loss is {float(loss)} "
                                             f"(lr {config.resolved_lr} too high?)")
                (loss * share / config.grad_accum).backward()
                loss_sum += float(loss.detach()) * share / config.grad_accum
            if distributed.world_size() > 1:
                distributed.all_reduce_sum(prompt.embeddings.grad, f"all_reduce of the prompt gradients (step {step + 1})")
                loss_sum = float(distributed.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64),
                                                            f"all_reduce of the training loss (step {step + 1})"))
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_([prompt.embeddings], config.max_grad_norm))
            else:
                grad_norm = float(prompt.embeddings.grad.norm())
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm}
            history["train"].append(record)
            ema = loss_sum if ema is None else 0.9 * ema + 0.1 * loss_sum
            if val_windows is not None and (step % config.eval_every == 0 or step == config.steps):
                validate(step)
            if step % save_every == 0 or step == config.steps:
                checkpoint()
            post = {"loss": f"{ema:.3f}", "ppl": f"{math.exp(min(ema, 50)):.2f}"}
            if history["val"]:
                post["val_ppl"] = f"{history['val'][-1]['ppl']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if callback is not None:
                callback(step, record)
        bar.close()

        if val_windows is None:  # nothing to choose by: the final prompt
            best.update(step=step, loss=None, embeddings=prompt.embeddings.detach().clone())
        best_prompt = SoftPrompt(best["embeddings"].detach().cpu(), prompt.init, prompt.init_text).to(device)
        test_loss = test_tokens = None
        if test_windows is not None:
            nll = evaluate(model, test_windows, best_prompt, eval_bs, config.dtype, desc="test")
            test_loss, test_tokens = nll.loss, nll.tokens
            log.info("best prompt (step %d): test loss %.4f ppl %.3f", best["step"], nll.loss, nll.ppl)
        result = TuneResult(best_prompt, best["step"], best["loss"], init_val, test_loss, test_tokens, step,
                            elapsed_before + time.perf_counter() - started, history,
                            None if out is None else str(out))
        if writes:
            save_best({"test_loss": test_loss, "test_ppl": result.test_ppl, "test_tokens": test_tokens})
            write_json(out / "result.json", result.to_dict())
            plot_curves(history, out / "curves.png")
        return result


def _check_resume(state: dict, config: TuneConfig, fingerprint: list, path: Path) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not a ctp_fast prompt-tuning checkpoint (version {STATE_VERSION})")
    saved, now = state["config"], config.to_dict()
    differ = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if differ:
        raise ValueError(f"{path}: the checkpoint was made with a different config ("
                         + ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
                         + "); resume with the same settings or start afresh (resume=False)")
    if saved.get("steps") != now["steps"]:
        log.warning("resume: steps %s -> %s (the learning-rate schedule changes from here on)",
                    saved.get("steps"), now["steps"])
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{path}: the checkpoint was made on other training windows "
                         f"(shape {state['fingerprint'][0]} vs {fingerprint[0]})")
