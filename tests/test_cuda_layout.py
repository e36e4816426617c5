"""The CUDA layouts (ctp_fast/formats/cuda_layout.py), checked on the CPU: packing for CUDA then the
reference unpack gives back the weight, codes and mask over formats, shapes, group sizes, sym/asym and
act-order; the way back to the CPU format is exact; the fragment positions and the mma.sp metadata follow
the PTX ISA's documented layouts; the dequantization magic numbers of csrc/cuda/common.cuh decode
nibbles; CompressedLinear state dicts stay in the CPU layout."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from ctp_fast import CompressedLinear, DenseWeight, Sparse24Weight, UnstructuredWeight
from ctp_fast.compress import nm_mask
from ctp_fast.formats.cuda_layout import (CudaPackedWeight, dense_fragment_positions, sparse_fragment_positions,
                                          to_cuda_layout)

ROOT = Path(__file__).resolve().parents[1]


def make(fmt, n, k, g, sym, act=False, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = None
    if fmt is Sparse24Weight:
        mask = nm_mask(torch.rand(n, k, generator=gen), 2, 4) & (torch.rand(n, k, generator=gen) < 0.8)
    elif fmt is UnstructuredWeight:
        mask = torch.rand(n, k, generator=gen) < density
    perm = torch.randperm(k, generator=gen) if act else None
    return fmt.pack(w, group_size=g, symmetric=sym, mask=mask, perm=perm)


CASES = [(fmt, n, k, g, sym, act)
         for fmt, (n, k), g, sym, act in itertools.product(
             (DenseWeight, Sparse24Weight, UnstructuredWeight), [(1, 64), (16, 128), (33, 200), (100, 576)],
             (32, 64, 128, -1), (True, False), (False, True))
         if not (act and fmt is Sparse24Weight)]


@pytest.mark.parametrize("fmt,n,k,g,sym,act", CASES)
def test_pack_then_reference_unpack_is_the_weight(fmt, n, k, g, sym, act):
    pw = make(fmt, n, k, g, sym, act)
    cw = to_cuda_layout(pw)
    assert isinstance(cw, CudaPackedWeight) and cw.FORMAT == pw.FORMAT
    assert torch.equal(cw.unpack(), pw.unpack())
    assert torch.equal(cw.codes(), pw.codes()) or fmt is Sparse24Weight  # 2:4 fillers may move
    assert torch.equal(cw.codes() * cw.mask(), pw.codes() * pw.mask()) or fmt is not Sparse24Weight
    back = cw.cpu_weight()
    assert type(back) is fmt and torch.equal(back.unpack(), pw.unpack())
    if fmt is not Sparse24Weight:  # deterministic packers: the very same bytes come back
        for key, t in pw.tensors().items():
            assert torch.equal(back.tensors()[key], t), key
    assert cw.kernel_ints() == pw.kernel_ints()
    cw.validate()


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_unstructured_stream_shrinks_with_sparsity(density):
    pw = make(UnstructuredWeight, 256, 512, 128, True, density=density)
    cw = to_cuda_layout(pw)
    kept = int(pw.mask().sum())
    offsets = cw.offsets.to(torch.int64)
    assert offsets[0] == 0 and (offsets[1:] >= offsets[:-1]).all() and offsets[-1] == cw.qweight.numel()
    # each tile's words hold its kept codes (8 per word, tiles word aligned)
    counts = torch.tensor([bin(int(m) & 0xFFFFFFFF).count("1") for m in cw.masks.flatten()]).view(-1, 32).sum(1)
    assert torch.equal(offsets[1:] - offsets[:-1], (counts + 7) // 8)
    assert int(counts.sum()) == kept
    dense = to_cuda_layout(make(DenseWeight, 256, 512, 128, True))
    assert cw.nbytes < dense.nbytes * (0.35 + density)


def test_dense_fragment_positions_follow_the_ptx_isa():
    # PTX ISA, mma.m16n8k16 .f16/.bf16 fragment A: row = groupID for a0, a1, a4, a5, else groupID + 8;
    # col = threadID_in_group * 2 + (i & 1) for a0..a3, + 8 for a4..a7.
    row, col = dense_fragment_positions()
    for lane, s in itertools.product(range(32), range(8)):
        i = 2 * s if s < 4 else 2 * (s - 4) + 1  # nibble s holds a_i
        g, t = lane // 4, lane % 4
        assert row[lane, s] == (g if i in (0, 1, 4, 5) else g + 8)
        assert col[lane, s] == t * 2 + (i & 1) + (8 if i >= 4 else 0)
    # every element of the 16x16 tile is owned exactly once
    assert len({(int(r), int(c)) for r, c in zip(row.flatten(), col.flatten())}) == 256


def test_sparse_fragment_positions_follow_the_ptx_isa():
    # PTX ISA, sparse mma.m16n8k32 .f16/.bf16 fragment A: row = groupID for a0, a1, a4, a5, else
    # groupID + 8; columns from threadID_in_group * 4 (a0..a3) and threadID_in_group * 4 + 16 (a4..a7).
    row, chunk, slot = sparse_fragment_positions()
    for lane, s in itertools.product(range(32), range(8)):
        i = 2 * s if s < 4 else 2 * (s - 4) + 1
        g, t = lane // 4, lane % 4
        assert row[lane, s] == (g if i in (0, 1, 4, 5) else g + 8)
        assert 4 * chunk[lane, s] == t * 4 + (16 if i >= 4 else 0)
        assert slot[lane, s] == i % 2


def test_sparse_metadata_follows_the_ptx_isa():
    """One 16x32 tile with a known pattern. PTX ISA (sparse mma.m16n8k32 .f16/.bf16 metadata, selector 0):
    lane 4r + h holds bits[15:0] = row r, columns 16h..16h+15 and bits[31:16] = row r + 8, same
    columns; 4 bits per 4-column chunk, low chunk first, each the two kept indices (lower in bits 1:0)."""
    patterns = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    gen = torch.Generator().manual_seed(1)
    choice = torch.randint(len(patterns), (16, 8), generator=gen)
    mask = torch.zeros(16, 32, dtype=torch.bool)
    for r, c in itertools.product(range(16), range(8)):
        for p in patterns[choice[r, c]]:
            mask[r, 4 * c + p] = True
    pw = Sparse24Weight.pack(torch.randn(16, 32) + 3, group_size=32, mask=mask)  # no kept code at the zero point
    cw = to_cuda_layout(pw)
    meta = cw.masks.view(16, 4)[:, 0].to(torch.int64) & 0xFFFFFFFF  # the first 32-column tile
    for lane in range(32):
        r, h = lane // 4, lane % 2  # lanes 4r+2, 4r+3 carry the words of 4r, 4r+1
        word = int(meta[2 * r + h])
        for half, row in ((0, r), (1, r + 8)):
            for q in range(4):
                nib = (word >> (16 * half + 4 * q)) & 15
                lo, hi = patterns[choice[row, 4 * h + q]]
                assert (nib & 3, nib >> 2) == (lo, hi), (lane, row, q)
    assert torch.equal(cw.mask(), mask)


def test_magic_numbers_of_the_kernels_decode_nibbles():
    src = (ROOT / "csrc/cuda/common.cuh").read_text()
    for name, dtype in (("__half", torch.float16), ("__nv_bfloat16", torch.bfloat16)):
        block = src[src.index(f"template <> struct Half<{name}>"):]
        magic = int(re.search(r"kMagic = (0x[0-9a-fA-F]+)u", block).group(1), 16)
        value = float(re.search(r"kMagicValue = ([0-9.]+)f", block).group(1))
        for q in range(16):
            bits = torch.tensor([(magic & 0xFFFF) | q], dtype=torch.int16)  # lop3(word, 0xf, magic)
            assert bits.view(dtype).item() == value + q, (name, q)


def test_compressed_linear_state_dict_stays_in_the_cpu_layout(tmp_path):
    for fmt in (DenseWeight, Sparse24Weight, UnstructuredWeight):
        pw = make(fmt, 48, 128, 64, False, act=fmt is not Sparse24Weight)
        ref = CompressedLinear(pw, torch.randn(48))
        mod = CompressedLinear(to_cuda_layout(pw), ref.bias.detach())
        assert mod._cuda_layout and mod.nbytes == to_cuda_layout(pw).nbytes
        state = mod.state_dict()
        assert {k: (v.dtype, v.shape) for k, v in state.items()} == \
               {k: (v.dtype, v.shape) for k, v in ref.state_dict().items()}
        torch.save(state, tmp_path / "m.pt")
        fresh = CompressedLinear(make(fmt, 48, 128, 64, False, act=fmt is not Sparse24Weight, seed=5), torch.zeros(48))
        fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
        assert torch.equal(fresh.dequantize().weight, ref.dequantize().weight)
        # and a CPU checkpoint loads into a module holding the CUDA layout (repacked on load)
        other = CompressedLinear(to_cuda_layout(make(fmt, 48, 128, 64, False, act=fmt is not Sparse24Weight, seed=7)),
                                 torch.zeros(48))
        other.load_state_dict(ref.state_dict())
        assert other._cuda_layout and torch.equal(other.dequantize().weight, ref.dequantize().weight)
        assert torch.equal(other.bias, ref.bias)


def test_only_4bit_weights_have_a_cuda_layout():
    with pytest.raises(ValueError, match="4-bit"):
        to_cuda_layout(DenseWeight.pack(torch.randn(8, 64), bits=3))
