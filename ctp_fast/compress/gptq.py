"""GPTQ (Frantar et al. 2022): quantize a linear layer's weight column by column, spreading each
column's rounding error over the not-yet-quantized columns through the inverse Hessian of the
layer's calibration inputs, H = 2/n X^T X."""
from __future__ import annotations

import torch

from ..formats.base import check_group_size
from .layer import (LayerResult, check_bits, check_damp, check_hessian, check_mask, check_positive_int,
                    check_scale_dtype, describe_mask, inverse_hessian_factor, obs_sweep, prepare_weight,
                    result_from_codes, sparsity_spec)


def gptq(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
         act_order: bool = False, damp: float = 0.01, block_size: int = 128, mask: torch.Tensor | None = None, *,
         sparsity=None, scale_dtype: torch.dtype = torch.float16) -> LayerResult:
    """GPTQ of a [N, K] weight given the Hessian H [K, K] of its inputs (HessianAccumulator.hessian()).

    Dead columns (H_ii == 0) get H_ii = 1 and a zero weight column; H is dampened by damp * mean(diag H);
    the sweep uses the upper Cholesky factor of H^-1 with lazy batch updates every `block_size` columns.
    Groups of `group_size` (-1: one per row; the last may be shorter) run along the packed order, their
    scale/zero fitted from the current error-updated weights when the sweep reaches them.
    act_order: columns are processed (and packed) in order of descending diag(H); result.perm is that
    order (packed column j = original column perm[j]).
    mask: kept entries (original column order) of an already chosen pruning: pruned weights are forced
    to exactly 0 and their value propagates as error (as in SparseGPT); group ranges come from kept
    entries only. sparsity: the spec the mask realizes (default: inferred from the mask).
    """
    W = prepare_weight(weight)
    n, k = W.shape
    check_bits(bits)
    check_group_size(group_size)
    check_scale_dtype(scale_dtype)
    check_positive_int("block_size", block_size)
    damp = check_damp(damp)
    H = check_hessian(H, k)
    mask = check_mask(mask, W.shape)
    spec = describe_mask(mask) if sparsity is None else sparsity_spec(sparsity)

    diag = torch.diagonal(H).detach().to(torch.float64).clone()
    dead = diag == 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True).to(W.device) if act_order else None
    U, dead = inverse_hessian_factor(H, damp, perm)
    W[:, dead.to(W.device)] = 0
    if perm is not None:
        W = W[:, perm].contiguous()
        mask = None if mask is None else mask[:, perm].contiguous()
    codes, scales, zeros, _, _, loss = obs_sweep(W, U.to(W.device), bits=bits, group_size=group_size,
                                                 symmetric=symmetric, scale_dtype=scale_dtype,
                                                 block_size=block_size, mask=mask)
    return result_from_codes(codes, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric, mask=mask,
                             perm=perm, sparsity=spec, scale_dtype=scale_dtype, loss=loss)
