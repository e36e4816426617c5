"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||, no weight update; optionally RTN afterwards."""
from __future__ import annotations

import torch

from .layer import LayerResult, check_bits, prepare_weight, sparsity_spec
from .magnitude import nm_mask, parse_sparsity, unstructured_mask
from .rtn import prune_then_rtn


def _check_norms(col_norms, k: int) -> torch.Tensor:
    if not isinstance(col_norms, torch.Tensor) or tuple(col_norms.shape) != (k,):
        got = tuple(col_norms.shape) if isinstance(col_norms, torch.Tensor) else type(col_norms).__name__
        raise ValueError(f"col_norms: expected a [{k}] tensor of input column norms, got {got}")
    if not col_norms.is_floating_point() or not torch.isfinite(col_norms).all() or (col_norms < 0).any():
        raise ValueError("col_norms: expected finite non-negative floats")
    return col_norms


def wanda_mask(weight: torch.Tensor, col_norms: torch.Tensor, sparsity) -> torch.Tensor | None:
    """Kept entries [N, K] by the score |W_ij| * ||X_j|| (col_norms: HessianAccumulator.col_norms()).

    Unstructured: the lowest-scoring int(K * sparsity) of every output row are pruned (the paper's
    per-output comparison group); "2:4" / "4:8": the n highest of every m consecutive columns are kept.
    None for a dense spec.
    """
    W = prepare_weight(weight)
    kind, arg = parse_sparsity(sparsity)
    norms = _check_norms(col_norms, W.shape[1])
    if kind == "dense":
        return None
    score = W.abs().double() * norms.to(device=W.device, dtype=torch.float64)
    if kind == "nm":
        return nm_mask(score, *arg)
    return unstructured_mask(score, arg, per_row=True)


def wanda(weight: torch.Tensor, col_norms: torch.Tensor, sparsity, bits: int | None = None, group_size: int = 128,
          symmetric: bool = True, *, scale_dtype: torch.dtype = torch.float16) -> LayerResult:
    """Prune by wanda_mask, then (bits given) round-to-nearest quantize the kept weights (rtn with the
    mask: ranges over kept entries, pruned entries exactly 0)."""
    check_bits(bits, allow_none=True)
    mask = wanda_mask(weight, col_norms, sparsity)
    return prune_then_rtn(weight, mask, sparsity_spec(sparsity), bits, group_size, symmetric, scale_dtype)

