"""The bf16 dot-product path of the CPU kernels (ISA avx512bf16; csrc/cpu/qlinear_bf16.h).

bf16 activations of M > 4 rows meet W's dequantized values rounded to bf16 in vdpbf16ps dot products
with fp32 accumulation. Reference: x.double() @ Wb.T with Wb = W rounded to bf16 from its fp32
dequantized values (conftest.kernel_weight); tolerance 1e-5 of sum |x||Wb| for the fp32 accumulation
plus 2^-8 |ref| for the bf16 output, as for the fp32 kernels. Every layout and bit width, odd sizes
(odd K and N leave half-filled pairs, N not a multiple of 32 a partial block), act-order, group sizes,
M from 5 to hundreds.
"""
from __future__ import annotations

import pytest
import torch

import ctp_fast
from ctp_fast import DenseWeight, Sparse24Weight, UnstructuredWeight, packed_linear, packed_linear_grad_input

from conftest import kernel_weight
from test_sparse_formats import random_mask

pytestmark = [pytest.mark.usefixtures("fixed_seed", "one_thread"),
              pytest.mark.skipif("avx512bf16" not in ctp_fast.supported_isas(), reason="CPU lacks AVX512_BF16")]

MS = [5, 8, 9, 31, 64, 130, 300]
SHAPES = [(33, 40), (200, 129), (96, 300), (576, 1536), (77, 257)]  # (N, K)


@pytest.fixture(autouse=True)
def bf16_path():
    previous = ctp_fast.get_isa()
    ctp_fast.set_isa("avx512bf16")
    yield
    ctp_fast.set_isa(previous)


def make(layout, n, k, g, sym, act=False, scale_dtype=torch.float32):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if act else None
    if layout.startswith("dense"):
        return DenseWeight.pack(w, group_size=g, symmetric=sym, bits=int(layout[5:]), scale_dtype=scale_dtype,
                                perm=perm)
    if layout == "2:4":
        return Sparse24Weight.pack(w, group_size=g, symmetric=sym, mask=random_mask(n, k, "2:4"),
                                   scale_dtype=scale_dtype)
    sparsity = float(layout.split("@")[1])
    return UnstructuredWeight.pack(w, group_size=g, symmetric=sym, mask=random_mask(n, k, sparsity),
                                   scale_dtype=scale_dtype)


def check(pw, m):
    W = pw.unpack(torch.float64)
    n, k = W.shape
    Wb = kernel_weight(W, torch.bfloat16, m)
    assert not torch.equal(Wb, W) or W.abs().max() == 0  # the path under test rounds W
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n)
    y = packed_linear(x, pw, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = x.double() @ Wb.T + b.double()
    tol = 1e-5 * (x.double().abs() @ Wb.abs().T + b.double().abs()) + 2 ** -8 * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), f"forward M={m}: {int((err > tol).sum())} elements off, worst {(err / tol).max():.3g}x"
    gy = torch.randn(m, n).bfloat16()
    gx = packed_linear_grad_input(gy, pw)
    assert gx.dtype == torch.bfloat16 and gx.shape == (m, k)
    gref = gy.double() @ Wb
    gtol = 1e-5 * (gy.double().abs() @ Wb.abs()) + 2 ** -8 * gref.abs() + 1e-30
    gerr = (gx.double() - gref).abs()
    assert (gerr <= gtol).all(), f"grad_input M={m}: {int((gerr > gtol).sum())} off, worst {(gerr / gtol).max():.3g}x"


@pytest.mark.parametrize("layout", ["dense4", "dense3", "dense8", "2:4", "unstructured@0.5", "unstructured@0.9"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layouts_shapes(layout, shape):
    n, k = shape
    if layout == "2:4" and k % 4:
        k += 4 - k % 4
    pw = make(layout, n, k, 32, sym=False)
    for m in (5, 64, 130):
        check(pw, m)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("layout", ["dense4", "2:4", "unstructured@0.75"])
def test_every_m(layout, m):
    check(make(layout, 200, 132, 64, sym=True, scale_dtype=torch.float16), m)


@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("sd", [torch.float32, torch.float16, torch.bfloat16], ids=["s_fp32", "s_fp16", "s_bf16"])
def test_groups_scales(g, sym, sd):
    check(make("dense4", 96, 300, g, sym, scale_dtype=sd), 37)


@pytest.mark.parametrize("layout", ["dense4", "dense3", "dense8"])
def test_act_order(layout):
    check(make(layout, 200, 129, 32, sym=False, act=True), 64)


@pytest.mark.parametrize("layout", ["2:4", "unstructured@0.0", "unstructured@0.95", "unstructured@1.0"])
def test_sparsity_extremes(layout):
    check(make(layout, 96, 256, 64, sym=False), 40)


def test_path_is_taken_exactly_where_bf16_gemm_says(isa):
    """bf16_gemm(m) holds on avx512bf16 for m > 4 only, and the kernels agree: at m > 4 the bf16 result
    differs from the exact-W fp32 computation by W's rounding, at m <= 4 it does not."""
    on = isa == "avx512bf16"
    assert [ctp_fast.ops.bf16_gemm(m) for m in (1, 4, 5, 300)] == [False, False, on, on]
    pw = make("dense4", 96, 300, 64, sym=False)
    for m in (4, 5):
        x = torch.randn(m, 300).bfloat16()
        exact = packed_linear(x.float(), pw)  # fp32 activations: W exactly
        y = packed_linear(x, pw)
        assert torch.equal(y, exact.bfloat16()) == (not ctp_fast.ops.bf16_gemm(m))


def test_threads_give_the_same_bits():
    pw = make("unstructured@0.5", 576, 1536, 64, sym=False)
    x, gy = torch.randn(130, 1536).bfloat16(), torch.randn(130, 576).bfloat16()
    y1, g1 = packed_linear(x, pw), packed_linear_grad_input(gy, pw)
    torch.set_num_threads(2)
    assert torch.equal(packed_linear(x, pw), y1) and torch.equal(packed_linear_grad_input(gy, pw), g1)


def test_precision_against_the_exact_weight():
    """Rounding W to bf16 moves each product by at most 2^-9 of |x||W|: the result stays within
    2^-8 sum |x||W| (+ output rounding) of the exact-W product, and much closer on average."""
    pw = make("dense4", 576, 1536, 128, sym=False)
    W = pw.unpack(torch.float64)
    x = torch.randn(64, 1536).bfloat16()
    ref = x.double() @ W.T
    mag = x.double().abs() @ W.abs().T
    err = (packed_linear(x, pw).double() - ref).abs()
    assert (err <= 2 ** -8 * (mag + ref.abs())).all()
    assert (err / mag).mean() < 2 ** -11
