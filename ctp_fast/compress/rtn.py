"""Round-to-nearest group quantization (the calibration-free baseline), optionally of a pruned weight."""
from __future__ import annotations

import torch

from ..formats.base import check_group_size, quantize
from .layer import (LayerResult, check_bits, check_mask, check_scale_dtype, describe_mask, prepare_weight,
                    quantize_on_grid, result_from_codes, round_scales, sparsity_spec)


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
        mask: torch.Tensor | None = None, *, sparsity=None, scale_dtype: torch.dtype = torch.float16) -> LayerResult:
    """Quantize a [N, K] weight by round to nearest (formats.base.quantize's grid: symmetric
    scale = 2 max|w| / maxq, asymmetric min/max with 0 in range), groups of `group_size` columns.

    mask: kept entries (original column order); pruned entries become exactly 0 and the group ranges
    are fitted over kept entries only. sparsity: the spec the mask realizes (default: inferred).
    Scales are rounded to `scale_dtype` first and the codes rounded on that grid.
    """
    W = prepare_weight(weight)
    check_bits(bits)
    check_group_size(group_size)
    check_scale_dtype(scale_dtype)
    mask = check_mask(mask, W.shape)
    spec = describe_mask(mask) if sparsity is None else sparsity_spec(sparsity)
    maxq = 2 ** bits - 1
    n, k = W.shape
    _, scales, zeros = quantize(W, bits, group_size, symmetric, mask)
    scales = round_scales(scales, scale_dtype)
    zeros = zeros.float()
    col_group = torch.arange(k, device=W.device) // (k if group_size == -1 else group_size)
    s, z = scales[:, col_group], zeros[:, col_group]
    codes = quantize_on_grid(W, s, z, maxq)
    if mask is not None:
        codes = torch.where(mask, codes, z)
    return result_from_codes(codes, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric, mask=mask,
                             perm=None, sparsity=spec, scale_dtype=scale_dtype)


def prune_then_rtn(weight: torch.Tensor, mask: torch.Tensor | None, sparsity, bits: int | None = None,
                   group_size: int = 128, symmetric: bool = True,
                   scale_dtype: torch.dtype = torch.float16) -> LayerResult:
    """Apply a chosen mask, then (bits given) rtn on the kept weights; bits=None: prune only."""
    check_bits(bits, allow_none=True)
    if bits is None:
        return LayerResult.pruned(weight, mask, sparsity, scale_dtype=scale_dtype)
    return rtn(weight, bits, group_size, symmetric, mask, sparsity=sparsity, scale_dtype=scale_dtype)
