"""2:4 sparse 4-bit weights: of every 4 consecutive input columns at most 2 are kept; each row stores
the two slots' codes and 2-bit positions (0.375 bytes per original weight plus scales)."""
from __future__ import annotations

import torch

from .base import BLOCK, PackedWeight
from .dense import _rows_padded, pack_nibble_columns, unpack_nibble_columns


class Sparse24Weight(PackedWeight):
    FORMAT = "sparse24"
    LAYOUT = "sparse24"

    @classmethod
    def pack(cls, weight, group_size=128, symmetric=True, bits=4, scale_dtype=torch.float16, perm=None, mask=None):
        if perm is not None:
            raise ValueError("perm: 2:4 weights cannot be act-order permuted (the 2:4 pattern runs along the "
                             "original input columns)")
        return super().pack(weight, group_size, symmetric, bits, scale_dtype, None, mask)

    @classmethod
    def _check_mask(cls, mask, shape):
        n, k = shape
        if mask is None:
            raise ValueError("mask: the 2:4 format needs the mask of kept weights (see ctp_fast.compress for pruning)")
        if tuple(mask.shape) != (n, k):
            raise ValueError(f"mask: expected shape {(n, k)}, got {tuple(mask.shape)}")
        if k % 4:
            raise ValueError(f"in_features: 2:4 sparsity needs a multiple of 4 input columns, got {k}")
        kept = mask.bool().view(n, k // 4, 4).sum(-1)
        if (kept > 2).any():
            r, j = (kept > 2).nonzero()[0].tolist()
            raise ValueError(f"mask: not a 2:4 pattern: row {r} keeps {kept[r, j].item()} of columns "
                             f"{4 * j}..{4 * j + 3} (at most 2 of every 4)")
        return mask.bool()

    @classmethod
    def _pack(cls, codes, mask, zero_codes, group_size, bits):
        n, k = codes.shape
        mq = mask.view(n, k // 4, 4)
        # Kept positions first (stable, so ascending); a quad with fewer than 2 kept fills the free slot
        # with another position holding the zero point, which decodes to exactly 0.
        order = torch.sort((~mq).to(torch.int8), dim=-1, stable=True).indices[..., :2]  # [n, k/4, 2]
        kept = torch.gather(mq, -1, order)
        g = torch.arange(0, k, 4) // (k if group_size == -1 else group_size)
        zero = zero_codes[:, g][..., None].expand(-1, -1, 2)
        slot_codes = torch.where(kept, torch.gather(codes.view(n, k // 4, 4), -1, order), zero).to(torch.uint8)
        parts = [pack_nibble_columns(_rows_padded(slot_codes[..., t])) for t in range(2)]
        pos = _rows_padded(order.to(torch.uint8).view(n, -1)).view(-1, BLOCK, k // 4, 2)  # [blocks, 32, k/4, 2]
        p0, p1 = pos[..., 0], pos[..., 1]
        pos_bytes = (p0[:, :16] | (p1[:, :16] << 2) | (p0[:, 16:] << 4) | (p1[:, 16:] << 6)).permute(0, 2, 1)
        return {"qweight": torch.cat([*parts, pos_bytes], dim=-1).contiguous()}

    def _slots(self):
        q = self.qweight
        codes = [unpack_nibble_columns(q[..., 16 * t: 16 * t + 16]) for t in range(2)]  # [blocks, 32, k/4]
        pb = q[..., 32:].permute(0, 2, 1)  # [blocks, 16, k/4]
        pos = [torch.cat([(pb >> (2 * t)) & 3, (pb >> (2 * t + 4)) & 3], dim=1) for t in range(2)]
        n, k = self.out_features, self.in_features
        flat = lambda t: t.reshape(-1, k // 4)[:n].to(torch.int64)  # noqa: E731
        return [flat(c) for c in codes], [flat(p) for p in pos]

    def codes(self) -> torch.Tensor:
        (c0, c1), (p0, p1) = self._slots()
        n, k = self.out_features, self.in_features
        g = torch.arange(k) // self.kernel_group_size
        zeros = (torch.full((n, k), 2 ** (self.bits - 1), dtype=torch.int64) if self.zeros is None
                 else self.zeros.permute(0, 2, 1).reshape(-1, self.ngroups)[:n].to(torch.int64)[:, g])
        q = zeros.view(n, k // 4, 4).clone()
        q.scatter_(-1, p0[..., None], c0[..., None])
        q.scatter_(-1, p1[..., None], c1[..., None])
        return q.view(n, k).to(torch.int16)

    def mask(self) -> torch.Tensor:
        """The stored positions (two per quad; a filler slot decodes to 0)."""
        _, (p0, p1) = self._slots()
        n, k = self.out_features, self.in_features
        m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        m.scatter_(-1, p0[..., None], True)
        m.scatter_(-1, p1[..., None], True)
        return m.view(n, k)

    def _validate_layout(self) -> None:
        if self.in_features % 4:
            raise ValueError(f"in_features: 2:4 weights need a multiple of 4, got {self.in_features}")
        if self.perm is not None:
            raise ValueError("perm: 2:4 weights cannot be act-order permuted")
        self._expect("qweight", torch.uint8, (self.nblocks, self.in_features // 4, 48))
