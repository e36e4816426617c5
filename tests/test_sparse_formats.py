"""The 2:4 and unstructured sparse int4 formats and the dense 3/8-bit formats: packing, the reference
unpack, sizes, state dicts, bad masks and metadata, and the kernels (forward and grad_input) against
the reference over shapes, M, group sizes, sym/asym, dtypes and every ISA path."""
from __future__ import annotations

import math

import pytest
import torch

from ctp_fast import (CompressedLinear, DenseWeight, PackedWeight, Sparse24Weight, UnstructuredWeight, packed_linear,
                      packed_linear_grad_input)
from ctp_fast.compress import magnitude_mask, nm_mask
from conftest import kernel_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def random_mask(n, k, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "2:4":
        return nm_mask(torch.rand(n, k, generator=gen), 2, 4)
    if kind == "2:4-partial":  # quads keeping 0, 1 or 2
        m = nm_mask(torch.rand(n, k, generator=gen), 2, 4)
        return m & (torch.rand(n, k, generator=gen) < 0.7)
    m = torch.rand(n, k, generator=gen) >= kind
    if n > 3 and k > 1:
        m[1] = False            # an all-zero row
    if n >= 64:
        m[32:64] = True         # a fully dense 32-row block
    return m


def make(fmt, n, k, g, sym, sparsity=None, bits=4, seed=0, scale_dtype=torch.float16):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    mask = None if sparsity is None else random_mask(n, k, sparsity, seed)
    return fmt.pack(w, group_size=g, symmetric=sym, bits=bits, mask=mask, scale_dtype=scale_dtype), w, mask


def check_kernels(pw, ms=(1, 2, 3, 7, 16, 64, 129), dtype=torch.float32):
    W0 = pw.unpack(torch.float64)
    n, k = W0.shape
    for m in ms:
        W = kernel_weight(W0, dtype, m)  # bf16 on the bf16 dot-product path
        x = torch.randn(m, k).to(dtype)
        b = torch.randn(n)
        y = packed_linear(x, pw, b)
        ref = x.double() @ W.T + b.double()
        # fp32 accumulation: error relative to sum |x||w| (1e-5 covers the small-M kernel's per-group
        # rescaling); bf16 output adds its own rounding, 2^-8 of the value.
        tol = 1e-5 * (x.double().abs() @ W.abs().T + b.double().abs()) + 1e-6
        if dtype == torch.bfloat16:
            tol = tol + 2 ** -8 * ref.abs()
        assert (y.double() - ref).abs().le(tol).all(), (m, (y.double() - ref).abs().max().item())
        gy = torch.randn(m, n).to(dtype)
        gx = packed_linear_grad_input(gy, pw)
        gref = gy.double() @ W
        gtol = 1e-5 * (gy.double().abs() @ W.abs()) + 1e-6 + (2 ** -8 * gref.abs() if dtype == torch.bfloat16 else 0)
        assert (gx.double() - gref).abs().le(gtol).all(), (m, "grad")


SHAPES = [(33, 40), (64, 96), (192, 576), (200, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_sparse24_kernels(isa, shape, g, sym):
    n, k = shape
    pw, w, mask = make(Sparse24Weight, n, k, g, sym, "2:4-partial")
    W = pw.unpack()
    assert ((W != 0) <= mask).all() and ((W != 0).view(n, -1, 4).sum(-1) <= 2).all()
    check_kernels(pw, ms=(1, 2, 5, 64, 129))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("g", [32, 128, -1])
def test_unstructured_kernels(isa, shape, g, sparsity):
    n, k = shape
    pw, w, mask = make(UnstructuredWeight, n, k, g, sym=(g != 32), sparsity=sparsity)
    assert torch.equal(pw.mask(), mask)
    assert ((pw.unpack() != 0) <= mask).all()
    check_kernels(pw, ms=(1, 2, 4, 5, 64))
    if n > 3:  # an all-zero row gives exactly 0 (+ bias), whatever the activations
        x = torch.randn(3, k) * 100
        assert torch.equal(packed_linear(x, pw)[:, 1], torch.zeros(3))


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_unstructured_act_order_kernels(isa, sym):
    torch.manual_seed(5)
    n, k = 72, 200
    w, mask = torch.randn(n, k), random_mask(n, k, 0.6, seed=5)
    pw = UnstructuredWeight.pack(w, group_size=64, symmetric=sym, mask=mask, perm=torch.randperm(k))
    assert torch.equal(pw.unpack() != 0, (pw.unpack() != 0) & mask)
    check_kernels(pw, ms=(1, 3, 7))


def test_unstructured_codes_and_mask_keep_their_meaning():
    """codes() and mask() are row-major [N, K] whatever the byte layout (the CUDA layouts are built from them)."""
    from ctp_fast.formats.base import quantize
    w, mask = torch.randn(70, 96), random_mask(70, 96, 0.5, seed=2)
    for sym in (True, False):
        pw = UnstructuredWeight.pack(w, group_size=32, symmetric=sym, mask=mask)
        codes, _, zeros = quantize(w, 4, 32, sym, mask, torch.float16)
        assert torch.equal(pw.mask(), mask)
        assert torch.equal(pw.codes(), codes.to(torch.int16))  # pruned entries hold the zero point


def test_unstructured_old_layout_version_is_refused():
    pw, _, _ = make(UnstructuredWeight, 64, 64, 32, True, 0.5)
    st = pw.state_dict()
    assert st["config"]["version"] == UnstructuredWeight.VERSION == 2
    with pytest.raises(ValueError, match="unstructured format version 1 is not supported .*reads version 2"):
        PackedWeight.from_state_dict(dict(st, config={**st["config"], "version": 1}))


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dense_3_and_8_bit_kernels(isa, bits, shape, sym):
    n, k = shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    pw = DenseWeight.pack(torch.randn(n, k), group_size=32, symmetric=sym, bits=bits, perm=perm)
    assert int(pw.codes().max()) <= 2 ** bits - 1
    check_kernels(pw, ms=(1, 4, 64))


@pytest.mark.parametrize("fmt, sparsity", [(Sparse24Weight, "2:4"), (UnstructuredWeight, 0.5)])
def test_bf16_activations(isa, fmt, sparsity):
    pw, _, _ = make(fmt, 96, 128, 32, False, sparsity, scale_dtype=torch.bfloat16)
    check_kernels(pw, ms=(1, 64), dtype=torch.bfloat16)


def test_quantization_error_is_bounded_on_kept_weights():
    pw, w, mask = make(Sparse24Weight, 64, 128, 32, True, "2:4")
    W = pw.unpack()
    scale = pw.scales.permute(0, 2, 1).reshape(-1, pw.ngroups)[:64].float().repeat_interleave(32, dim=1)
    err = (W - w * mask).abs()
    assert (err <= scale * 0.5 + 1e-6 + (w.abs() - 7 * scale).clamp(min=0)).all()  # clipping at +7 s only


def test_bytes_per_weight_targets_and_fall_with_sparsity():
    w = torch.randn(4096, 4096)
    dense = DenseWeight.pack(w, group_size=128)
    s24 = Sparse24Weight.pack(w, group_size=128, mask=magnitude_mask(w, "2:4"))
    assert dense.bytes_per_weight == pytest.approx(0.5 + 2 / 128, abs=1e-3)   # about 0.52
    assert s24.bytes_per_weight == pytest.approx(0.375 + 2 / 128, abs=1e-3)   # about 0.39
    sizes = [UnstructuredWeight.pack(w, mask=magnitude_mask(w, s)).bytes_per_weight for s in (0.5, 0.75, 0.9)]
    assert sizes[0] < dense.bytes_per_weight and sizes[0] > sizes[1] > sizes[2]
    assert DenseWeight.pack(w, bits=3).bytes_per_weight < dense.bytes_per_weight < DenseWeight.pack(w, bits=8).bytes_per_weight


def test_state_dict_round_trip_all_formats():
    for fmt, sp in [(Sparse24Weight, "2:4"), (UnstructuredWeight, 0.75), (DenseWeight, None)]:
        pw, _, _ = make(fmt, 70, 64, 32, False, sp)
        back = PackedWeight.from_state_dict(pw.state_dict())
        assert type(back) is fmt and torch.equal(back.unpack(), pw.unpack())


# ------------------------------------------------------------------------------------------- bad input
def test_bad_24_masks_are_refused():
    w = torch.randn(8, 16)
    m = nm_mask(torch.rand(8, 16), 2, 4)
    m[3, 4:8] = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match="not a 2:4 pattern: row 3 keeps 3 of columns 4..7"):
        Sparse24Weight.pack(w, mask=m)
    with pytest.raises(ValueError, match="mask: the 2:4 format needs"):
        Sparse24Weight.pack(w)
    with pytest.raises(ValueError, match="multiple of 4"):
        Sparse24Weight.pack(torch.randn(8, 18), mask=torch.ones(8, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match="act-order"):
        Sparse24Weight.pack(w, mask=nm_mask(torch.rand(8, 16), 2, 4), perm=torch.arange(16))
    with pytest.raises(ValueError, match="bits"):
        Sparse24Weight.pack(w, mask=nm_mask(torch.rand(8, 16), 2, 4), bits=8)
    with pytest.raises(ValueError, match="mask: expected shape"):
        UnstructuredWeight.pack(w, mask=torch.ones(8, 15, dtype=torch.bool))


@pytest.mark.parametrize("spec, match", [("3:4", "only the 2:4 and 4:8"), ("2-4", "expected 'N:M'"),
                                         (1.5, r"fraction in \[0, 1\)")])
def test_bad_sparsity_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        CompressedLinear.from_linear(torch.nn.Linear(16, 8), sparsity=spec)


def test_mismatched_metadata_is_refused():
    pw, _, _ = make(UnstructuredWeight, 64, 64, 32, True, 0.5)
    st = pw.state_dict()
    bad = dict(st, offsets=st["offsets"] + 1)
    with pytest.raises(ValueError, match="offsets: do not match the masks"):
        PackedWeight.from_state_dict(bad)
    with pytest.raises(ValueError, match="qweight: expected"):
        PackedWeight.from_state_dict(dict(st, qweight=st["qweight"][:-3]))
    masks = st["masks"].clone()
    masks[0, 0] = -1  # keeps every row of a column: the stream no longer matches
    with pytest.raises(ValueError, match="offsets|qweight"):
        PackedWeight.from_state_dict(dict(st, masks=masks))
    s24, _, _ = make(Sparse24Weight, 32, 64, 32, True, "2:4")
    with pytest.raises(ValueError, match="qweight: expected"):
        PackedWeight.from_state_dict(dict(s24.state_dict(), qweight=s24.qweight[:, :-1]))


def test_op_refuses_inconsistent_unstructured_tensors():
    pw, _, _ = make(UnstructuredWeight, 64, 64, 32, True, 0.5)
    x = torch.randn(2, 64)
    args = list(pw.kernel_args())
    args[5] = pw.offsets + 1
    with pytest.raises(RuntimeError, match="offsets: entry"):
        torch.ops.ctp_fast.packed_linear(x, *args, None, *pw.kernel_ints())
    args = list(pw.kernel_args())
    args[0] = pw.qweight[: pw.qweight.numel() // 2]
    with pytest.raises(RuntimeError, match="codes: the masks keep"):
        torch.ops.ctp_fast.packed_linear(x, *args, None, *pw.kernel_ints())


@pytest.mark.parametrize("m", [1, 9])
def test_kernels_report_masks_that_disagree_with_offsets(m):
    """offsets ascending and inside the stream (the cheap checks pass) but a column's mask changed: the
    kernel, which counts the codes anyway, reports it instead of computing with shifted codes."""
    pw, _, _ = make(UnstructuredWeight, 64, 96, 32, True, 0.5)
    masks = pw.masks.clone()
    masks[0, 5] = 0  # block 0 keeps nothing in column 5: the codes of columns 6.. no longer line up
    args = list(pw.kernel_args())
    args[4] = masks
    with pytest.raises(RuntimeError, match=r"offsets: entry \[0, 1\] is \d+ but the masks before it hold"):
        torch.ops.ctp_fast.packed_linear(torch.randn(m, 96), *args, None, *pw.kernel_ints())
    with pytest.raises(RuntimeError, match=r"offsets: entry \[0, 1\]"):
        torch.ops.ctp_fast.packed_linear_grad_input(torch.randn(m, 64), *args, *pw.kernel_ints())


def test_fully_pruned_weight_gives_zero_output():
    pw = UnstructuredWeight.pack(torch.randn(40, 32), mask=torch.zeros(40, 32, dtype=torch.bool))
    assert pw.qweight.numel() == 8  # no codes, the 8 spare bytes only
    assert torch.equal(packed_linear(torch.randn(3, 32), pw), torch.zeros(3, 40))


# ------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize("sparsity, fmt", [("2:4", Sparse24Weight), ("4:8", UnstructuredWeight),
                                           (0.5, UnstructuredWeight), (None, DenseWeight)])
def test_compressed_linear_from_linear_with_sparsity(sparsity, fmt):
    lin = torch.nn.Linear(64, 48)
    mod = CompressedLinear.from_linear(lin, group_size=32, sparsity=sparsity)
    assert isinstance(mod.weight_format, fmt)
    W = mod.weight_format.unpack()
    if sparsity == "2:4":
        assert ((W != 0).view(48, -1, 4).sum(-1) <= 2).all()
    elif sparsity == "4:8":
        assert ((W != 0).view(48, -1, 8).sum(-1) <= 4).all()
    elif sparsity == 0.5:
        assert (W == 0).float().mean() >= 0.5
    x = torch.randn(5, 64, requires_grad=True)
    y = mod(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, lin.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ W, rtol=1e-5, atol=1e-5)
    assert fmt.FORMAT in repr(mod)


def test_given_mask_is_used_exactly():
    lin = torch.nn.Linear(32, 32)
    mask = random_mask(32, 32, 0.6, seed=5)
    mod = CompressedLinear.from_linear(lin, group_size=32, mask=mask)
    assert torch.equal(mod.weight_format.mask(), mask)


def test_gradcheck_sparse_kernel_fp32():
    pw, _, _ = make(Sparse24Weight, 8, 32, 32, True, "2:4")
    x = torch.randn(3, 32, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: packed_linear(t, pw), (x,), eps=1e-2, atol=1e-2, rtol=1e-2,
                                    nondet_tol=1e-5)
    assert math.isfinite(float(packed_linear(x, pw).sum()))
