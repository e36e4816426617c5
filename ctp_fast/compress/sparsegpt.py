"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning of a linear layer by approximate OBS updates
through the inverse Hessian of its calibration inputs, optionally joint with GPTQ quantization."""
from __future__ import annotations

import torch

from ..formats.base import check_group_size
from .layer import (LayerResult, check_bits, check_damp, check_hessian, check_positive_int, check_scale_dtype,
                    inverse_hessian_factor, obs_sweep, prepare_weight, result_from_codes)
from .magnitude import parse_sparsity


def sparsegpt(weight: torch.Tensor, H: torch.Tensor, sparsity, bits: int | None = None, group_size: int = 128,
              symmetric: bool = True, damp: float = 0.01, block_size: int = 128, *,
              scale_dtype: torch.dtype = torch.float16) -> LayerResult:
    """Prune a [N, K] weight given the Hessian H [K, K] of its inputs.

    sparsity: a fraction in [0, 1) (unstructured: in each block of `block_size` columns the exact share
    of the entries with the lowest w^2 / d^2 is pruned, d = diagonal of the upper Cholesky factor of
    H^-1, the whole layer ending at exactly int(N K sparsity) pruned), or "2:4" / "4:8" (in every m
    consecutive columns of a row the n with the highest w^2 / d^2 are kept, chosen when the sweep
    reaches them). The remaining weights absorb the pruning error (OBS update).
    bits: None prunes only (codes None, weight = pruned fp32); 3/4/8 quantizes the kept weights in the
    same sweep (GPTQ: group scale/zero from the current weights over kept entries). The packed sparse
    formats store 4-bit codes.
    """
    W = prepare_weight(weight)
    n, k = W.shape
    kind, arg = parse_sparsity(sparsity)
    check_bits(bits, allow_none=True)
    check_scale_dtype(scale_dtype)
    if bits is not None:
        check_group_size(group_size)
    check_positive_int("block_size", block_size)
    damp = check_damp(damp)
    H = check_hessian(H, k)
    if kind == "nm":
        m = arg[1]
        if k % m:
            raise ValueError(f"in_features: {arg[0]}:{m} sparsity needs a multiple of {m} input columns, got {k}")
        if block_size % m:
            raise ValueError(f"block_size: must be a multiple of {m} for {arg[0]}:{m} sparsity, got {block_size}")
    prune = None if kind == "dense" else (kind, arg)
    spec = None if kind == "dense" else (f"{arg[0]}:{arg[1]}" if kind == "nm" else arg)

    U, dead = inverse_hessian_factor(H, damp)
    W[:, dead.to(W.device)] = 0
    codes, scales, zeros, keep, Q, loss = obs_sweep(W, U.to(W.device), bits=bits, group_size=group_size,
                                                    symmetric=symmetric, scale_dtype=scale_dtype,
                                                    block_size=block_size, prune=prune)
    mask = None if prune is None else keep
    if bits is None:
        return LayerResult.pruned(Q, mask, spec, loss=loss, scale_dtype=scale_dtype)
    return result_from_codes(codes, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric, mask=mask,
                             perm=None, sparsity=spec, scale_dtype=scale_dtype, loss=loss)
