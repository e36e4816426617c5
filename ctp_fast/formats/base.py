"""What every packed weight format shares: group-wise quantization, scale/zero layout, the reference
`unpack`, sizes, state dicts and validation. The formats (dense.py, sparse24.py, unstructured.py) only
say how codes (and which positions are kept) are laid out for the kernels.

Meaning, for every format. A weight W [N, K] may be stored column-permuted (act-order, `perm`: packed
column j holds original column perm[j]; GPTQ's g_idx is then g_idx[perm[j]] = j // group_size).
Integer codes q in 0..2^bits-1 are grouped along the packed columns in runs of `group_size` (-1: one
group per row; the last group may be shorter), and
    W[n, perm[j]] = mask[n, j] * (q[n, j] - zero[n, g]) * scale[n, g],   g = j // group_size,
with zero = 2^(bits-1) for symmetric weights and mask = 1 for dense ones.

Rows are packed in blocks of 32 (one SIMD lane per row); scales and zeros are [blocks, groups, 32].
Rows past N are padding with zero scales.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 32
LAYOUTS = {"dense": 0, "sparse24": 1, "unstructured": 2}
_REGISTRY: dict[str, type["PackedWeight"]] = {}


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES} (-1 = per output channel), got {group_size!r}")


def check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty tensor, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: contains NaN or infinity")


def check_perm(perm, k: int) -> torch.Tensor:
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != k or perm.is_floating_point():
        raise ValueError(f"perm: expected an integer permutation of range({k}), got {perm.dtype} {tuple(perm.shape)}")
    perm = perm.to(torch.int64).contiguous()
    if not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"perm: expected a permutation of range({k}) (each column exactly once)")
    return perm


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             mask: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32):
    """Round-to-nearest group quantization of a [N, K] weight, GPTQ's conventions.

    Only kept entries (mask True) shape the ranges; pruned entries get the zero point as code.
    Returns integer codes [N, K] (uint8), scales [N, G] (fp32, rounded to `scale_dtype` before the codes
    are chosen), zeros [N, G] (uint8; 2^(bits-1) when symmetric). Symmetric: scale = 2 max|w| / maxq.
    Asymmetric: the range widened to include 0,
    scale = range / maxq, zero = round(-min / scale).
    """
    maxq = 2 ** bits - 1
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    groups = math.ceil(k / g)
    w = weight.detach().float()
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
    pad = groups * g - k
    wp = torch.nn.functional.pad(w, (0, pad)).view(n, groups, g)
    kp = torch.nn.functional.pad(keep, (0, pad)).view(n, groups, g)  # padding counts as pruned
    lo = torch.where(kp, wp, torch.full_like(wp, float("inf"))).amin(-1).clamp(max=0)
    hi = torch.where(kp, wp, torch.full_like(wp, float("-inf"))).amax(-1).clamp(min=0)
    lo, hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)  # all-pruned groups
    if symmetric:
        scale = 2 * torch.maximum(-lo, hi) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.to(scale_dtype).float()  # codes are chosen against the scale that will be stored
    q = torch.clamp(torch.round(wp / scale[..., None]) + zero[..., None], 0, maxq)
    q = torch.where(kp, q, zero[..., None].expand_as(q))
    codes = q.view(n, groups * g)[:, :k].to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


def rows_to_blocks(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] per-row values -> [blocks, G, 32] (zero padded)."""
    n, groups = t.shape
    blocks = math.ceil(n / BLOCK)
    t = torch.nn.functional.pad(t.to(dtype), (0, 0, 0, blocks * BLOCK - n))
    return t.view(blocks, BLOCK, groups).permute(0, 2, 1).contiguous()


def blocks_to_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])[:n]


class PackedWeight:
    """A packed low-bit weight. Subclasses set FORMAT and LAYOUT and implement _pack / codes / mask."""

    FORMAT: ClassVar[str]
    LAYOUT: ClassVar[str]
    BITS: ClassVar[tuple[int, ...]] = (4,)
    EXTRA_TENSORS: ClassVar[tuple[str, ...]] = ()  # layout tensors besides qweight
    VERSION: ClassVar[int] = FORMAT_VERSION  # of this format's byte layout; bumped when the layout changes

    def __init__(self, qweight, scales, zeros, perm, out_features: int, in_features: int, group_size: int,
                 bits: int = 4, **extra):
        self.qweight, self.scales, self.zeros, self.perm = qweight, scales, zeros, perm
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.group_size, self.bits = int(group_size), int(bits)
        for key in self.EXTRA_TENSORS:
            setattr(self, key, extra.pop(key, None))
        if extra:
            raise TypeError(f"{type(self).__name__}: unexpected tensors {sorted(extra)}")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.FORMAT] = cls

    # ------------------------------------------------------------------ sizes
    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def kernel_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def ngroups(self) -> int:
        return math.ceil(self.in_features / self.kernel_group_size)

    @property
    def nblocks(self) -> int:
        return math.ceil(self.out_features / BLOCK)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (padding of the last 32-row block included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / (self.out_features * self.in_features)

    # ------------------------------------------------------------------ construction
    @classmethod
    def pack(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = True, bits: int = 4,
             scale_dtype: torch.dtype = torch.float16, perm: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> "PackedWeight":
        """Quantize a dense [out_features, in_features] weight by round to nearest and pack it.

        perm: act-order column order (groups follow it). mask: kept entries, for the sparse formats.
        """
        check_weight(weight)
        check_group_size(group_size)
        cls._check_bits(bits)
        if perm is not None:
            perm = check_perm(perm, weight.shape[1])
            weight = weight[:, perm]
            mask = None if mask is None else mask[:, perm]
        mask = cls._check_mask(mask, weight.shape)
        codes, scales, zeros = quantize(weight, bits, group_size, symmetric, mask, scale_dtype)
        return cls.from_codes(codes, scales, None if symmetric else zeros, group_size, perm, scale_dtype,
                              bits=bits, mask=mask)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                   perm: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16, bits: int = 4,
                   mask: torch.Tensor | None = None) -> "PackedWeight":
        """Pack integer codes [N, K] (columns in packed order), scales [N, G] and zeros [N, G] (None:
        symmetric) from any quantizer (RTN, GPTQ, SparseGPT ...); mask [N, K] for the sparse formats."""
        check_group_size(group_size)
        cls._check_bits(bits)
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype}")
        if codes.dim() != 2:
            raise ValueError(f"codes: expected a 2-D [out_features, in_features] tensor, got shape {tuple(codes.shape)}")
        n, k = codes.shape
        groups = math.ceil(k / (k if group_size == -1 else group_size))
        if tuple(scales.shape) != (n, groups):
            raise ValueError(f"scales: expected shape {(n, groups)} for {k} columns and group_size {group_size}, "
                             f"got {tuple(scales.shape)}")
        if zeros is not None and tuple(zeros.shape) != (n, groups):
            raise ValueError(f"zeros: expected shape {(n, groups)}, got {tuple(zeros.shape)}")
        if codes.min() < 0 or codes.max() > 2 ** bits - 1:
            raise ValueError(f"codes: {bits}-bit codes must lie in 0..{2 ** bits - 1}")
        if perm is not None:
            perm = check_perm(perm, k)
        mask = cls._check_mask(mask, (n, k))
        zero_codes = torch.full((n, groups), 2 ** (bits - 1)) if zeros is None else zeros
        tensors = cls._pack(codes.to(torch.uint8), mask, zero_codes.to(torch.uint8), group_size, bits)
        return cls(scales=rows_to_blocks(scales, scale_dtype),
                   zeros=None if zeros is None else rows_to_blocks(zeros, torch.uint8), perm=perm,
                   out_features=n, in_features=k, group_size=group_size, bits=bits, **tensors)

    @classmethod
    def _check_bits(cls, bits: int) -> None:
        if bits not in cls.BITS:
            raise ValueError(f"bits: the {cls.FORMAT} format stores {' or '.join(map(str, cls.BITS))}-bit codes, "
                             f"got {bits!r}")

    @classmethod
    def _check_mask(cls, mask, shape):
        return None

    # ------------------------------------------------------------------ reference meaning
    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] in packed column order (int16); pruned entries hold the zero point."""
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        """Kept entries [N, K] in packed column order."""
        return torch.ones(self.out_features, self.in_features, dtype=torch.bool)

    def unpack(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features] in the original column order."""
        col_group = torch.arange(self.in_features) // self.kernel_group_size
        scales = blocks_to_rows(self.scales, self.out_features).float()[:, col_group]
        zeros = (float(2 ** (self.bits - 1)) if self.zeros is None
                 else blocks_to_rows(self.zeros, self.out_features).float()[:, col_group])
        w = (self.codes().float() - zeros) * scales * self.mask()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    # ------------------------------------------------------------------ kernels
    def kernel_args(self) -> tuple:
        """Arguments of torch.ops.ctp_fast.packed_linear after x (see csrc/bindings.cpp), bias excluded."""
        return (self.qweight, self.scales, self.zeros, self.perm, getattr(self, "masks", None),
                getattr(self, "offsets", None))

    def kernel_ints(self) -> tuple:
        return (LAYOUTS[self.LAYOUT], self.bits, self.out_features, self.in_features, self.kernel_group_size)

    # ------------------------------------------------------------------ state dict
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        for key in ("zeros", "perm", *self.EXTRA_TENSORS):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def config(self) -> dict:
        return {"format": self.FORMAT, "version": self.VERSION, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_order": self.perm is not None,
                "in_features": self.in_features, "out_features": self.out_features}

    def state_dict(self) -> dict:
        return {**self.tensors(), "config": self.config()}

    @staticmethod
    def from_state_dict(state: dict) -> "PackedWeight":
        """Rebuild any format from `state_dict()`, checking every tensor against the config."""
        cfg = state.get("config")
        if not isinstance(cfg, dict) or cfg.get("format") not in _REGISTRY:
            raise ValueError(f"not a ctp_fast packed weight: config is {cfg!r} (known formats: {sorted(_REGISTRY)})")
        cls = _REGISTRY[cfg["format"]]
        if cfg.get("version") != cls.VERSION:
            raise ValueError(f"{cfg['format']} format version {cfg.get('version')!r} is not supported "
                             f"(this ctp_fast reads version {cls.VERSION}; repack the weight from its codes)")
        for key in ("qweight", "scales", *cls.EXTRA_TENSORS):
            if key not in state:
                raise ValueError(f"{cls.FORMAT} weight state is missing {key!r}")
        try:
            w = cls(qweight=state["qweight"], scales=state["scales"], zeros=state.get("zeros"), perm=state.get("perm"),
                    out_features=int(cfg["out_features"]), in_features=int(cfg["in_features"]),
                    group_size=int(cfg["group_size"]), bits=int(cfg.get("bits", 4)),
                    **{k: state[k] for k in cls.EXTRA_TENSORS})
        except KeyError as e:
            raise ValueError(f"{cls.FORMAT} weight config is missing {e}") from None
        w.validate(expect_symmetric=bool(cfg["symmetric"]), expect_act_order=bool(cfg["act_order"]))
        return w

    def validate(self, expect_symmetric: bool | None = None, expect_act_order: bool | None = None) -> None:
        """Raise ValueError naming the first tensor that disagrees with the format."""
        check_group_size(self.group_size)
        self._check_bits(self.bits)
        self._validate_layout()
        want = (self.nblocks, self.ngroups, BLOCK)
        if self.scales.dtype not in SCALE_DTYPES or tuple(self.scales.shape) != want:
            raise ValueError(f"scales: expected float32/float16/bfloat16 {want}, got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")
        if expect_symmetric is not None and expect_symmetric != (self.zeros is None):
            raise ValueError(f"zeros: config says symmetric={expect_symmetric} but zeros are "
                             f"{'absent' if self.zeros is None else 'present'}")
        if self.zeros is not None and (self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != want):
            raise ValueError(f"zeros: expected uint8 {want}, got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if expect_act_order is not None and expect_act_order != (self.perm is not None):
            raise ValueError(f"perm: config says act_order={expect_act_order} but perm is "
                             f"{'absent' if self.perm is None else 'present'}")
        if self.perm is not None:
            check_perm(self.perm, self.in_features)

    def _validate_layout(self) -> None:
        raise NotImplementedError

    def _expect(self, name: str, dtype: torch.dtype, shape: tuple) -> None:
        t = getattr(self, name)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected {dtype} {tuple(shape)} for a {self.out_features}x{self.in_features} "
                             f"{self.FORMAT} weight, got {got}")

    def map(self, fn) -> "PackedWeight":
        """The same weight with fn applied to every stored tensor (e.g. torch.clone, or a device move)."""
        moved = {k: fn(v) for k, v in self.tensors().items()}
        return type(self)(zeros=moved.pop("zeros", None), perm=moved.pop("perm", None),
                          out_features=self.out_features, in_features=self.in_features,
                          group_size=self.group_size, bits=self.bits, **moved)

    def to(self, device):
        """The weight on `device`; on a GPU that is the CUDA layout (formats/cuda_layout.py), which
        `.to("cpu")` turns back into this format."""
        if torch.device(device).type == "cuda":
            from .cuda_layout import to_cuda_layout
            return to_cuda_layout(self, device)
        return self.map(lambda t: t.to(device))

    def __repr__(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"{type(self).__name__}({self.out_features}x{self.in_features}, {self.bits}-bit {g}, "
                f"{'sym' if self.symmetric else 'asym'}{', act-order' if self.perm is not None else ''}, "
                f"{self.bytes_per_weight:.3f} B/weight)")
