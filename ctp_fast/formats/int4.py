"""Group-wise int4 weights: quantization (round to nearest), packing for the kernels, and the
pure-torch reference `unpack` that defines what the packed bytes mean.

Meaning. A weight W [N, K] is stored column-permuted when an act-order permutation `perm` is given
(packed column j holds original column perm[j]; GPTQ's g_idx is then g_idx[perm[j]] = j // g).
Codes q are integers 0..15, groups run along the (permuted) columns in runs of `group_size`
(the last one may be shorter), and W[n, perm[j]] = (q[n, j] - zero[n, g]) * scale[n, g] with
g = j // group_size; symmetric weights have zero = 8.

Layout (what the CPU kernels read, see csrc/cpu/int4_kernels.h): rows in blocks of 32;
qweight[b, j, i] holds q[32b + i, j] in its low nibble and q[32b + 16 + i, j] in its high nibble;
scales/zeros are [blocks, groups, 32]. Rows past N are padding with zero codes and scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMAT_NAME = "int4"
FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 32


def _check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES} (-1 = per output channel), got {group_size!r}")


def rtn_quantize(weight: torch.Tensor, group_size: int, symmetric: bool):
    """Round-to-nearest group quantization of a [N, K] weight (GPTQ's conventions).

    Returns integer codes [N, K] in 0..15, scales [N, G] (fp32) and zeros [N, G] (integers 0..15;
    all 8 when symmetric). Symmetric: scale = 2 max|w| / 15, zero 8. Asymmetric: the group's range
    widened to include 0, scale = range / 15, zero = round(-min / scale).
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    groups = math.ceil(k / g)
    w = weight.detach().float()
    pad = groups * g - k
    wp = torch.nn.functional.pad(w, (0, pad)).view(n, groups, g)
    if pad:  # the short last group must not see the padding zeros as data
        valid = torch.arange(groups * g).view(groups, g) < k
        lo = torch.where(valid, wp, torch.full_like(wp, float("inf"))).amin(-1)
        hi = torch.where(valid, wp, torch.full_like(wp, float("-inf"))).amax(-1)
    else:
        lo, hi = wp.amin(-1), wp.amax(-1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = 2 * amax / 15
        zero = torch.full_like(scale, 8)
    else:
        scale = (hi - lo) / 15
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(wp / scale[..., None]) + zero[..., None], 0, 15)
    codes = q.view(n, groups * g)[:, :k].to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


@dataclass
class Int4Weight:
    """A packed int4 weight. Build with `Int4Weight.pack(weight, ...)` or `from_codes(...)`."""

    qweight: torch.Tensor        # uint8 [ceil(N/32), K, 16]
    scales: torch.Tensor         # fp32 / fp16 / bf16 [ceil(N/32), G, 32]
    zeros: torch.Tensor | None   # uint8 [ceil(N/32), G, 32]; None = symmetric (zero 8)
    perm: torch.Tensor | None    # int64 [K] act-order column order; None = identity
    out_features: int
    group_size: int              # 32, 64, 128 or -1 (per output channel)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def kernel_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def ngroups(self) -> int:
        return math.ceil(self.in_features / self.kernel_group_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def pack(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float16, perm: torch.Tensor | None = None) -> "Int4Weight":
        """Quantize a dense [out_features, in_features] weight by round-to-nearest and pack it.

        perm: optional act-order column order (a permutation of range(in_features)); groups are then
        formed over the columns in that order.
        """
        _check_weight(weight)
        _check_group_size(group_size)
        if perm is not None:
            perm = _check_perm(perm, weight.shape[1])
            weight = weight[:, perm]
        codes, scales, zeros = rtn_quantize(weight, group_size, symmetric)
        return cls.from_codes(codes, scales, None if symmetric else zeros, group_size, perm, scale_dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, perm: torch.Tensor | None = None,
                   scale_dtype: torch.dtype = torch.float16) -> "Int4Weight":
        """Pack integer codes [N, K] (0..15, columns in packed order), scales [N, G] and zeros [N, G]
        (None: symmetric) computed by any quantizer (RTN, GPTQ, ...)."""
        _check_group_size(group_size)
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype}")
        if codes.dim() != 2:
            raise ValueError(f"codes: expected a 2-D [out_features, in_features] tensor, got shape {tuple(codes.shape)}")
        n, k = codes.shape
        g = k if group_size == -1 else group_size
        groups = math.ceil(k / g)
        if scales.shape != (n, groups):
            raise ValueError(f"scales: expected shape {(n, groups)} for {k} columns in groups of {g}, got {tuple(scales.shape)}")
        if zeros is not None and zeros.shape != (n, groups):
            raise ValueError(f"zeros: expected shape {(n, groups)}, got {tuple(zeros.shape)}")
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError("codes: int4 codes must lie in 0..15")
        if perm is not None:
            perm = _check_perm(perm, k)
        blocks = math.ceil(n / BLOCK)
        pad = blocks * BLOCK - n
        q = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).view(blocks, 2, 16, k)
        qweight = (q[:, 0] | (q[:, 1] << 4)).permute(0, 2, 1).contiguous()  # [blocks, K, 16]

        def rows_to_blocks(t, dtype):
            t = torch.nn.functional.pad(t.to(dtype), (0, 0, 0, pad))
            return t.view(blocks, BLOCK, groups).permute(0, 2, 1).contiguous()

        return cls(qweight=qweight, scales=rows_to_blocks(scales, scale_dtype),
                   zeros=None if zeros is None else rows_to_blocks(zeros, torch.uint8),
                   perm=perm, out_features=n, group_size=group_size)

    # ------------------------------------------------------------------ reference meaning
    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (packed column order), int16."""
        blocks, k, _ = self.qweight.shape
        lo = self.qweight & 15
        hi = self.qweight >> 4
        q = torch.stack([lo, hi], 1).permute(0, 1, 3, 2).reshape(blocks * BLOCK, k)
        return q[: self.out_features].to(torch.int16)

    def _per_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 1).reshape(-1, t.shape[1])[: self.out_features]

    def unpack(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features] in the original column order."""
        g = self.kernel_group_size
        col_group = torch.arange(self.in_features) // g
        scales = self._per_row(self.scales).float()[:, col_group]
        zeros = 8.0 if self.zeros is None else self._per_row(self.zeros).float()[:, col_group]
        w = (self.codes().float() - zeros) * scales
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (packing padding of the last 32-row block included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ------------------------------------------------------------------ state dict
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    def config(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "bits": 4, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_order": self.perm is not None,
                "in_features": self.in_features, "out_features": self.out_features}

    def state_dict(self) -> dict:
        return {**self.tensors(), "config": self.config()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Int4Weight":
        """Rebuild from `state_dict()`, checking every tensor against the config."""
        cfg = state.get("config")
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
            raise ValueError(f"not an {FORMAT_NAME} weight state: config is {cfg!r}")
        if cfg.get("version") != FORMAT_VERSION:
            raise ValueError(f"{FORMAT_NAME} format version {cfg.get('version')!r} is not supported "
                             f"(this ctp_fast reads version {FORMAT_VERSION})")
        for key in ("qweight", "scales"):
            if key not in state:
                raise ValueError(f"{FORMAT_NAME} weight state is missing {key!r}")
        w = cls(qweight=state["qweight"], scales=state["scales"], zeros=state.get("zeros"),
                perm=state.get("perm"), out_features=int(cfg["out_features"]), group_size=int(cfg["group_size"]))
        w.validate(expect_in=int(cfg["in_features"]), expect_symmetric=bool(cfg["symmetric"]),
                   expect_act_order=bool(cfg["act_order"]))
        return w

    def validate(self, expect_in: int | None = None, expect_symmetric: bool | None = None,
                 expect_act_order: bool | None = None) -> None:
        """Raise ValueError naming the first tensor that disagrees with the format."""
        _check_group_size(self.group_size)
        blocks = math.ceil(self.out_features / BLOCK)
        k = self.in_features
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 3 or self.qweight.shape[::2] != (blocks, 16):
            raise ValueError(f"qweight: expected uint8 [{blocks}, K, 16] for out_features={self.out_features}, "
                             f"got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if expect_in is not None and k != expect_in:
            raise ValueError(f"qweight: expected in_features={expect_in}, got {k}")
        want = (blocks, self.ngroups, BLOCK)
        if self.scales.dtype not in SCALE_DTYPES or tuple(self.scales.shape) != want:
            raise ValueError(f"scales: expected float32/float16/bfloat16 {want}, got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")
        if expect_symmetric is not None and expect_symmetric != (self.zeros is None):
            raise ValueError("zeros: config says symmetric=%s but zeros are %s" %
                             (expect_symmetric, "absent" if self.zeros is None else "present"))
        if self.zeros is not None and (self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != want):
            raise ValueError(f"zeros: expected uint8 {want}, got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if expect_act_order is not None and expect_act_order != (self.perm is not None):
            raise ValueError("perm: config says act_order=%s but perm is %s" %
                             (expect_act_order, "absent" if self.perm is None else "present"))
        if self.perm is not None:
            _check_perm(self.perm, k)

    def to(self, device) -> "Int4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Int4Weight(move(self.qweight), move(self.scales), move(self.zeros), move(self.perm),
                          self.out_features, self.group_size)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty tensor, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: contains NaN or infinity")


def _check_perm(perm: torch.Tensor, k: int) -> torch.Tensor:
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != k or perm.is_floating_point():
        raise ValueError(f"perm: expected an integer permutation of range({k}), got {perm.dtype} {tuple(perm.shape)}")
    perm = perm.to(torch.int64).contiguous()
    if not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"perm: expected a permutation of range({k}) (each column exactly once)")
    return perm
