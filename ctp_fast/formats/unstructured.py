"""Unstructured sparse 4-bit weights: any mask. Per 32-row block and column a 32-bit row mask, the kept
codes as one nibble stream, and the stream offset of every 32 columns. Bytes per weight:
1/8 (masks) + (1 - sparsity)/2 (codes) + scales: 0.39 at 50%, 0.27 at 75%, 0.19 at 90% (g128, fp16)."""
from __future__ import annotations

import math

import torch

from .base import BLOCK, PackedWeight
from .dense import _rows_padded


def _bit_weights() -> torch.Tensor:
    return torch.tensor([1 << i for i in range(BLOCK)], dtype=torch.int64)


class UnstructuredWeight(PackedWeight):
    FORMAT = "unstructured"
    LAYOUT = "unstructured"
    EXTRA_TENSORS = ("masks", "offsets")

    @classmethod
    def _check_mask(cls, mask, shape):
        if mask is None:
            raise ValueError("mask: the unstructured format needs the mask of kept weights")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
        return mask.bool()

    @classmethod
    def _pack(cls, codes, mask, zero_codes, group_size, bits):
        n, k = codes.shape
        m = _rows_padded(mask).permute(0, 2, 1)  # [blocks, K, 32]
        q = _rows_padded(codes).permute(0, 2, 1)
        words = (m.to(torch.int64) * _bit_weights()).sum(-1)
        masks = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        stream = q[m].to(torch.uint8)  # block, column, row order
        if stream.numel() % 2:
            stream = torch.cat([stream, stream.new_zeros(1)])
        packed = (stream[0::2] | (stream[1::2] << 4)).contiguous()
        counts = m.sum(-1).flatten()
        starts = torch.cumsum(counts, 0) - counts  # nibble index of each (block, column)
        offsets = starts.view(-1, k)[:, ::BLOCK].contiguous()
        return {"qweight": packed, "masks": masks.contiguous(), "offsets": offsets}

    def _mask_blocks(self) -> torch.Tensor:
        """[blocks, K, 32] bool."""
        words = self.masks.to(torch.int64) & 0xFFFFFFFF
        return (words[..., None] & _bit_weights()) != 0

    def mask(self) -> torch.Tensor:
        return self._mask_blocks().permute(0, 2, 1).reshape(-1, self.in_features)[: self.out_features]

    def codes(self) -> torch.Tensor:
        m = self._mask_blocks()
        nibbles = torch.stack([self.qweight & 15, self.qweight >> 4], -1).flatten()[: int(m.sum())]
        n, k = self.out_features, self.in_features
        g = torch.arange(k) // self.kernel_group_size
        zp = (torch.full((self.nblocks * BLOCK, k), 2 ** (self.bits - 1), dtype=torch.uint8) if self.zeros is None
              else self.zeros.permute(0, 2, 1).reshape(-1, self.ngroups)[:, g])
        q = zp.view(-1, BLOCK, k).permute(0, 2, 1).clone()
        q[m] = nibbles
        return q.permute(0, 2, 1).reshape(-1, k)[:n].to(torch.int16)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask().sum()) / (self.out_features * self.in_features)

    def _validate_layout(self) -> None:
        blocks, k = self.nblocks, self.in_features
        self._expect("masks", torch.int32, (blocks, k))
        self._expect("offsets", torch.int64, (blocks, math.ceil(k / BLOCK)))
        m = self._mask_blocks()
        if self.out_features % BLOCK and m[-1, :, self.out_features % BLOCK:].any():
            raise ValueError(f"masks: rows past out_features={self.out_features} are marked kept")
        counts = m.sum(-1).flatten()
        starts = (torch.cumsum(counts, 0) - counts).view(blocks, k)[:, ::BLOCK]
        if not torch.equal(starts, self.offsets):
            raise ValueError("offsets: do not match the masks (a truncated or corrupted weight)")
        total = int(counts.sum())
        self._expect("qweight", torch.uint8, ((total + 1) // 2,))
