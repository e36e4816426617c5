"""Magnitude pruning masks: the calibration-free baseline (and what CompressedLinear uses by default)."""
from __future__ import annotations

import torch


def parse_sparsity(sparsity) -> tuple[str, float | tuple[int, int]]:
    """'2:4' / '4:8' -> ('nm', (n, m)); a fraction in [0, 1) -> ('unstructured', s); None/0 -> ('dense', 0)."""
    if sparsity is None or (not isinstance(sparsity, str) and float(sparsity) == 0):
        return "dense", 0.0
    if isinstance(sparsity, str):
        try:
            n, m = (int(v) for v in sparsity.split(":"))
        except ValueError:
            raise ValueError(f"sparsity: expected 'N:M' (2:4 or 4:8) or a fraction in [0, 1), got {sparsity!r}") from None
        if (n, m) not in ((2, 4), (4, 8)):
            raise ValueError(f"sparsity: only the 2:4 and 4:8 patterns are supported, got {sparsity!r}")
        return "nm", (n, m)
    s = float(sparsity)
    if not 0 <= s < 1:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    return "unstructured", s


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive input columns."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"in_features: {n}:{m} sparsity needs a multiple of {m} input columns, got {cols}")
    top = score.reshape(rows, cols // m, m).topk(n, dim=-1).indices
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, top, True).view(rows, cols)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the lowest-scoring fraction, over the whole matrix or in every row."""
    if per_row:
        drop = int(score.shape[1] * sparsity)
        mask = torch.ones_like(score, dtype=torch.bool)
        if drop:
            mask.scatter_(1, score.topk(drop, dim=1, largest=False).indices, False)
        return mask
    return drop_lowest(score, int(score.numel() * sparsity))


def drop_lowest(score: torch.Tensor, drop: int) -> torch.Tensor:
    """Keep-mask of `score` (any shape) with its `drop` lowest entries False, ties going to the lower
    flat index first: the set torch.argsort(score.flatten(), stable=True)[:drop] picks, found in O(n)
    by a k-th value instead of a sort."""
    flat = score.flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if drop > 0:
        t = flat.kthvalue(drop).values
        below = flat < t
        keep[below] = False
        keep[(flat == t).nonzero().flatten()[:drop - int(below.sum())]] = False
    return keep.view_as(score)


def magnitude_mask(weight: torch.Tensor, sparsity) -> torch.Tensor | None:
    """Kept entries by |w| for a sparsity spec (None for dense)."""
    kind, arg = parse_sparsity(sparsity)
    score = weight.detach().abs().float()
    if kind == "dense":
        return None
    if kind == "nm":
        return nm_mask(score, *arg)
    return unstructured_mask(score, arg)


def magnitude(weight: torch.Tensor, sparsity, bits: int | None = None, group_size: int = 128, symmetric: bool = True,
              *, scale_dtype: torch.dtype = torch.float16):
    """Prune by magnitude_mask, then (bits given) round-to-nearest quantize the kept weights.
    Returns a LayerResult (ctp_fast.compress.layer)."""
    from ..formats.base import check_weight
    from .rtn import prune_then_rtn  # lazy: rtn imports layer, which imports this module

    check_weight(weight)
    return prune_then_rtn(weight, magnitude_mask(weight, sparsity), sparsity, bits, group_size, symmetric,
                          scale_dtype)
