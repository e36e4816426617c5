"""CUDA layouts of the packed formats, and their pure-torch reference unpack (the oracle of csrc/cuda/).

Built from the format-neutral meaning of a weight (`codes()`, `mask()`, scales, zeros, perm), never
from the CPU bytes. Checkpoints never hold this layout: `CudaPackedWeight.to("cpu")` / `.cpu_weight()`
rebuild the CPU format. The kernels compute y^T = W x^T with W as the mma A operand, so every layout
stores, per 16-row tile of W, one 32-bit word per lane that *is* that lane's A fragment:

    word nibble s (s = 0..7) holds fragment element a_i, i = 2s (s < 4) or 2(s-4)+1 (s >= 4), so
    `lop3(word >> 4p, 0x000f000f, magic)` yields the half2 register (a_2p, a_2p+1) directly.

  dense (mma m16n8k16): element a_i of lane l sits at row g + 8*((i>>1)&1), column 2t + (i&1) + 8*(i>>2)
      of the 16x16 tile (g = l/4, t = l%4). qweight int32 [Np/16, Kp/64, 32, 4]: [tile n, chunk c,
      lane, j] is the word of k-tile 4c+j (16 columns each). Kp = K rounded up to 64.
  sparse24 (mma.sp m16n8k32, PTX ISA "sparse mma.m16n8k32 .f16/.bf16"): a_i holds row g + 8*((i>>1)&1),
      4-column chunk t + 4*(i>>2), slot i&1 of the 32-column tile; the two slots of a chunk are its
      kept positions in increasing order (fillers hold the zero point). qweight int32 [Np/16, Kp/128, 32, 4]
      as above, one word per 32-column tile; masks (the mma.sp metadata) int32 [Np/16, Kp/128, 16, 4]:
      entry e = 2r + h is the metadata register of lane 4r + h (sparsity selector 0 reads lanes with
      l%4 < 2; lanes 4r + h + 2 pass the same word): bits[15:0] = meta(row r, half h), bits[31:16] =
      meta(row r + 8, half h), meta(r, h) holding chunk 4h+q at bits 4q..4q+3 as
      pos(slot 0) | pos(slot 1) << 2. Kp = K rounded up to 128.
  unstructured: per 16x64 tile (tile n, chunk c) each lane owns the 32 positions of its A fragments
      in the 4 k-tiles: bit b = 16*0 + 8*j + s <-> k-tile j, nibble s (positions as dense).
      masks int32 [Np/16, Kp/64, 32]: the kept bits. qweight int32 words: the kept codes of the
      tile, lane by lane, bits ascending, 8 nibbles per word low first; every tile starts on a word.
      offsets int32 [Np/16 * Kp/64 + 1]: word where tile (n, c) starts (row-major), then the end.

scales [G, Np] in the format's scale dtype, zeros [G, Np] uint8 (absent: symmetric), perm int64 [K]
(the kernels gather x through it). Rows past N have scale 0; columns past K meet x = 0 in the kernel.
"""
from __future__ import annotations

import math

import torch

from .base import LAYOUTS, PackedWeight, _REGISTRY, blocks_to_rows

TILE_N = 16
CHUNK_K = {"dense": 64, "sparse24": 128, "unstructured": 64}


def _to_i32(words: torch.Tensor) -> torch.Tensor:
    words = words.to(torch.int64) & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> [..., 8] nibbles, low first."""
    return (words.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 15


def _from_nibbles(nib: torch.Tensor) -> torch.Tensor:
    return _to_i32((nib.to(torch.int64) << (4 * torch.arange(8))).sum(-1))


def _element_of_slot() -> torch.Tensor:
    s = torch.arange(8)
    return torch.where(s < 4, 2 * s, 2 * (s - 4) + 1)


def dense_fragment_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [32, 8] in a 16x16 tile of nibble s of lane l's word (mma m16n8k16 A fragment)."""
    i = _element_of_slot()[None, :]
    lane = torch.arange(32)[:, None]
    g, t = lane // 4, lane % 4
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def sparse_fragment_positions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, chunk, slot) [32, 8] of nibble s of lane l's word (mma.sp m16n8k32 compressed A fragment)."""
    i = _element_of_slot()[None, :]
    lane = torch.arange(32)[:, None]
    g, t = lane // 4, lane % 4
    return (g + 8 * ((i >> 1) & 1)).expand(32, 8), (t + 4 * (i >> 2)).expand(32, 8), (i & 1).expand(32, 8)


class CudaPackedWeight:
    """A packed weight in the CUDA layout of its format (see the module docstring). Duck-types the
    parts of PackedWeight that modules and ops use; `source_cls` is the CPU format it came from."""

    EXTRA_TENSORS = ("masks", "offsets")

    def __init__(self, qweight, scales, zeros, perm, out_features, in_features, group_size, bits=4, *,
                 source_cls, masks=None, offsets=None):
        self.qweight, self.scales, self.zeros, self.perm = qweight, scales, zeros, perm
        self.masks, self.offsets = masks, offsets
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.group_size, self.bits = int(group_size), int(bits)
        self.source_cls = source_cls
        self.FORMAT, self.LAYOUT = source_cls.FORMAT, source_cls.LAYOUT

    # ------------------------------------------------------------------ sizes (as PackedWeight)
    symmetric = PackedWeight.symmetric
    kernel_group_size = PackedWeight.kernel_group_size
    ngroups = PackedWeight.ngroups
    nbytes = PackedWeight.nbytes
    bytes_per_weight = PackedWeight.bytes_per_weight
    kernel_ints = PackedWeight.kernel_ints
    __repr__ = PackedWeight.__repr__

    @property
    def padded_n(self) -> int:
        return math.ceil(self.out_features / TILE_N) * TILE_N

    @property
    def padded_k(self) -> int:
        ck = CHUNK_K[self.LAYOUT]
        return math.ceil(self.in_features / ck) * ck

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        for key in ("zeros", "perm", "masks", "offsets"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def kernel_args(self) -> tuple:
        return (self.qweight, self.scales, self.zeros, self.perm, self.masks, self.offsets)

    def config(self) -> dict:
        return self.cpu_weight().config()

    def validate(self, **_) -> None:
        want = (self.ngroups, self.padded_n)
        if tuple(self.scales.shape) != want:
            raise ValueError(f"scales: expected the CUDA layout shape {want}, got {tuple(self.scales.shape)}")

    # ------------------------------------------------------------------ reference meaning
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[G, Np] -> [N, G] on the CPU."""
        return t.detach().cpu().T[: self.out_features]

    def _zero_codes(self) -> torch.Tensor:
        """Zero point of every (padded row, padded column), int64 [Np, Kp]."""
        np_, kp = self.padded_n, self.padded_k
        g = torch.clamp(torch.arange(kp) // self.kernel_group_size, max=self.ngroups - 1)
        if self.zeros is None:
            return torch.full((np_, kp), 2 ** (self.bits - 1), dtype=torch.int64)
        return self.zeros.detach().cpu().T.to(torch.int64)[:, g]

    def _padded_codes_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and kept mask [Np, Kp] decoded from the CUDA tensors (the reference unpack)."""
        np_, kp = self.padded_n, self.padded_k
        nt = np_ // TILE_N
        q = self.qweight.detach().cpu()
        if self.LAYOUT == "dense":
            row, col = dense_fragment_positions()
            nib = _nibbles(q.permute(0, 1, 3, 2).reshape(nt, kp // 16, 32))  # [nt, kt, 32, 8]
            tiles = torch.zeros(nt, kp // 16, 16, 16, dtype=torch.int64)
            tiles[:, :, row, col] = nib
            codes = tiles.permute(0, 2, 1, 3).reshape(np_, kp)
            return codes, torch.ones(np_, kp, dtype=torch.bool)
        if self.LAYOUT == "sparse24":
            row, chunk, slot = sparse_fragment_positions()
            nk = kp // 32
            nib = _nibbles(q.permute(0, 1, 3, 2).reshape(nt, nk, 32))  # [nt, k32, lane, s]
            slot_codes = torch.zeros(nt, nk, 16, 8, 2, dtype=torch.int64)
            slot_codes[:, :, row, chunk, slot] = nib
            # metadata by the ISA's rule: lane 4r + h, bits[15:0] row r, bits[31:16] row r + 8, half h
            meta = self.masks.detach().cpu().permute(0, 1, 3, 2).reshape(nt, nk, 16).to(torch.int64) & 0xFFFFFFFF
            r, h = torch.arange(8)[:, None], torch.arange(2)[None, :]
            lo, hi = meta[:, :, 2 * r + h] & 0xFFFF, meta[:, :, 2 * r + h] >> 16  # [nt, nk, 8, 2]
            m16 = torch.cat([lo, hi], dim=2)  # [nt, nk, 16 rows, 2 halves]
            pos = (m16[..., None, None] >> (4 * torch.arange(4)[:, None] + 2 * torch.arange(2))) & 3
            pos = pos.reshape(nt, nk, 16, 8, 2)  # [.., row, chunk 4h+q, slot]
            if (pos[..., 0] >= pos[..., 1]).any():
                raise ValueError("masks: 2:4 metadata positions must increase within a chunk")
            codes = self._zero_codes().view(nt, 16, nk, 8, 4).permute(0, 2, 1, 3, 4).clone()
            mask = torch.zeros_like(codes, dtype=torch.bool)
            codes.scatter_(-1, pos, slot_codes)
            mask.scatter_(-1, pos, True)
            back = lambda t: t.permute(0, 2, 1, 3, 4).reshape(np_, kp)  # noqa: E731
            return back(codes), back(mask)
        # unstructured
        row, col = dense_fragment_positions()
        nc = kp // 64
        words = self.masks.detach().cpu().to(torch.int64) & 0xFFFFFFFF  # [nt, nc, 32]
        bits = ((words[..., None] >> torch.arange(32)) & 1).bool()  # [nt, nc, lane, b]
        rank = torch.cumsum(bits.reshape(nt * nc, -1).to(torch.int64), 1).reshape(bits.shape) - 1
        start = self.offsets.detach().cpu().to(torch.int64)[:-1].view(nt, nc, 1, 1) * 8
        stream = _nibbles(q).flatten()
        kept_codes = stream[(start + rank)[bits]]
        codes_lb = self._zero_codes().view(nt, 16, nc, 4, 16).permute(0, 2, 3, 1, 4)  # [nt, nc, j, 16, 16]
        codes_lb = codes_lb[:, :, :, row, col].permute(0, 1, 3, 2, 4).reshape(nt, nc, 32, 32).clone()
        codes_lb[bits] = kept_codes
        tiles_c = codes_lb.view(nt, nc, 32, 4, 8).permute(0, 1, 3, 2, 4)  # [nt, nc, j, lane, s]
        tiles_m = bits.view(nt, nc, 32, 4, 8).permute(0, 1, 3, 2, 4)
        codes = torch.zeros(nt, nc, 4, 16, 16, dtype=torch.int64)
        mask = torch.zeros(nt, nc, 4, 16, 16, dtype=torch.bool)
        codes[:, :, :, row, col] = tiles_c
        mask[:, :, :, row, col] = tiles_m
        back = lambda t: t.permute(0, 3, 1, 2, 4).reshape(np_, kp)  # noqa: E731
        return back(codes), back(mask)

    def codes(self) -> torch.Tensor:
        return self._padded_codes_mask()[0][: self.out_features, : self.in_features].to(torch.int16)

    def mask(self) -> torch.Tensor:
        return self._padded_codes_mask()[1][: self.out_features, : self.in_features]

    def unpack(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        g = torch.arange(k) // self.kernel_group_size
        codes, mask = self._padded_codes_mask()
        codes, mask = codes[:n, :k].double(), mask[:n, :k]
        scales = self._rows(self.scales).double()[:, g]
        zeros = 2.0 ** (self.bits - 1) if self.zeros is None else self._rows(self.zeros).double()[:, g]
        w = ((codes - zeros) * scales * mask).float()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.cpu(), w)
        return w.to(dtype)

    # ------------------------------------------------------------------ devices
    def cpu_weight(self) -> PackedWeight:
        """The same weight in its CPU format (on the CPU)."""
        codes, mask = self._padded_codes_mask()
        n, k = self.out_features, self.in_features
        return self.source_cls.from_codes(
            codes[:n, :k].to(torch.uint8), self._rows(self.scales), None if self.zeros is None else self._rows(self.zeros),
            self.group_size, None if self.perm is None else self.perm.cpu(), self.scales.dtype, bits=self.bits,
            mask=None if self.LAYOUT == "dense" else mask[:n, :k])

    def state_dict(self) -> dict:
        return self.cpu_weight().state_dict()

    def map(self, fn) -> "CudaPackedWeight":
        t = {k: fn(v) for k, v in self.tensors().items()}
        return CudaPackedWeight(t.pop("qweight"), t.pop("scales"), t.pop("zeros", None), t.pop("perm", None),
                                self.out_features, self.in_features, self.group_size, self.bits,
                                source_cls=self.source_cls, **t)

    def to(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            return self.map(lambda t: t.to(device))
        return self.cpu_weight().to(device)


def to_cuda_layout(w: PackedWeight, device="cpu") -> CudaPackedWeight:
    """Repack any CPU-format weight into its CUDA layout (tensors on `device`; the CPU is fine for tests)."""
    if isinstance(w, CudaPackedWeight):
        return w.to(device) if torch.device(device).type == "cuda" else w
    layout = w.LAYOUT
    if layout not in CHUNK_K or w.bits != 4:
        raise ValueError(f"the CUDA kernels take 4-bit dense, 2:4 or unstructured weights, got {w!r}")
    n, k = w.out_features, w.in_features
    np_, kp = math.ceil(n / TILE_N) * TILE_N, math.ceil(k / CHUNK_K[layout]) * CHUNK_K[layout]
    nt = np_ // TILE_N
    scales_rows = blocks_to_rows(w.scales, n)  # [N, G]
    scales = torch.zeros(np_, w.ngroups, dtype=w.scales.dtype)
    scales[:n] = scales_rows
    zeros = None
    if w.zeros is not None:
        zeros = torch.zeros(np_, w.ngroups, dtype=torch.uint8)
        zeros[:n] = blocks_to_rows(w.zeros, n)
        zeros = zeros.T.contiguous()
    out = CudaPackedWeight(None, scales.T.contiguous(), zeros, w.perm, n, k, w.group_size, w.bits,
                           source_cls=type(w))
    zc = out._zero_codes()  # [Np, Kp]
    codes = zc.clone()
    codes[:n, :k] = w.codes().to(torch.int64)
    mask = torch.zeros(np_, kp, dtype=torch.bool)
    mask[:n, :k] = w.mask()
    if layout == "dense":
        row, col = dense_fragment_positions()
        tiles = codes.view(nt, TILE_N, kp // 16, 16).permute(0, 2, 1, 3)  # [nt, kt, 16, 16]
        words = _from_nibbles(tiles[:, :, row, col])  # [nt, kt, 32]
        out.qweight = words.view(nt, kp // 64, 4, 32).permute(0, 1, 3, 2).contiguous()
    elif layout == "sparse24":
        nk = kp // 32
        mq = mask.view(np_, kp // 4, 4)
        mq[n:] = False
        # two positions per chunk: the kept ones, then the lowest free ones; increasing order.
        key = (~mq).to(torch.int64) * 4 + torch.arange(4)
        pos = torch.sort(torch.sort(key, -1).indices[..., :2], -1).values  # [Np, Kp/4, 2]
        slot_codes = torch.gather(codes.view(np_, kp // 4, 4), -1, pos)
        row, chunk, slot = sparse_fragment_positions()
        sc = slot_codes.view(nt, 16, nk, 8, 2).permute(0, 2, 1, 3, 4)  # [nt, nk, 16, 8, 2]
        words = _from_nibbles(sc[:, :, row, chunk, slot])  # [nt, nk, 32]
        out.qweight = words.view(nt, kp // 128, 4, 32).permute(0, 1, 3, 2).contiguous()
        p = pos.view(nt, 16, nk, 2, 4, 2).permute(0, 2, 1, 3, 4, 5)  # [nt, nk, row, half, q, slot]
        m16 = ((p[..., 0] | (p[..., 1] << 2)) << (4 * torch.arange(4))).sum(-1)  # [nt, nk, 16, 2]
        e = torch.arange(16)  # entry 2r + h: what lanes 4r + h (and their copies 4r + h + 2) pass
        meta = m16[:, :, e // 2, e % 2] | (m16[:, :, e // 2 + 8, e % 2] << 16)  # [nt, nk, 16]
        out.masks = _to_i32(meta).view(nt, kp // 128, 4, 16).permute(0, 1, 3, 2).contiguous()
    else:
        nc = kp // 64
        row, col = dense_fragment_positions()
        tc = codes.view(nt, 16, nc, 4, 16).permute(0, 2, 3, 1, 4)[:, :, :, row, col]  # [nt, nc, j, lane, s]
        tm = mask.view(nt, 16, nc, 4, 16).permute(0, 2, 3, 1, 4)[:, :, :, row, col]
        tc = tc.permute(0, 1, 3, 2, 4).reshape(nt * nc, 32 * 32)  # lane-major, bit b = 8j + s
        tm = tm.permute(0, 1, 3, 2, 4).reshape(nt * nc, 32 * 32)
        out.masks = _to_i32((tm.view(nt, nc, 32, 32).to(torch.int64) << torch.arange(32)).sum(-1))
        words_per_tile = (tm.sum(1) + 7) // 8
        offsets = torch.zeros(nt * nc + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(words_per_tile, 0)
        rank = torch.cumsum(tm.to(torch.int64), 1) - 1
        where = (offsets[:-1, None] * 8 + rank)[tm]
        stream = torch.zeros(int(offsets[-1]) * 8, dtype=torch.int64)
        stream[where] = tc[tm]
        out.qweight = _from_nibbles(stream.view(-1, 8)) if stream.numel() else torch.zeros(0, dtype=torch.int32)
        out.offsets = offsets.to(torch.int32)
    return out.to(device) if torch.device(device).type == "cuda" else out


def move_weight(w, device):
    """PackedWeight / CudaPackedWeight to `device`, repacking between the CPU and CUDA layouts."""
    device = torch.device(device)
    if device.type == "cuda":
        return to_cuda_layout(w, device)
    return w.to(device)


__all__ = ["CudaPackedWeight", "to_cuda_layout", "move_weight", "LAYOUTS", "_REGISTRY"]
