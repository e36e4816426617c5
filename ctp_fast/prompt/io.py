"""Soft prompts on disk, in PEFT's prompt-tuning layout, so PEFT (`PeftModel.from_pretrained`) loads ours
and we load PEFT's:

    <dir>/adapter_config.json        PromptTuningConfig fields (peft_type PROMPT_TUNING, task_type CAUSAL_LM)
    <dir>/adapter_model.safetensors  one tensor, `prompt_embeddings` [num_virtual_tokens, token_dim] fp32
    <dir>/ctp_prompt.json            our metadata (model, tokenizer, compression recipe, corpus, steps, losses)

Our metadata lives in its own file: PEFT warns about unknown keys in adapter_config.json ("saved using a
higher version of the library") and drops them, so nothing of ours goes there. A folder is written whole
(a temporary folder beside it, then a rename), so an interrupted save never leaves a mixed folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import atomic_path
from .soft_prompt import SoftPrompt

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"  # PEFT's layout with safe_serialization=False (read only)
META_NAME = "ctp_prompt.json"
KEY = "prompt_embeddings"
FORMAT_VERSION = 1
_OURS = {CONFIG_NAME, WEIGHTS_NAME, META_NAME, "README.md"}

# our init names -> PEFT's PromptTuningInit
_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}
_OUR_INIT = {v: k for k, v in _PEFT_INIT.items()}


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _first_attr(obj, names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def adapter_config(prompt: SoftPrompt, model=None, base_model_name_or_path: str | None = None,
                   tokenizer_name_or_path: str | None = None) -> dict:
    """The adapter_config.json dict PEFT's PromptTuningConfig writes, for `prompt` on `model`."""
    cfg = _text_config(model) if model is not None else None
    if base_model_name_or_path is None and model is not None:
        base_model_name_or_path = (getattr(model, "name_or_path", None)
                                   or getattr(model.config, "_name_or_path", None) or None)
    init = _PEFT_INIT.get(prompt.init, "RANDOM")
    init_text = prompt.init_text if init == "TEXT" else None
    tokenizer_name_or_path = tokenizer_name_or_path or (base_model_name_or_path if init == "TEXT" else None)
    if init == "TEXT" and not (init_text and tokenizer_name_or_path):
        init, init_text, tokenizer_name_or_path = "RANDOM", None, None  # PEFT rejects TEXT without both
    return {
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path) if base_model_name_or_path else None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": _first_attr(cfg, ("num_attention_heads", "n_head")) if cfg is not None else None,
        "num_layers": _first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers")) if cfg is not None else None,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.n_tokens,
        "peft_type": "PROMPT_TUNING",
        "peft_version": None,  # PEFT fills in its own version when it loads the config
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": init_text,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": prompt.hidden,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": str(tokenizer_name_or_path) if tokenizer_name_or_path else None,
    }


def save_prompt(path, prompt: SoftPrompt, model=None, metadata: dict | None = None,
                base_model_name_or_path: str | None = None, tokenizer_name_or_path: str | None = None) -> Path:
    """Write `prompt` to folder `path` (replaced as a whole). `model` fills the config's layer/head counts
    and base_model_name_or_path; `metadata` (JSON-able) goes to ctp_prompt.json."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _OURS)
        if foreign:
            raise FileExistsError(f"{path} holds files that are not a saved prompt's ({', '.join(foreign[:5])}); "
                                  "the folder is replaced as a whole: choose an empty or new folder")
    config = adapter_config(prompt, model, base_model_name_or_path, tokenizer_name_or_path)
    meta = {"format": "ctp_fast.soft_prompt", "format_version": FORMAT_VERSION, "n_tokens": prompt.n_tokens,
            "hidden": prompt.hidden, "init": prompt.init, "init_text": prompt.init_text}
    if model is not None:
        emb = model.get_input_embeddings()
        meta["vocab_size"] = int(emb.weight.shape[0])
        meta["model_type"] = getattr(getattr(model, "config", None), "model_type", None)
    meta.update(metadata or {})
    tensor = prompt.embeddings.detach().to("cpu", torch.float32).contiguous().clone()
    with atomic_path(path, is_dir=True) as tmp:
        save_file({KEY: tensor}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return path


def _read_json(file: Path, what: str) -> dict:
    try:
        obj = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: {what} is unreadable or truncated ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: {what} should hold a JSON object, got {type(obj).__name__}")
    return obj


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st, binf = path / WEIGHTS_NAME, path / WEIGHTS_NAME_BIN
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{st}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if binf.exists():
        try:
            obj = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{binf}: not a readable PyTorch state dict (truncated or corrupt?): {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{binf}: expected a state dict, got {type(obj).__name__}")
        return obj
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}): not a saved prompt")


def load_prompt(path) -> tuple[SoftPrompt, dict]:
    """(SoftPrompt, metadata) from a folder saved by `save_prompt` or by PEFT's prompt tuning.

    metadata: the contents of ctp_prompt.json (empty for a PEFT-saved prompt) plus `adapter_config`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such prompt folder")
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}: not a saved prompt")
    config = _read_json(path / CONFIG_NAME, CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise ValueError(f"{path}: a {peft_type or 'non-PEFT'} adapter, not a prompt-tuning one "
                         "(peft_type PROMPT_TUNING)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {config.get('task_type')!r}: only CAUSAL_LM prompts are supported")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ValueError(f"{path}: num_transformer_submodules={submodules} (an encoder-decoder prompt); expected 1")
    tensors = _read_weights(path)
    if KEY not in tensors:
        raise ValueError(f"{path}: the weights hold {sorted(tensors)[:5]}, not {KEY!r}: not a prompt-tuning adapter")
    emb = tensors[KEY]
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise ValueError(f"{path}: {KEY} should be 2-D [num_virtual_tokens, token_dim], got shape "
                         f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
    expect = (config.get("num_virtual_tokens"), config.get("token_dim"))
    for i, (name, want) in enumerate(zip(("num_virtual_tokens", "token_dim"), expect)):
        if want is not None and emb.shape[i] != want:
            raise ValueError(f"{path}: {KEY} has shape {tuple(emb.shape)} but {CONFIG_NAME} says {name}={want}")
    if not emb.is_floating_point():
        raise ValueError(f"{path}: {KEY} should be floating point, got {emb.dtype}")
    meta = _read_json(path / META_NAME, META_NAME) if (path / META_NAME).exists() else {}
    init = meta.get("init") or _OUR_INIT.get(config.get("prompt_tuning_init"), "random")
    init_text = meta.get("init_text") or config.get("prompt_tuning_init_text")
    try:
        prompt = SoftPrompt(emb.float(), init=init, init_text=init_text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    meta = dict(meta)
    meta["adapter_config"] = config
    return prompt, meta
