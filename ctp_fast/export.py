"""Export packed dense int4 models to the compressed-tensors `pack-quantized` layout, so other tools
(vLLM, llm-compressor, transformers' compressed-tensors loader) can read them.

Per linear `name`: `name.weight_packed` int32 [N, ceil(K/8)] (eight 4-bit values per int32, the first in
the lowest bits, stored unsigned = signed value + 8, i.e. our codes), `name.weight_scale` [N, G],
`name.weight_shape` int64 [2], and with act-order `name.weight_g_idx` int32 [K] (group of every original
column; codes are stored in original column order). Symmetric weights only: compressed-tensors' int4
zero points use a different layout, so asymmetric weights are refused rather than guessed at.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import unique_tensors, write_model_dir
from .formats import DenseWeight
from .nn.compressed_linear import CompressedLinear


def pack_int32(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> int32 [N, ceil(K/8)], value 8j+i in bits 4i..4i+3 of word j."""
    n, k = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, -k % 8)).view(n, -1, 8)
    words = (c << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    return ((words[..., None] >> (4 * torch.arange(8))) & 15).flatten(1)[:, :k]


def compressed_tensors_layer(w: DenseWeight) -> dict[str, torch.Tensor]:
    if not isinstance(w, DenseWeight) or w.bits != 4:
        raise ValueError(f"{type(w).__name__} {w.bits}-bit: only dense int4 weights export to pack-quantized")
    if not w.symmetric:
        raise ValueError("zeros: asymmetric int4 export is not supported (compressed-tensors stores int4 zero "
                         "points in its own packed layout); quantize with symmetric=True")
    codes = w.codes()  # packed column order
    g = w.kernel_group_size
    out = {"weight_scale": w.scales.permute(0, 2, 1).reshape(-1, w.ngroups)[: w.out_features].contiguous(),
           "weight_shape": torch.tensor([w.out_features, w.in_features], dtype=torch.int64)}
    if w.perm is not None:
        orig = torch.empty_like(codes)
        orig[:, w.perm] = codes
        codes = orig
        g_idx = torch.empty(w.in_features, dtype=torch.int32)
        g_idx[w.perm] = (torch.arange(w.in_features) // g).to(torch.int32)
        out["weight_g_idx"] = g_idx
    out["weight_packed"] = pack_int32(codes)
    return out


def export_compressed_tensors(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write model.safetensors + config.json in the compressed-tensors pack-quantized layout."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    if not mods:
        raise ValueError("model: holds no CompressedLinear module to export")
    group_sizes = {m.cpu_weight_format.group_size for m in mods.values()}
    if len(group_sizes) != 1:
        raise ValueError(f"group_size: one group size per export, the model mixes {sorted(group_sizes)}")
    group = group_sizes.pop()
    act_order = any(m.cpu_weight_format.perm is not None for m in mods.values())
    state, skip = {}, set()
    for name, mod in mods.items():
        for key, t in compressed_tensors_layer(mod.cpu_weight_format).items():
            state[f"{name}.{key}"] = t
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach()
        skip.update(f"{name}.{k}" for k, _ in mod.named_buffers())
        skip.add(f"{name}.bias")
    state.update(unique_tensors(model, skip))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
               "actorder": "group" if act_order else None}
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"],
                                          "weights": weights, "input_activations": None, "output_activations": None}},
            "ignore": sorted(n for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and n not in mods)}
    return write_model_dir(out_dir, state, model, qcfg, tokenizer)
