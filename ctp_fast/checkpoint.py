"""Compressed checkpoints: safetensors with the packed tensors plus a config.json whose
`quantization_config` names every compressed module's format. After `import ctp_fast`,
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds the compressed model through a registered
transformers quantizer: the linears are replaced by CompressedLinear shells before the weights load,
so no dense copy of a compressed weight is ever materialized.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .fileio import atomic_path
from .formats.base import FORMAT_VERSION, _REGISTRY
from .nn.compressed_linear import CompressedLinear

log = logging.getLogger(__name__)
QUANT_METHOD = "ctp_fast"


def module_entry(mod: CompressedLinear) -> dict:
    w = mod.cpu_weight_format
    return {**w.config(), "tensors": {k: [list(t.shape), str(t.dtype).replace("torch.", "")]
                                      for k, t in w.tensors().items()}}


def unique_tensors(model: nn.Module, skip=()) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors (keys in `skip` left out), tied weights (e.g. lm_head =
    embed_tokens) stored once, under their first name."""
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        if key in skip or not isinstance(t, torch.Tensor):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr not in seen:
            seen.add(ptr)
            state[key] = t.detach().contiguous()
    return state


def write_model_dir(out_dir: str | Path, state: dict, model: nn.Module, qcfg: dict, tokenizer=None) -> Path:
    """model.safetensors + config.json (the model's config with `quantization_config`) (+ tokenizer),
    written atomically as one folder."""
    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_compressed(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Writes model.safetensors + config.json (+ tokenizer) atomically into out_dir."""
    modules = {name: module_entry(m) for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    if not modules:
        raise ValueError("model: holds no CompressedLinear module; compress it first (ctp_fast.compress)")
    qcfg = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": modules, **(extra or {})}
    write_model_dir(out_dir, unique_tensors(model), model, qcfg, tokenizer)
    log.info("saved compressed model to %s", out_dir)
    return Path(out_dir)


def shell_from_entry(entry: dict, bias: bool) -> CompressedLinear:
    """A CompressedLinear with empty tensors of the recorded shapes, to be filled by a state-dict load."""
    if entry.get("format") not in _REGISTRY:
        raise ValueError(f"quantization_config: unknown weight format {entry.get('format')!r}")
    want = _REGISTRY[entry["format"]].VERSION
    if entry.get("version") != want:
        raise ValueError(f"quantization_config: {entry['format']} format version {entry.get('version')!r} is not "
                         f"supported (this ctp_fast reads {want})")
    tensors = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in entry["tensors"].items()}
    cls = _REGISTRY[entry["format"]]
    packed = cls(zeros=tensors.pop("zeros", None), perm=tensors.pop("perm", None),
                 out_features=entry["out_features"], in_features=entry["in_features"],
                 group_size=entry["group_size"], bits=entry["bits"], **tensors)
    b = torch.zeros(entry["out_features"]) if bias else None
    mod = CompressedLinear.__new__(CompressedLinear)
    nn.Module.__init__(mod)
    mod.in_features, mod.out_features = packed.in_features, packed.out_features
    mod._set_weight(packed)
    mod.bias = nn.Parameter(b, requires_grad=False) if bias else None
    return mod


def replace_with_shells(model: nn.Module, modules: dict) -> None:
    for name, entry in modules.items():
        old = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                shell_from_entry(entry, getattr(old, "bias", None) is not None))


def check_checkpoint(path: str | Path) -> dict:
    """Reads config.json and checks the safetensors file holds every recorded tensor with its shape;
    returns the quantization_config. A truncated or foreign checkpoint gets a clear error."""
    path = Path(path)
    cfg_file, st_file = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not st_file.exists():
        raise FileNotFoundError(f"{path}: expected config.json and model.safetensors of a compressed model")
    try:
        qcfg = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: not a ctp_fast compressed checkpoint (quant_method={qcfg.get('quant_method')!r})")
    try:
        with safe_open(str(st_file), framework="pt") as f:
            keys = set(f.keys())
            for name, entry in qcfg["modules"].items():
                for key, (shape, _) in entry["tensors"].items():
                    full = f"{name}.{key}"
                    if full not in keys:
                        raise ValueError(f"{st_file}: missing tensor {full!r} (truncated or foreign checkpoint)")
                    if list(f.get_slice(full).get_shape()) != list(shape):
                        raise ValueError(f"{st_file}: tensor {full!r} has shape {f.get_slice(full).get_shape()}, "
                                         f"config says {shape}")
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on a damaged header
        raise ValueError(f"{st_file}: unreadable safetensors file ({e}); truncated or corrupted?") from None
    return qcfg


def load_compressed(path: str | Path, **kwargs):
    """AutoModelForCausalLM.from_pretrained on a compressed checkpoint, after checking it."""
    from transformers import AutoModelForCausalLM

    check_checkpoint(path)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _register_transformers_quantizer() -> None:
    """Teach transformers the `ctp_fast` quant_method (idempotent; skipped without transformers)."""
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                                  register_quantizer)
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception:  # transformers absent or too old: checkpoints still load with load_compressed
        return
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class CtpFastConfig(QuantizationConfigMixin):
        def __init__(self, modules=None, format_version=FORMAT_VERSION, **kwargs):
            self.quant_method = QUANT_METHOD
            self.modules = modules or {}
            self.format_version = format_version
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return dict(self.__dict__)

    @register_quantizer(QUANT_METHOD)
    class CtpFastQuantizer(HfQuantizer):
        requires_calibration = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs):
            pass

        def update_dtype(self, dtype):
            return torch.float32 if dtype is None else dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            replace_with_shells(model, self.quantization_config.modules)

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def param_needs_quantization(self, model, param_name, **kwargs):
            return False

        def is_serializable(self, safe_serialization=None):
            return False

        @property
        def is_trainable(self):
            return False


_register_transformers_quantizer()
