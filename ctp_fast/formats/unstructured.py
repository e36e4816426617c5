"""Unstructured sparse 4-bit weights: any mask. Layout version 2, built so that a kernel turns one 32-row
column back into the dense 4-bit column (csrc/cpu/qlinear.h) with two bit deposits (PDEP) and an XOR:

* rows are numbered in *nibble order* inside a 32-row block: nibble p of the dense 16-byte column is row
  NIBBLE_ROW[p] = (p % 2) * 16 + p // 2 (byte j holds row j low and row 16 + j high);
* masks[b, k] bit p: row NIBBLE_ROW[p] of block b keeps column k;
* qweight: per block, per column, per half (nibbles 0..15, then 16..31), the kept codes XOR the row's zero
  point, in nibble order, two per byte (low nibble first), each half padded to a whole byte; then 8 zero
  bytes, so that a kernel may always load 8 bytes at a half's start;
* offsets[b, c]: byte where column 32c of block b starts.

A pruned weight comes back as code = zero point (0 after the XOR, then XOR zero point), so the kernels run
the dense 4-bit arithmetic on it. Bytes per weight: 1/8 (masks) + (1 - sparsity)/2 (codes) + about 1/64
(half-column padding) + scales: 0.41 at 50%, 0.29 at 75%, 0.21 at 90% (g128, fp16 scales).
"""
from __future__ import annotations

import math

import torch

from .base import BLOCK, PackedWeight
from .dense import _rows_padded

NIBBLE_ROW = torch.tensor([(p % 2) * 16 + p // 2 for p in range(BLOCK)])
TAIL = 8  # zero bytes after the stream: the kernels load 8 bytes at every half-column start


def _bit_weights() -> torch.Tensor:
    return torch.tensor([1 << i for i in range(BLOCK)], dtype=torch.int64)


def _stream_positions(m: torch.Tensor):
    """m: [blocks, K, 32] kept, nibble order. Returns (nibble index in the stream of every entry [blocks, K, 32],
    byte start of every (block, column) [blocks, K], total stream bytes without the tail)."""
    halves = m.view(*m.shape[:2], 2, BLOCK // 2)
    nbytes = (halves.sum(-1) + 1) // 2  # [blocks, K, 2]
    flat = nbytes.flatten()
    start = (torch.cumsum(flat, 0) - flat).view(nbytes.shape)
    rank = torch.cumsum(halves.to(torch.int64), -1) - 1
    nib = (2 * start[..., None] + rank).view(m.shape)
    return nib, start[..., 0], int(flat.sum())


class UnstructuredWeight(PackedWeight):
    FORMAT = "unstructured"
    LAYOUT = "unstructured"
    EXTRA_TENSORS = ("masks", "offsets")
    VERSION = 2  # 1: rows ascending in one nibble stream, offsets in nibbles

    @classmethod
    def _check_mask(cls, mask, shape):
        if mask is None:
            raise ValueError("mask: the unstructured format needs the mask of kept weights")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
        return mask.bool()

    @staticmethod
    def _nibble_blocks(t: torch.Tensor) -> torch.Tensor:
        """[N, K] per-row values -> [blocks, K, 32] in nibble order (padding rows 0)."""
        return _rows_padded(t).permute(0, 2, 1)[..., NIBBLE_ROW]

    def _zero_blocks(self) -> torch.Tensor:
        """Zero point of every entry, [blocks, K, 32] uint8 in nibble order."""
        k = self.in_features
        if self.zeros is None:
            return torch.full((self.nblocks, k, BLOCK), 2 ** (self.bits - 1), dtype=torch.uint8)
        g = torch.arange(k) // self.kernel_group_size
        return self.zeros[:, g, :][..., NIBBLE_ROW]

    @classmethod
    def _pack(cls, codes, mask, zero_codes, group_size, bits):
        n, k = codes.shape
        g = torch.arange(k) // (k if group_size == -1 else group_size)
        m = cls._nibble_blocks(mask)  # [blocks, K, 32]
        q = cls._nibble_blocks(codes ^ zero_codes[:, g])
        words = (m.to(torch.int64) * _bit_weights()).sum(-1)
        masks = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        nib, start, total = _stream_positions(m)
        nibbles = torch.zeros(2 * total, dtype=torch.uint8)
        nibbles[nib[m]] = q[m].to(torch.uint8)
        packed = torch.cat([nibbles[0::2] | (nibbles[1::2] << 4), torch.zeros(TAIL, dtype=torch.uint8)])
        offsets = start[:, ::BLOCK].contiguous()
        return {"qweight": packed.contiguous(), "masks": masks.contiguous(), "offsets": offsets}

    def _mask_blocks(self) -> torch.Tensor:
        """[blocks, K, 32] bool, nibble order."""
        words = self.masks.to(torch.int64) & 0xFFFFFFFF
        return (words[..., None] & _bit_weights()) != 0

    @staticmethod
    def _to_rows(t: torch.Tensor, n: int) -> torch.Tensor:
        """[blocks, K, 32] nibble order -> [n, K]."""
        rows = torch.empty_like(t)
        rows[..., NIBBLE_ROW] = t
        return rows.permute(0, 2, 1).reshape(-1, t.shape[1])[:n]

    def mask(self) -> torch.Tensor:
        return self._to_rows(self._mask_blocks(), self.out_features)

    def codes(self) -> torch.Tensor:
        m = self._mask_blocks()
        nib, _, total = _stream_positions(m)
        stream = self.qweight[:total]
        nibbles = torch.stack([stream & 15, stream >> 4], -1).flatten()
        z = self._zero_blocks()
        q = z.clone()
        q[m] = nibbles[nib[m]] ^ z[m]
        return self._to_rows(q, self.out_features).to(torch.int16)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask().sum()) / (self.out_features * self.in_features)

    def _validate_layout(self) -> None:
        blocks, k = self.nblocks, self.in_features
        self._expect("masks", torch.int32, (blocks, k))
        self._expect("offsets", torch.int64, (blocks, math.ceil(k / BLOCK)))
        m = self._mask_blocks()
        if self.out_features % BLOCK and m[-1][..., NIBBLE_ROW >= self.out_features % BLOCK].any():
            raise ValueError(f"masks: rows past out_features={self.out_features} are marked kept")
        _, start, total = _stream_positions(m)
        if not torch.equal(start[:, ::BLOCK], self.offsets):
            raise ValueError("offsets: do not match the masks (a truncated or corrupted weight)")
        self._expect("qweight", torch.uint8, (total + TAIL,))
