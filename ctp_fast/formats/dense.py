"""Dense group-wise 3-, 4- and 8-bit weights (see base.py for the meaning, csrc/cpu/qlinear.h for bytes)."""
from __future__ import annotations

import torch

from .base import BLOCK, PackedWeight


def _rows_padded(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [blocks, 32, K], zero padded."""
    n, k = codes.shape
    pad = -n % BLOCK
    return torch.nn.functional.pad(codes, (0, 0, 0, pad)).view(-1, BLOCK, k)


def pack_nibble_columns(q: torch.Tensor) -> torch.Tensor:
    """[blocks, 32, K] codes < 16 -> [blocks, K, 16] bytes: row i low nibble, row 16+i high nibble."""
    return (q[:, :16] | (q[:, 16:] << 4)).permute(0, 2, 1).contiguous()


def unpack_nibble_columns(b: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibble_columns: [blocks, K, 16] -> [blocks, 32, K]."""
    return torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1)


class DenseWeight(PackedWeight):
    """Every weight stored: 4-bit codes two per byte, 8-bit one per byte, 3-bit as 12 bytes per 32 rows."""

    FORMAT = "dense"
    LAYOUT = "dense"
    BITS = (3, 4, 8)

    @classmethod
    def _pack(cls, codes, mask, zero_codes, group_size, bits):
        q = _rows_padded(codes)
        if bits == 4:
            packed = pack_nibble_columns(q)
        elif bits == 8:
            packed = q.permute(0, 2, 1).contiguous()
        else:  # 3 bits: a 96-bit little-endian stream per column, row i at bits 3i..3i+2
            cols = q.permute(0, 2, 1).to(torch.int64)  # [blocks, K, 32]
            bit = (cols[..., None] >> torch.arange(3)) & 1  # [blocks, K, 32, 3]
            packed = (bit.reshape(*cols.shape[:2], 12, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
        return {"qweight": packed}

    def codes(self) -> torch.Tensor:
        if self.bits == 4:
            q = unpack_nibble_columns(self.qweight)
        elif self.bits == 8:
            q = self.qweight.permute(0, 2, 1)
        else:
            bits = (self.qweight[..., None].to(torch.int64) >> torch.arange(8)) & 1  # [blocks, K, 12, 8]
            bits = bits.reshape(*self.qweight.shape[:2], 32, 3)
            q = (bits << torch.arange(3)).sum(-1).permute(0, 2, 1)
        return q.reshape(-1, self.in_features)[: self.out_features].to(torch.int16)

    def _validate_layout(self) -> None:
        self._expect("qweight", torch.uint8, (self.nblocks, self.in_features, 4 * self.bits))


Int4Weight = DenseWeight  # the dense 4-bit format under its historical name (bits defaults to 4)
