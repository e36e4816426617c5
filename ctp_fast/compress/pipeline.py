"""Whole-model compression, block by block (as GPTQ and SparseGPT do).

Only the current decoder block's inputs are held: the calibration windows are run up to the first
block once, then each block collects its linears' input statistics, is compressed, and is run again
to give the next block its inputs, so every block sees the outputs of the already-compressed blocks
before it. With `true_sequential`, the linears of a block are compressed stage by stage (q/k/v, then
o, then gate/up, then down for LLaMA), each stage calibrated on the outputs of the compressed stages
before it. A finished block is written to `resume_dir`, so an interrupted run continues from there.

Models larger than the accelerator: with `device=` (e.g. "cuda:0") the model stays where it was loaded
(CPU; `from_pretrained` on CPU memory-maps a safetensors file whose dtype matches, so the weights stay
on disk until read) and one block at a time moves to `device` to be calibrated and compressed, then
(offload=True) back, compressed, to where it came from. The accelerator holds one block's weights, its
calibration statistics and the calibration activations, never the whole model.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fileio import atomic_path, write_json
from ..formats.base import check_group_size
from ..nn.compressed_linear import CompressedLinear
from .magnitude import parse_sparsity

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "magnitude", "wanda", "sparsegpt", "magnitude+gptq", "wanda+gptq")
QUANT_ONLY, PRUNERS = ("rtn", "gptq"), ("magnitude", "wanda", "sparsegpt")


@dataclass
class Recipe:
    """What to do to every compressed linear.

    method: rtn | gptq (quantize), magnitude | wanda | sparsegpt (prune; with bits, also quantize:
    sparsegpt jointly inside its loop, magnitude/wanda by RTN after pruning), magnitude+gptq |
    wanda+gptq (prune, then GPTQ that keeps the mask). bits None = prune only (weights stay dense
    floats with zeros). sparsity: None, "2:4", "4:8" or a fraction.
    """
    method: str = "gptq"
    bits: int | None = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    sparsity: str | float | None = None
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    skip: tuple[str, ...] = ("lm_head", "*embed*")
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        kind, _ = parse_sparsity(self.sparsity)
        if self.method in QUANT_ONLY and kind != "dense":
            raise ValueError(f"method {self.method!r} does not prune; use a pruning method for sparsity={self.sparsity!r}")
        if self.method not in QUANT_ONLY and kind == "dense":
            raise ValueError(f"method {self.method!r} prunes: give a sparsity ('2:4', '4:8' or a fraction)")
        if self.method in QUANT_ONLY + ("magnitude+gptq", "wanda+gptq") and self.bits is None:
            raise ValueError(f"method {self.method!r} quantizes: bits must be 3, 4 or 8")
        if self.bits not in (None, 3, 4, 8):
            raise ValueError(f"bits: expected 3, 4, 8 or None (prune only), got {self.bits!r}")
        if self.bits not in (None, 4) and kind != "dense":
            raise ValueError(f"bits: sparse formats store 4-bit codes, got bits={self.bits} with sparsity={self.sparsity!r}")
        if self.bits is not None:
            check_group_size(self.group_size)  # here, not at the first layer after calibration
        self.skip = tuple(self.skip)

    @property
    def needs_calibration(self) -> bool:
        return self.method not in ("rtn", "magnitude")

    def describe(self) -> str:
        parts = [self.method]
        if self.bits:
            parts.append(f"int{self.bits} g{self.group_size}{'' if self.symmetric else ' asym'}"
                         f"{' act-order' if self.act_order else ''}")
        if self.sparsity is not None:
            parts.append(f"sparsity {self.sparsity}")
        return ", ".join(parts)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a supported causal LM."""
    for path in ("model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    raise ValueError(f"{type(model).__name__}: unsupported architecture: no decoder block list found at "
                     "model.layers (LLaMA, Mistral, Qwen, Gemma), model.decoder.layers (OPT) or transformer.h (GPT-2)")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _as_linear(mod: nn.Module) -> nn.Linear:
    """nn.Linear itself, or GPT-2's Conv1D (a transposed linear) as an equivalent nn.Linear."""
    if isinstance(mod, nn.Linear):
        return mod
    k, n = mod.weight.shape
    lin = nn.Linear(k, n, bias=mod.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(mod.weight.t())
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return lin


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class _Stop(Exception):
    pass


def _block_inputs(model, layers, windows: torch.Tensor, batch_size: int):
    """Runs the windows up to the first block; returns [(hidden, kwargs)] per batch."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args[0].detach(), {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i:i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _to(obj, device):
    """Tensors inside tuples, lists and dicts moved to `device` (anything else as is)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _home(block: nn.Module) -> torch.device:
    for t in block.parameters():
        return t.device
    for t in block.buffers():
        return t.device
    return torch.device("cpu")


def _run_block(block, inputs):
    outs = []
    for hidden, kwargs in inputs:
        out = block(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _calibrate(block, stage, linears, inputs, shared: bool, device):
    """Input statistics (HessianAccumulator) of each linear of `stage`, over all calibration batches.

    shared: the stage's linears take the same input tensor (a true-sequential stage), so they share one
    accumulator. Each batch's forward stops as soon as every linear of the stage has had its input: the
    rest of the block is not needed (for the q/k/v stage, nothing after the input norm runs)."""
    from .layer import HessianAccumulator

    if shared:
        acc = HessianAccumulator(linears[stage[0]].in_features, device=device)
        stats = {n: acc for n in stage}
    else:
        stats = {n: HessianAccumulator(linears[n].in_features, device=device) for n in stage}
    pending: set[str] = set()

    def hook(module, args, n):
        if n in pending:
            stats[n].add(args[0].detach().float())
            pending.difference_update(stage if shared else (n,))
            if not pending:
                raise _Stop

    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n)) for n in stage]
    try:
        for hidden, kwargs in inputs:
            pending.update(stage)
            try:
                block(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def _stages(block, names, inputs):
    """Groups the block's linears by shared input, in execution order (q/k/v | o | gate/up | down)."""
    seen: dict[str, torch.Tensor] = {}  # the inputs are held, so no two distinct ones share an address
    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        _run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    stages: list[tuple[torch.Tensor | None, list[str]]] = []
    for name in sorted(names, key=lambda n: list(seen).index(n) if n in seen else len(seen)):
        x = seen.get(name)
        for key, members in stages:
            if key is x:
                members.append(name)
                break
        else:
            stages.append((x, [name]))
    return [members for _, members in stages]


def compress_layer(linear: nn.Linear, recipe: Recipe, stats=None):
    """One linear -> its LayerResult under `recipe` (stats: a HessianAccumulator, or None for rtn/magnitude)."""
    from . import gptq as gptq_mod, layer as layer_mod, rtn as rtn_mod, sparsegpt as sparsegpt_mod, wanda as wanda_mod
    from .magnitude import magnitude_mask

    w = linear.weight.detach().float()
    r = recipe
    q = dict(group_size=r.group_size, symmetric=r.symmetric, scale_dtype=getattr(torch, r.scale_dtype))
    if r.method == "rtn":
        return rtn_mod.rtn(w, r.bits, **q)
    if r.method == "gptq":
        return gptq_mod.gptq(w, stats.hessian(), r.bits, act_order=r.act_order, damp=r.damp, block_size=r.block_size, **q)
    if r.method == "sparsegpt":
        return sparsegpt_mod.sparsegpt(w, stats.hessian(), r.sparsity, bits=r.bits, damp=r.damp,
                                       block_size=r.block_size, **q)
    mask = (wanda_mod.wanda_mask(w, stats.col_norms(), r.sparsity) if r.method.startswith("wanda")
            else magnitude_mask(w, r.sparsity))
    if r.method.endswith("+gptq"):
        return gptq_mod.gptq(w, stats.hessian(), r.bits, act_order=False, damp=r.damp, block_size=r.block_size,
                             mask=mask, sparsity=r.sparsity, **q)
    if r.bits is None:
        return layer_mod.LayerResult.pruned(w, mask, r.sparsity)
    return rtn_mod.rtn(w, r.bits, mask=mask, sparsity=r.sparsity, **q)


def _install(block, name: str, linear: nn.Linear, result, recipe: Recipe) -> None:
    if result.codes is None:  # prune only: stays a dense linear, with zeros
        with torch.no_grad():
            linear.weight.copy_(result.weight)
        if linear is not block.get_submodule(name):
            _set_module(block, name, linear)
        return
    packed = result.to_packed(scale_dtype=getattr(torch, recipe.scale_dtype))
    _set_module(block, name, CompressedLinear(packed, linear.bias))


@dataclass
class CompressionReport:
    recipe: dict
    layers: int = 0
    bytes_dense: int = 0
    bytes_compressed: int = 0
    seconds: float = 0.0
    calibration_windows: int = 0
    modules: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"compressed {self.layers} linears ({self.recipe['method']}): {self.bytes_dense / 2**20:.1f} MiB -> "
                f"{self.bytes_compressed / 2**20:.1f} MiB in {self.seconds:.0f} s")


def compress(model: nn.Module, recipe: Recipe, calibration=None, batch_size: int = 8,
             resume_dir: str | Path | None = None, progress: bool = True, tokenizer=None, seqlen: int = 512,
             n_windows: int = 128, device: str | torch.device | None = None, offload: bool = True) -> CompressionReport:
    """Compresses `model` in place under `recipe`. calibration (needed by every method except rtn and
    magnitude): token windows [n, seqlen], or text (a string or list of documents) that `tokenizer` cuts
    into `n_windows` windows of `seqlen` tokens. device: where each block is calibrated and compressed
    (None: where the model is); with offload, each finished block goes back to where it came from, so
    `device` holds one block at a time (see the module docstring). Returns a report of sizes."""
    if isinstance(calibration, (str, list)):
        from ..data.corpora import token_windows

        if tokenizer is None:
            raise ValueError("tokenizer: needed to cut calibration text into token windows")
        docs = [calibration] if isinstance(calibration, str) else calibration
        calibration = token_windows(tokenizer, docs, seqlen, n_windows)

    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cuda:0' or 'cpu', got {device!r}") from None
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"calibration: method {recipe.method!r} needs calibration windows [n, seqlen]")
    layers = decoder_layers(model)
    report = CompressionReport(recipe=asdict(recipe), calibration_windows=0 if calibration is None else len(calibration))
    resume = Path(resume_dir) if resume_dir else None
    done = _load_resume(model, layers, recipe, resume)
    start = time.time()
    inputs = None
    if recipe.needs_calibration:
        model_cfg = getattr(model, "config", None)
        if model_cfg is not None and hasattr(model_cfg, "use_cache"):
            model_cfg.use_cache = False
        with torch.no_grad():
            if done and (resume / "hidden.pt").exists():
                inputs = torch.load(resume / "hidden.pt", weights_only=False)
            else:
                inputs = _block_inputs(model, layers, calibration, batch_size)
            if device is not None:
                inputs = _to(inputs, device)
    prefix = _layers_prefix(model, layers)
    bar = tqdm(range(len(layers)), desc=f"compress ({recipe.describe()})", disable=not progress)
    for i in bar:
        block = layers[i]
        names = [n for n, m in block.named_modules() if _is_linear(m)
                 and not any(fnmatch.fnmatch(f"{prefix}{i}.{n}", p) for p in recipe.skip)]
        if i < done:
            _account(report, block, names, f"{prefix}{i}.")
            continue
        home = _home(block)
        if device is not None:
            block.to(device)
        with torch.no_grad():
            sequential = bool(inputs) and recipe.true_sequential
            stages = _stages(block, names, inputs) if sequential else [names]
            for stage in stages:
                linears = {n: _as_linear(block.get_submodule(n)) for n in stage}
                stats = _calibrate(block, stage, linears, inputs, shared=sequential, device=device) if inputs else {}
                for n in stage:
                    bar.set_postfix_str(n)
                    result = compress_layer(linears[n], recipe, stats.get(n))
                    _install(block, n, linears[n], result, recipe)
            if inputs:
                inputs = [(out, kw) for out, (_, kw) in zip(_run_block(block, inputs), inputs)]
        if device is not None and offload:
            block.to(home)
        _account(report, block, names, f"{prefix}{i}.")
        _save_resume(block, i, recipe, inputs, resume)
    report.seconds = time.time() - start
    log.info("%s", report)
    return report


def _layers_prefix(model, layers) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    return ""


def _account(report: CompressionReport, block, names, prefix: str) -> None:
    for n in names:
        mod = block.get_submodule(n)
        dense = mod.in_features * mod.out_features * 4 if isinstance(mod, CompressedLinear) else \
            mod.weight.numel() * mod.weight.element_size()
        size = mod.nbytes if isinstance(mod, CompressedLinear) else dense
        report.layers += 1
        report.bytes_dense += dense
        report.bytes_compressed += size
        report.modules[prefix + n] = (mod.weight_format.config() if isinstance(mod, CompressedLinear)
                                      else {"format": "dense-float"})


# ---------------------------------------------------------------- resume points
def _save_resume(block, i: int, recipe: Recipe, inputs, resume: Path | None) -> None:
    if resume is None:
        return
    from ..checkpoint import module_entry

    resume.mkdir(parents=True, exist_ok=True)
    formats = {n: module_entry(m) for n, m in block.named_modules() if isinstance(m, CompressedLinear)}
    with atomic_path(resume / f"block{i:04d}.pt") as tmp:
        torch.save({"state": block.state_dict(), "formats": formats}, tmp)
    if inputs is not None:
        with atomic_path(resume / "hidden.pt") as tmp:
            torch.save(inputs, tmp)
    write_json(resume / "progress.json", {"done": i + 1, "recipe": asdict(recipe)})


def _load_resume(model, layers, recipe: Recipe, resume: Path | None) -> int:
    if resume is None or not (resume / "progress.json").exists():
        return 0
    from ..checkpoint import replace_with_shells

    progress = json.loads((resume / "progress.json").read_text())
    if progress.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        raise ValueError(f"resume_dir {resume} holds a run with another recipe ({progress.get('recipe')}); "
                         "use a fresh directory")
    done = int(progress["done"])
    for i in range(done):
        saved = torch.load(resume / f"block{i:04d}.pt", weights_only=False)
        replace_with_shells(layers[i], saved["formats"])
        layers[i].load_state_dict(saved["state"])
    log.info("resuming after %d finished blocks from %s", done, resume)
    return done
