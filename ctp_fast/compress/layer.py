"""What the layer-level algorithms (rtn, gptq, sparsegpt, wanda, magnitude) share: the result type,
calibration statistics, argument checks, the quantization grid and the OBS column sweep.

Conventions (see formats/base.py): codes, scales, zeros and mask are in the *packed* column order
(packed column j = original column perm[j]); `LayerResult.weight` is in the original order.
Scales are rounded to the dtype they will be stored in (`scale_dtype`, fp16 by default) *while* the
algorithms run, so the error feedback of GPTQ / SparseGPT sees the weights the kernels will compute
with and `to_packed().unpack()` equals `weight` exactly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..formats.base import SCALE_DTYPES, check_weight, quantize
from .magnitude import drop_lowest, nm_mask, parse_sparsity

BITS = (3, 4, 8)


# ---------------------------------------------------------------------------------------- result
@dataclass
class LayerResult:
    """One compressed nn.Linear weight [N, K].

    codes:   uint8 [N, K] in packed column order (None: pruned only, not quantized); pruned entries
             hold the zero point.
    scales:  fp32 [N, G] (values exactly representable in `scale_dtype`); None when not quantized.
    zeros:   uint8 [N, G], or None for symmetric (zero point 2^(bits-1)) or not quantized.
    perm:    int64 [K] act-order permutation (packed column j = original column perm[j]) or None.
    mask:    bool [N, K] kept entries in packed column order, or None (dense).
    weight:  fp32 [N, K] dense weight this result represents, original column order (pruned entries 0,
             quantized entries dequantized): equals `to_packed().unpack()`.
    sparsity: the spec the mask realizes: None, "2:4", "4:8" or a fraction.
    loss:    the OBS proxy loss sum (w - q)^2 / (2 d^2) of GPTQ / SparseGPT (None for the others).
    """

    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    mask: torch.Tensor | None
    weight: torch.Tensor
    bits: int | None
    group_size: int | None
    sparsity: str | float | None
    scale_dtype: torch.dtype = torch.float16
    loss: float | None = None

    def __post_init__(self):
        shape = tuple(self.weight.shape)
        for name in ("codes", "mask"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if (self.codes is None) != (self.scales is None) or (self.codes is None) != (self.bits is None):
            raise ValueError("codes, scales and bits: give all three (quantized) or none (pruned only)")

    @classmethod
    def pruned(cls, weight: torch.Tensor, mask: torch.Tensor | None, sparsity=None, *, loss: float | None = None,
               scale_dtype: torch.dtype = torch.float16) -> "LayerResult":
        """A prune-only result: weight * mask in fp32 (codes None). sparsity: the spec the mask realizes
        (default: inferred from the mask)."""
        check_weight(weight)
        w = weight.detach().to(torch.float32)
        mask = check_mask(mask, w.shape)
        spec = describe_mask(mask) if sparsity is None else sparsity_spec(sparsity)
        if mask is not None:
            w = w * mask
        elif w is weight:
            w = w.clone()
        return cls(codes=None, scales=None, zeros=None, perm=None, mask=mask, weight=w, bits=None, group_size=None,
                   sparsity=spec, scale_dtype=scale_dtype, loss=loss)

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def kept(self) -> torch.Tensor | None:
        """The mask in the original column order (None: dense)."""
        if self.mask is None or self.perm is None:
            return self.mask
        return torch.empty_like(self.mask).index_copy_(1, self.perm, self.mask)

    @property
    def actual_sparsity(self) -> float:
        return 0.0 if self.mask is None else 1.0 - self.mask.float().mean().item()

    def packed_format(self):
        """The PackedWeight class `to_packed` uses: format_for(sparsity, mask); a 2:4 mask with an
        act-order perm goes to the unstructured format (the 2:4 layout cannot be permuted)."""
        from ..formats import Sparse24Weight, UnstructuredWeight
        from ..nn.compressed_linear import format_for  # lazy: nn imports this package

        fmt = format_for(self.sparsity, self.mask)
        if fmt is Sparse24Weight and self.perm is not None:
            fmt = UnstructuredWeight
        return fmt

    def to_packed(self, scale_dtype: torch.dtype | None = None):
        """The packed weight (PackedWeight subclass by `packed_format()`); unpack() equals `weight`.

        scale_dtype: None = the dtype the scales were fitted for; another one must hold them exactly
        (float32 always does).
        """
        if not self.quantized:
            raise ValueError("to_packed: this weight was pruned but not quantized (bits=None), so there are no "
                             "codes to pack; keep it as a dense nn.Linear holding `weight` (see to_module), or "
                             "compress with bits=4")
        dt = self.scale_dtype if scale_dtype is None else scale_dtype
        if dt not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {dt}")
        if dt != self.scale_dtype and not torch.equal(self.scales.to(dt).float(), self.scales):
            raise ValueError(f"scale_dtype: the scales were fitted for {self.scale_dtype} and {dt} cannot hold them "
                             f"exactly (the packed weight would differ from `weight`); rerun with scale_dtype={dt}")
        return self.packed_format().from_codes(self.codes, self.scales, self.zeros, self.group_size, self.perm, dt,
                                               bits=self.bits, mask=self.mask)

    def to_module(self, bias: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None):
        """A CompressedLinear when quantized, else an nn.Linear holding the pruned fp32 weight."""
        from ..nn.compressed_linear import CompressedLinear

        if self.quantized:
            return CompressedLinear(self.to_packed(scale_dtype), bias)
        n, k = self.weight.shape
        lin = torch.nn.Linear(k, n, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin


# ---------------------------------------------------------------------------------------- statistics
class HessianAccumulator:
    """Calibration statistics of one linear layer's input, K = in_features.

    add(x) with x [..., K] (every leading index is one sample, i.e. one token). Keeps
        H = 2/n sum_t x_t x_t^T        (GPTQ's running-average form: H *= n/(n+b); H += (2/(n+b)) X^T X)
        s = sum_t x_t^2                (per column, for Wanda: col_norms() = sqrt(s))
    in `dtype` (float64 by default; float32 halves the K^2 memory). hessian=False keeps only the column
    norms (Wanda, magnitude) and never allocates the K x K matrix.
    `hook` is a forward hook: linear.register_forward_hook(acc.hook).
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64, device=None, hessian: bool = True):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features: expected a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.in_features, self.dtype = in_features, dtype
        self.n = 0
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device) if hessian else None
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected a tensor [..., {self.in_features}], got {getattr(x, 'shape', type(x))}")
        x = x.detach().reshape(-1, self.in_features)
        b = x.shape[0]
        if b == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("x: calibration input contains NaN or infinity")
        x64 = x.to(device=self.sq.device, dtype=torch.float64)
        self.sq += (x64 * x64).sum(0)
        if self.H is not None:
            total = self.n + b
            self.H.mul_(self.n / total)
            xs = x.to(device=self.H.device, dtype=self.dtype) * math.sqrt(2.0 / total)
            self.H.addmm_(xs.T, xs)
        self.n += b

    def hook(self, module, args, output) -> None:
        self.add(args[0])

    def _need_samples(self):
        if self.n == 0:
            raise ValueError("HessianAccumulator: no calibration samples were added")

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X [K, K] (a copy)."""
        if self.H is None:
            raise ValueError("HessianAccumulator: created with hessian=False (column norms only)")
        self._need_samples()
        return self.H.clone()

    def col_norms(self) -> torch.Tensor:
        """||X_k||_2 over all samples, [K] float64 (Wanda's activation norms)."""
        self._need_samples()
        return self.sq.sqrt()


# ---------------------------------------------------------------------------------------- checks
def check_bits(bits, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or bits not in BITS:
        none = " (or None to prune only)" if allow_none else ""
        raise ValueError(f"bits: expected 3, 4 or 8{none}, got {bits!r}")


def check_scale_dtype(scale_dtype) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype!r}")


def check_hessian(H, k: int) -> torch.Tensor:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (k, k):
        raise ValueError(f"H: expected a [{k}, {k}] Hessian (in_features x in_features), got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not H.is_floating_point() or not torch.isfinite(H).all():
        raise ValueError("H: expected a finite floating-point tensor")
    if not (torch.diagonal(H) != 0).any():
        raise ValueError("H: all-zero diagonal (no calibration samples?)")
    return H


def check_mask(mask, shape) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return mask.bool()


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_damp(damp) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp: expected a non-negative fraction of mean(diag(H)), got {damp!r}")
    return float(damp)


def sparsity_spec(sparsity):
    """Normalize a sparsity spec (parse_sparsity's checks): None, "2:4", "4:8" or a fraction."""
    kind, arg = parse_sparsity(sparsity)
    if kind == "dense":
        return None
    return f"{arg[0]}:{arg[1]}" if kind == "nm" else arg


def describe_mask(mask: torch.Tensor | None):
    """The sparsity spec a mask realizes: None, "2:4" / "4:8" when it keeps exactly n of every m
    consecutive columns, else the pruned fraction."""
    if mask is None:
        return None
    n, k = mask.shape
    for a, m in ((2, 4), (4, 8)):
        if k % m == 0 and bool((mask.view(n, k // m, m).sum(-1) == a).all()):
            return f"{a}:{m}"
    s = 1.0 - mask.float().mean().item()
    return s if s > 0 else None


# ---------------------------------------------------------------------------------------- grid
def round_scales(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales rounded to what `scale_dtype` stores, clamped into its positive normal range."""
    fi = torch.finfo(scale_dtype)
    return scale.to(scale_dtype).float().clamp(min=fi.tiny, max=fi.max).to(scale_dtype).float()


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool, keep: torch.Tensor | None, scale_dtype: torch.dtype):
    """Scale and zero (fp32 [N]) of one group (all columns of w), over kept entries only, by
    formats.base.quantize's conventions, the scale rounded to `scale_dtype`."""
    _, scale, zero = quantize(w, bits, -1, symmetric, keep)
    return round_scales(scale[:, 0], scale_dtype), zero[:, 0].float()


def quantize_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-nearest codes (float) of w on the grid (scale, zero), broadcasting."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def dequantize(codes, scales, zeros, group_size: int, bits: int, mask=None, perm=None) -> torch.Tensor:
    """The fp32 weight [N, K] (original column order) of codes/scales/zeros/mask in packed order,
    computed exactly as PackedWeight.unpack does."""
    n, k = codes.shape
    col_group = torch.arange(k, device=codes.device) // (k if group_size == -1 else group_size)
    s = scales.float()[:, col_group]
    z = float(2 ** (bits - 1)) if zeros is None else zeros.float()[:, col_group]
    w = (codes.float() - z) * s
    if mask is not None:
        w = w * mask
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm, w)
    return w


def result_from_codes(codes, scales, zeros, *, bits, group_size, symmetric, mask, perm, sparsity, scale_dtype,
                      loss=None) -> LayerResult:
    """A LayerResult from float codes / fp32 scales / float zeros in packed order."""
    codes = codes.to(torch.uint8)
    zeros = None if symmetric else zeros.to(torch.uint8)
    weight = dequantize(codes, scales, zeros, group_size, bits, mask, perm)
    return LayerResult(codes=codes, scales=scales.float().contiguous(), zeros=zeros, perm=perm, mask=mask,
                       weight=weight, bits=bits, group_size=group_size, sparsity=sparsity, scale_dtype=scale_dtype,
                       loss=loss)


# ---------------------------------------------------------------------------------------- OBS sweep
def inverse_hessian_factor(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None):
    """GPTQ's preprocessing of H (float64): dead columns (H_ii == 0) get H_ii = 1, optional act-order
    permutation, dampening damp * mean(diag H), then the upper Cholesky factor of H^-1.
    Returns (U fp64 [K, K], dead bool [K] in the original order)."""
    H = H.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    torch.diagonal(H).add_(damp * torch.diagonal(H).mean())
    # With J the order reversal and J H J = L L^T: H^-1 = (J L^-T J)(J L^-1 J), and U = J L^-1 J is
    # upper triangular: one Cholesky and one triangular inverse instead of inverting H and factoring H^-1.
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item() != 0:
        raise ValueError(f"H: not positive definite after dampening with damp={damp} (a trailing minor "
                         f"fails); pass a larger damp or check the calibration statistics")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    if not torch.isfinite(U).all():
        raise ValueError(f"H: its inverse is numerically singular with damp={damp}; pass a larger damp")
    return U, dead


@contextmanager
def single_thread():
    """The column sweep is thousands of small ops: threads only add synchronisation (and, on a busy
    machine, waits on descheduled threads that made it 10x slower), so it runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@single_thread()
def obs_sweep(W: torch.Tensor, U: torch.Tensor, *, bits: int | None, group_size: int, symmetric: bool,
              scale_dtype: torch.dtype, block_size: int, mask: torch.Tensor | None = None,
              prune: tuple | None = None):
    """The column sweep shared by GPTQ and SparseGPT (Frantar et al. 2022, Frantar & Alistarh 2023).

    W [N, K] fp32 (packed column order, modified in place), U the upper Cholesky factor of H^-1 in
    the same order. Each column is quantized (bits) and/or pruned, and its error
    err = (w - q) / U_jj is spread over the later columns: immediately within the current block of
    `block_size` columns, lazily (one matmul) for the columns after it.
      mask:  fixed kept entries (prune-then-quantize); pruned entries are forced to 0.
      prune: ("unstructured", s): per block, prune the exact share of the lowest w^2 / U_jj^2 of the
             block (adaptive mask selection); ("nm", (n, m)): the n of every m columns with the
             highest w^2 / U_jj^2 are kept, chosen when the sweep reaches the m columns.
    Quantization groups run along the packed order; a group's scale/zero come from the current
    (error-updated) weights when the sweep reaches its first column, over the entries kept (for
    columns whose mask is not chosen yet, those the same rule would keep now).
    Returns (codes uint8 or None, scales fp32 [N, G], zeros float [N, G], keep bool [N, K],
    Q fp32 [N, K] (the pruned weight when not quantizing, else None), loss).
    """
    n, k = W.shape
    U = U.to(W.dtype)
    d = torch.diagonal(U).clone()
    keep = torch.ones(n, k, dtype=torch.bool, device=W.device) if mask is None else mask.clone()
    quant = bits is not None
    g = k if group_size == -1 else group_size
    ngroups = math.ceil(k / g)
    maxq = 2 ** bits - 1 if quant else 0
    codes = torch.empty(n, k, dtype=torch.uint8, device=W.device) if quant else None
    scales = torch.ones(n, ngroups, device=W.device) if quant else None
    zeros = torch.zeros(n, ngroups, device=W.device) if quant else None
    Q = None if quant else torch.empty_like(W)  # quantized results are rebuilt from the codes
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    kind, arg = prune if prune is not None else (None, None)
    drop_total = int(n * k * arg) if kind == "unstructured" else 0
    scale = zero = None
    masked = mask is not None or kind is not None
    zero_col = torch.zeros(n, device=W.device)
    d_list = d.tolist()  # Python floats (exact fp32 values): no 0-d tensor per column

    def provisional_keep(cur, j):
        """Which of cur = current weights of columns j.. the active rule would keep now."""
        score = cur ** 2 / d[j:j + cur.shape[1]] ** 2
        if kind == "nm":
            return nm_mask(score, *arg)
        return drop_lowest(score, int(score.numel() * arg))

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if kind == "unstructured":
            drop = drop_total * i2 // k - drop_total * i1 // k  # exact total over the blocks
            keep[:, i1:i2] = drop_lowest(W1 ** 2 / d[i1:i2] ** 2, drop)
        for i in range(count):
            j = i1 + i
            if kind == "nm" and j % arg[1] == 0:
                m = arg[1]
                keep[:, j:j + m] = nm_mask(W1[:, i:i + m] ** 2 / d[j:j + m] ** 2, *arg)
            if quant and j % g == 0:
                end = min(j + g, k)
                cur = W1[:, i:min(end, i2) - i1]
                if end > i2:  # the group runs past this block: add the pending lazy update
                    rest = W[:, i2:end] - Err1[:, :i] @ U[i1:j, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                if kind is None:
                    kg = None if mask is None else keep[:, j:end]
                elif kind == "nm":
                    kg = provisional_keep(cur, j)
                else:  # unstructured: this block's columns are decided, later ones provisional
                    kg = keep[:, j:min(end, i2)]
                    if end > i2:
                        kg = torch.cat([kg, provisional_keep(cur[:, i2 - j:], i2)], dim=1)
                scale, zero = fit_grid(cur, bits, symmetric, kg, scale_dtype)
                scales[:, j // g], zeros[:, j // g] = scale, zero
            w = W1[:, i]
            if quant:
                qc = quantize_on_grid(w, scale, zero, maxq)
                q = torch.sub(qc, zero).mul_(scale)
            else:
                qc, q = None, w
            if masked:
                kc = keep[:, j]
                q = torch.where(kc, q, zero_col)
                if quant:
                    qc = torch.where(kc, qc, zero)
            if quant:
                codes[:, j] = qc
            else:
                Q[:, j] = q
            err = Err1[:, i]
            torch.sub(w, q, out=err).div_(d_list[j])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
        loss += (Err1.double() ** 2).sum() / 2
        if i2 < k:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return codes, scales, zeros, keep, Q, float(loss)


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    check_weight(weight)
    return weight.detach().to(torch.float32).clone()


__all__ = ["BITS", "HessianAccumulator", "LayerResult", "check_bits", "describe_mask", "dequantize", "fit_grid",
           "inverse_hessian_factor", "obs_sweep", "quantize_on_grid", "result_from_codes", "round_scales",
           "sparsity_spec"]
