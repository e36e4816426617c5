"""Every bad argument gives a clear error whose message names the argument."""
from __future__ import annotations

import pytest
import torch

import ctp_fast
from ctp_fast import Int4Weight, int4_linear, int4_linear_grad_input

from conftest import SUPPORTED_ISAS, random_int4

pytestmark = pytest.mark.usefixtures("fixed_seed", "one_thread")

# packed_linear(x, codes, scales, zeros, perm, masks, offsets, bias, layout, bits, out_features, in_features,
# group_size); ctp_fast.int4_linear(x, w, bias) is this op with a dense 4-bit weight (layout 0, bits 4).
op = torch.ops.ctp_fast.packed_linear.default
op_grad = torch.ops.ctp_fast.packed_linear_grad_input.default
N, K, G = 40, 70, 32  # 2 blocks of 32 rows, 3 groups (the last one short)


@pytest.fixture
def w():
    return random_int4(N, K, G, symmetric=False, act_order=True)


def args(w, **over):
    a = dict(x=torch.randn(3, K), codes=w.qweight, scales=w.scales, zeros=w.zeros, perm=w.perm, masks=None,
             offsets=None, bias=torch.randn(N), layout=0, bits=4, out_features=N, in_features=K, group_size=G)
    a.update(over)
    return a


def grad_args(w, **over):
    a = dict(grad_y=torch.randn(3, N), codes=w.qweight, scales=w.scales, zeros=w.zeros, perm=w.perm, masks=None,
             offsets=None, layout=0, bits=4, out_features=N, in_features=K, group_size=G)
    a.update(over)
    return a


def test_good_arguments_work(w):
    """The baseline of every case below runs (so each failure is caused by the one bad argument)."""
    y = op(**args(w))
    assert y.shape == (3, N)
    assert op_grad(**grad_args(w)).shape == (3, K)


BAD_OP_ARGS = {
    "x_float64": (lambda w: dict(x=torch.randn(3, K, dtype=torch.float64)), r"x: expected float32 or bfloat16, got Double"),
    "x_float16": (lambda w: dict(x=torch.randn(3, K, dtype=torch.float16)), r"x: expected float32 or bfloat16, got Half"),
    "x_int": (lambda w: dict(x=torch.randint(0, 3, (3, K))), r"x: expected float32 or bfloat16, got Long"),
    "x_bool": (lambda w: dict(x=torch.ones(3, K, dtype=torch.bool)), r"x: expected float32 or bfloat16"),
    "x_wrong_k": (lambda w: dict(x=torch.randn(3, K + 1)), rf"x: expected last dimension {K}, got shape \[3, {K + 1}\]"),
    "x_scalar": (lambda w: dict(x=torch.tensor(1.0)), r"x: expected last dimension"),
    "codes_int8": (lambda w: dict(codes=w.qweight.to(torch.int8)), r"codes: expected uint8, got Char"),
    "codes_float": (lambda w: dict(codes=w.qweight.float()), r"codes: expected uint8, got Float"),
    "codes_2d": (lambda w: dict(codes=w.qweight.reshape(2, -1)),
                 rf"codes: expected shape \[2, {K}, 16\] for a {N}x{K} 4-bit weight, got \[2, {K * 16}\]"),
    "codes_last_8": (lambda w: dict(codes=w.qweight.reshape(2, -1, 8).contiguous()), r"codes: expected shape"),
    "codes_noncontig": (lambda w: dict(codes=w.qweight.transpose(0, 1).contiguous().transpose(0, 1)),
                        r"codes: expected a contiguous tensor"),
    "codes_short_k": (lambda w: dict(codes=w.qweight[:, :-1].contiguous()), rf"codes: expected shape \[2, {K}, 16\]"),
    "out_features_too_small": (lambda w: dict(out_features=32), rf"codes: expected shape \[1, {K}, 16\] for a 32x{K}"),
    "out_features_too_large": (lambda w: dict(out_features=65), rf"codes: expected shape \[3, {K}, 16\] for a 65x{K}"),
    "out_features_zero": (lambda w: dict(out_features=0), rf"out_features and in_features must be positive, got 0 and {K}"),
    "in_features_zero": (lambda w: dict(in_features=0, x=torch.randn(3, 0)), r"out_features and in_features must be positive"),
    "in_features_mismatch": (lambda w: dict(in_features=K + 1, x=torch.randn(3, K + 1)),
                             rf"codes: expected shape \[2, {K + 1}, 16\]"),
    "layout_bad": (lambda w: dict(layout=3), r"layout: expected 0 \(dense\), 1 \(2:4\) or 2 \(unstructured\), got 3"),
    "bits_bad": (lambda w: dict(bits=5), r"bits: dense weights have 3, 4 or 8 bits, got 5"),
    "bits_mismatch": (lambda w: dict(bits=8), rf"codes: expected shape \[2, {K}, 32\] for a {N}x{K} 8-bit weight"),
    "scales_int": (lambda w: dict(scales=w.scales.to(torch.int32)), r"scales: expected float32, float16 or bfloat16, got Int"),
    "scales_float64": (lambda w: dict(scales=w.scales.double()), r"scales: expected float32, float16 or bfloat16, got Double"),
    "scales_too_few_groups": (lambda w: dict(scales=w.scales[:, :2].contiguous()), r"scales: expected shape \[2, 3, 32\] for K=70 and group_size=32"),
    "scales_lanes": (lambda w: dict(scales=w.scales[..., :16].contiguous()), r"scales: expected shape \[2, 3, 32\]"),
    "scales_blocks": (lambda w: dict(scales=w.scales[:1].contiguous()), r"scales: expected shape \[2, 3, 32\]"),
    "scales_noncontig": (lambda w: dict(scales=w.scales.transpose(0, 1).contiguous().transpose(0, 1)),
                         r"scales: expected a contiguous tensor"),
    "zeros_dtype": (lambda w: dict(zeros=w.zeros.to(torch.int32)), r"zeros: expected uint8, got Int"),
    "zeros_float": (lambda w: dict(zeros=w.zeros.float()), r"zeros: expected uint8, got Float"),
    "zeros_shape": (lambda w: dict(zeros=w.zeros[:, :2].contiguous()), r"zeros: expected the shape of scales"),
    "perm_int32": (lambda w: dict(perm=w.perm.to(torch.int32)), r"perm: expected int64, got Int"),
    "perm_float": (lambda w: dict(perm=w.perm.float()), r"perm: expected int64"),
    "perm_short": (lambda w: dict(perm=w.perm[:-1]), rf"perm: expected shape \[{K}\], got \[{K - 1}\]"),
    "perm_out_of_range": (lambda w: dict(perm=torch.where(w.perm == 5, K, w.perm)), rf"perm: entry \d+ is {K}, outside \[0, {K}\)"),
    "perm_negative": (lambda w: dict(perm=torch.where(w.perm == 5, -1, w.perm)), r"perm: entry \d+ is -1, outside"),
    "bias_shape": (lambda w: dict(bias=torch.randn(N + 1)), rf"bias: expected shape \[{N}\], got \[{N + 1}\]"),
    "bias_2d": (lambda w: dict(bias=torch.randn(1, N)), rf"bias: expected shape \[{N}\]"),
    "bias_int": (lambda w: dict(bias=torch.ones(N, dtype=torch.int64)), r"bias: expected a floating tensor"),
    "group_size_0": (lambda w: dict(group_size=0), r"group_size: expected a positive group size or -1"),
    "group_size_neg5": (lambda w: dict(group_size=-5), r"group_size: expected a positive group size or -1 \(per channel\), got -5"),
    "group_size_mismatch": (lambda w: dict(group_size=64), r"scales: expected shape \[2, 2, 32\] for K=70 and group_size=64"),
}


@pytest.mark.parametrize("case", list(BAD_OP_ARGS))
def test_op_rejects(case, w):
    over, message = BAD_OP_ARGS[case]
    with pytest.raises(RuntimeError, match=message):
        op(**args(w, **over(w)))


@pytest.mark.parametrize("case", [c for c in BAD_OP_ARGS if not c.startswith(("x_", "bias", "in_features"))])
def test_grad_input_op_rejects(case, w):
    over, message = BAD_OP_ARGS[case]
    a = over(w)
    a.pop("x", None)
    with pytest.raises(RuntimeError, match=message):
        op_grad(**grad_args(w, **a))


@pytest.mark.parametrize("bad,message", [
    (torch.randn(3, N, dtype=torch.float64), r"grad_y: expected float32 or bfloat16, got Double"),
    (torch.randint(0, 3, (3, N)), r"grad_y: expected float32 or bfloat16"),
    (torch.randn(3, N + 1), rf"grad_y: expected last dimension {N}"),
    (torch.randn(3, K), rf"grad_y: expected last dimension {N}"),
])
def test_grad_input_rejects_grad_y(bad, message, w):
    with pytest.raises(RuntimeError, match=message):
        int4_linear_grad_input(bad, w)


def test_python_entry_point_and_module_errors(w):
    with pytest.raises(RuntimeError, match=r"x: expected float32 or bfloat16, got Double"):
        int4_linear(torch.randn(3, K, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match=rf"x: expected last dimension {K}"):
        int4_linear(torch.randn(3, K - 1), w)
    with pytest.raises(RuntimeError, match=rf"x: expected last dimension {K}"):
        int4_linear(torch.randn(3, K - 1, requires_grad=True), w)  # through the autograd kernel too
    with pytest.raises(RuntimeError, match=r"bias: expected shape"):
        int4_linear(torch.randn(3, K), w, torch.randn(3))
    layer = ctp_fast.CompressedLinear(w, torch.randn(N))
    with pytest.raises(RuntimeError, match=rf"x: expected last dimension {K}"):
        layer(torch.randn(2, K + 3))
    with pytest.raises(RuntimeError, match=r"x: expected float32 or bfloat16, got Half"):
        layer(torch.randn(2, K).half())


def test_layer_converted_to_double_gives_clear_error(w):
    """model.double() also converts the scales buffer; the op then names the scales."""
    layer = ctp_fast.CompressedLinear(w, torch.randn(N)).double()
    with pytest.raises(RuntimeError, match=r"(x|scales): expected"):
        layer(torch.randn(2, K, dtype=torch.float64))


@pytest.mark.parametrize("g", [48, 0, -5, 256, 1])
def test_pack_rejects_group_size(g):
    with pytest.raises(ValueError, match=rf"group_size: expected one of \(32, 64, 128, -1\).*got {g}"):
        Int4Weight.pack(torch.randn(N, K), group_size=g)


# ------------------------------------------------------------------------------------------- devices
def test_all_meta_inputs_infer_the_shape(w):
    """Meta tensors everywhere: shape inference only (what torch.compile / export rely on)."""
    wm = w.to("meta")
    y = int4_linear(torch.randn(2, 5, K, device="meta"), wm, torch.randn(N, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, N)
    gx = int4_linear_grad_input(torch.randn(4, N, device="meta"), wm)
    assert gx.device.type == "meta" and gx.shape == (4, K)
    with pytest.raises(RuntimeError, match="x: expected last dimension"):
        int4_linear(torch.randn(2, K + 1, device="meta"), wm)


# A meta tensor among the arguments routes the call to the fake impl, which must refuse mixed devices
# (before the fix, a CPU x with meta weights returned uninitialised memory).
def test_meta_x_with_cpu_weight_is_rejected(w):
    with pytest.raises(RuntimeError, match=r"(x|codes|scales).*(device|CPU|cpu|meta)"):
        int4_linear(torch.randn(3, K).to("meta"), w)


def test_cpu_x_with_meta_weight_is_rejected(w):
    with pytest.raises(RuntimeError, match=r"(x|codes|scales).*(device|CPU|cpu|meta)"):
        int4_linear(torch.randn(3, K), w.to("meta"))


def test_meta_bias_with_cpu_x_is_rejected(w):
    with pytest.raises(RuntimeError, match=r"bias.*(device|CPU|cpu|meta)"):
        int4_linear(torch.randn(3, K), w, torch.randn(N, device="meta"))


# ------------------------------------------------------------------------------------------- non-contiguous x
def test_noncontiguous_x_just_works(w):
    W = w.unpack(torch.float64)
    x = torch.randn(K, 6).T  # transposed view
    assert not x.is_contiguous()
    y = int4_linear(x, w)
    ref = x.double() @ W.T
    assert ((y.double() - ref).abs() <= 1e-5 * (x.double().abs() @ W.abs().T)).all()
    xr = torch.randn(K, 6).T.requires_grad_(True)  # and its gradient
    int4_linear(xr, w).backward(torch.ones(6, N))
    torch.testing.assert_close(xr.grad.double(), torch.ones(6, N, dtype=torch.float64) @ W, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- ISA names
def test_set_isa_unknown_name():
    before = ctp_fast.get_isa()
    for bad in ("bogus", "AVX2", "", "avx"):
        with pytest.raises(RuntimeError, match=rf"set_isa\(name\)='{bad}' is not an instruction set ctp_fast "
                                               rf"knows; expected one of scalar, avx2, avx512"):
            ctp_fast.set_isa(bad)
    assert ctp_fast.get_isa() == before  # a failed set_isa changes nothing


@pytest.mark.parametrize("name", [n for n in ("avx2", "avx512") if n not in SUPPORTED_ISAS] or
                         [pytest.param("avx512", marks=pytest.mark.skip(reason="this CPU supports every ISA"))])
def test_set_isa_unsupported(name):
    before = ctp_fast.get_isa()
    with pytest.raises(RuntimeError, match=rf"set_isa\(name\)='{name}' but this CPU does not support {name}"):
        ctp_fast.set_isa(name)
    assert ctp_fast.get_isa() == before


def test_supported_isas():
    assert SUPPORTED_ISAS[0] == "scalar"
    assert set(SUPPORTED_ISAS) <= {"scalar", "avx2", "avx512", "avx512bf16", "amx"}
    assert ctp_fast.supported_isas() == SUPPORTED_ISAS


def test_set_isa_switches_path(isa):
    assert ctp_fast.get_isa() == isa
