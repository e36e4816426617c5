"""CUDA kernels against references, on a GPU (skipped cleanly without one, or with a CPU-only build):
packed_linear / packed_linear_grad_input for the dense, 2:4 and unstructured int4 formats over M,
shapes, group sizes, sym/asym, act-order, fp16 and bf16 (mean relative error against a 16-bit matmul on
the dequantized weight); autograd through CompressedLinear; .to("cuda") round trips and device-neutral
state dicts; prompt-prefixed attention forward and backward against a concat-everything reference
(GQA, kv_start, P = 0, decode L = 1 with S > L); bad input refused with messages naming the argument."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import ctp_fast
from ctp_fast import CompressedLinear, DenseWeight, Sparse24Weight, UnstructuredWeight, packed_linear, \
    packed_linear_grad_input
from ctp_fast.compress import nm_mask
from ctp_fast.formats.cuda_layout import CudaPackedWeight

HAS_CUDA = torch.cuda.is_available() and ctp_fast._C.has_cuda()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and ctp_fast built with CUDA")
DEV = "cuda"
# mean relative error bounds: fp16 operands against an fp16 matmul (the 1e-3); bf16 has 3 fewer
# mantissa bits (scales are rounded to bf16 before the multiply), so its bound is 8x wider.
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
FORMATS = {"dense": (DenseWeight, None), "2:4": (Sparse24Weight, "2:4"), "unstructured50": (UnstructuredWeight, 0.5),
           "unstructured75": (UnstructuredWeight, 0.75), "unstructured90": (UnstructuredWeight, 0.9)}


def mre(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all()
    return ((y - ref).abs().mean() / ref.abs().mean()).item()


@functools.lru_cache(maxsize=None)
def packed(fmt: str, n: int, k: int, g: int, sym: bool, act: bool = False, seed: int = 0):
    cls, sparsity = FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = None
    if sparsity == "2:4":
        mask = nm_mask(w.abs(), 2, 4)
    elif sparsity is not None:
        mask = torch.rand(n, k, generator=gen) >= sparsity
    perm = torch.randperm(k, generator=gen) if act else None
    pw = cls.pack(w, group_size=g, symmetric=sym, mask=mask, perm=perm)
    return pw, pw.to(DEV)


def check_linear(fmt, n, k, g, sym, m, dtype, act=False):
    pw, cw = packed(fmt, n, k, g, sym, act)
    assert isinstance(cw, CudaPackedWeight) and cw.qweight.is_cuda
    W = pw.unpack().to(DEV, dtype)
    x = torch.randn(m, k, device=DEV).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    y = packed_linear(x, cw, b)
    assert y.dtype == dtype and y.shape == (m, n)
    assert mre(y, torch.nn.functional.linear(x, W, b)) < TOL[dtype], (fmt, n, k, g, sym, m, dtype)
    gy = torch.randn(m, n, device=DEV).to(dtype)
    gx = packed_linear_grad_input(gy, cw)
    assert gx.dtype == dtype and gx.shape == (m, k)
    assert mre(gx, gy @ W) < TOL[dtype], ("grad", fmt, n, k, g, sym, m, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["dense", "2:4", "unstructured50", "unstructured75"])
@pytest.mark.parametrize("m", list(range(1, 17)) + [31, 128, 512])
def test_linear_and_grad_over_m(fmt, m, dtype):
    check_linear(fmt, 256, 512, 128, True, m, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("fmt", ["dense", "2:4", "unstructured50", "unstructured90"])
@pytest.mark.parametrize("n,k", [(200, 576), (33, 100), (1536, 576)])
def test_linear_and_grad_over_shapes_and_groups(fmt, n, k, g, sym, dtype):
    if fmt == "2:4" and k % 4:
        pytest.skip("2:4 needs K % 4 == 0")
    for m in (1, 7, 16, 65):
        check_linear(fmt, n, k, g, sym, m, dtype)


@pytest.mark.parametrize("fmt", ["dense", "unstructured50"])
@pytest.mark.parametrize("sym", [True, False])
def test_act_order(fmt, sym):
    for m in (1, 16, 128):
        check_linear(fmt, 192, 384, 64, sym, m, torch.float16, act=True)


@pytest.mark.parametrize("fmt", ["dense", "2:4", "unstructured75"])
def test_llama_shapes(fmt):
    for n, k in ((4096, 4096),) if fmt != "dense" else ((4096, 4096), (11008, 4096), (4096, 11008)):
        for m in (1, 16, 128):
            check_linear(fmt, n, k, 128, True, m, torch.float16)


def test_strided_and_batched_input():
    pw, cw = packed("dense", 128, 256, 64, False)
    W = pw.unpack().to(DEV, torch.float16)
    x = torch.randn(3, 5, 512, device=DEV, dtype=torch.float16)[..., ::2]  # last dim strided: copied
    assert mre(packed_linear(x, cw), x @ W.T) < 1e-3
    x = torch.randn(3, 5, 300, device=DEV, dtype=torch.float16)[..., :256]  # rows 300 apart
    assert mre(packed_linear(x, cw), x @ W.T) < 1e-3
    assert packed_linear(torch.zeros(0, 256, device=DEV, dtype=torch.float16), cw).shape == (0, 128)


@pytest.mark.parametrize("fmt", ["dense", "2:4", "unstructured50"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compressed_linear_autograd_matches_dense(fmt, dtype):
    pw, _ = packed(fmt, 96, 256, 64, False)
    mod = CompressedLinear(pw, torch.randn(96)).to(DEV)
    assert mod._cuda_layout and mod.qweight.is_cuda and isinstance(mod.weight_format, CudaPackedWeight)
    mod.bias.data = mod.bias.data.to(dtype)
    dense = torch.nn.Linear(256, 96).to(DEV, dtype)
    with torch.no_grad():
        dense.weight.copy_(pw.unpack().to(dtype))
        dense.bias.copy_(mod.bias)
    x = torch.randn(4, 9, 256, device=DEV, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(4, 9, 96, device=DEV, dtype=dtype)
    (mod(x) * gy).sum().backward()
    (dense(x2) * gy).sum().backward()
    assert mre(x.grad, x2.grad) < TOL[dtype]
    assert mre(mod.bias.grad, dense.bias.grad) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["dense", "2:4", "unstructured75"])
def test_to_cuda_and_back_round_trips(fmt, tmp_path):
    pw, _ = packed(fmt, 80, 192, 64, False, act=fmt != "2:4")
    mod = CompressedLinear(pw, torch.randn(80))
    ref_state = {k: v.clone() for k, v in mod.state_dict().items()}
    mod.to(DEV)
    assert mod._cuda_layout and mod.qweight.is_cuda and mod.bias.is_cuda
    state = mod.state_dict()  # device neutral: the CPU layout, on the CPU
    assert sorted(state) == sorted(ref_state)
    for key, t in state.items():
        assert t.device.type == "cpu" and t.dtype == ref_state[key].dtype and t.shape == ref_state[key].shape, key
    assert torch.equal(CompressedLinear(pw).dequantize().weight, mod.dequantize().weight)
    torch.save(state, tmp_path / "m.pt")
    mod.half().cpu()
    assert not mod._cuda_layout and mod.qweight.device.type == "cpu"
    back = mod.weight_format
    assert type(back) is type(pw) and torch.equal(back.unpack(), pw.unpack())
    if fmt != "2:4":  # same bytes back
        for key, t in pw.tensors().items():
            assert torch.equal(back.tensors()[key], t), key
    fresh = CompressedLinear(packed(fmt, 80, 192, 64, False, act=fmt != "2:4", seed=3)[0]).to(DEV)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"), strict=False)
    assert fresh._cuda_layout and torch.equal(fresh.dequantize().weight, CompressedLinear(pw).dequantize().weight)


def test_bad_input_is_refused_naming_the_argument():
    pw, cw = packed("dense", 64, 128, 64, True)
    x = torch.randn(2, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x: the CUDA kernels take float16 or bfloat16"):
        packed_linear(x.float(), cw)
    with pytest.raises(RuntimeError, match="codes: expected a CUDA tensor on cuda:0 like x, got cpu"):
        packed_linear(x, cw.map(lambda t: t.cpu()))
    with pytest.raises(RuntimeError, match="x: expected a CUDA tensor, got cpu"):  # CUDA weights win dispatch
        packed_linear(x.cpu().float(), cw)
    with pytest.raises(RuntimeError, match=r"codes: expected a contiguous Int tensor .*CUDA layout"):
        packed_linear(x, pw.map(lambda t: t.cuda()))  # CPU bytes moved without repacking
    with pytest.raises(RuntimeError, match="x: expected last dimension 128"):
        packed_linear(x[:, :100], cw)
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        packed_linear(x, cw, torch.zeros(3, device=DEV))
    with pytest.raises(RuntimeError, match="grad_y: expected last dimension 64"):
        packed_linear_grad_input(x, cw)
    with pytest.raises(ValueError, match="4-bit"):
        DenseWeight.pack(torch.randn(8, 64), bits=8).to(DEV)


# ----------------------------------------------------------------------------- prefix attention
def attention_reference(q, k, v, kp, vp, kv_start, causal, scale):
    """Everything concatenated, fp32: keys [prefix ; own] with the mask spelled out."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], kp.shape[1]
    rep = H // Hkv
    keys = torch.cat([kp.float().unsqueeze(0).expand(B, -1, -1, -1), k.float()], 2).repeat_interleave(rep, 1)
    vals = torch.cat([vp.float().unsqueeze(0).expand(B, -1, -1, -1), v.float()], 2).repeat_interleave(rep, 1)
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    own = torch.ones(B, L, S, dtype=torch.bool, device=q.device)
    if causal:
        own = own & (j <= S - L + i)
    if kv_start is not None:
        own = own & (j[None] >= kv_start.to(q.device).view(B, 1, 1))
    allowed = torch.cat([torch.ones(B, L, P, dtype=torch.bool, device=q.device), own], 2)[:, None]
    s = scale * q.float() @ keys.transpose(-1, -2)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ vals, lse


ATTN_CASES = [
    # B, H, Hkv, L, S, P, D, causal, kv_start
    (2, 4, 4, 16, 16, 5, 64, True, None),
    (2, 8, 2, 33, 40, 100, 64, True, "int64"),   # GQA, KV cache longer than the queries, left padding
    (3, 6, 3, 1, 77, 100, 128, True, "int32"),   # decode
    (2, 4, 1, 1, 300, 0, 128, True, None),       # decode, no prompt
    (2, 4, 2, 20, 20, 0, 80, False, "int32"),    # P = 0, not causal, D not a multiple of 32
    (1, 2, 2, 65, 65, 7, 256, True, None),       # largest head dim
    (2, 2, 2, 9, 9, 3, 32, False, None),
]


def attn_inputs(case, dtype, seed=0):
    B, H, Hkv, L, S, P, D, causal, ks = case
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g).to(dtype)  # noqa: E731
    q = r(B, L, H, D).transpose(1, 2)  # strided like a projection's output
    k, v = r(B, Hkv, S, D), r(B, Hkv, S, D)
    kp, vp = r(Hkv, P, D), r(Hkv, P, D)
    kv_start = None
    if ks is not None:
        kv_start = torch.tensor([min(3 * b, S - L) for b in range(B)], device=DEV,
                                dtype=torch.int32 if ks == "int32" else torch.int64)
    return q, k, v, kp, vp, kv_start, causal, 1.0 / math.sqrt(D)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_prefix_attention_forward_and_backward(case, dtype):
    q, k, v, kp, vp, kv_start, causal, scale = attn_inputs(case, dtype)
    out, lse = torch.ops.ctp_fast.prefix_attention(q, k, v, kp, vp, kv_start, causal, scale)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, kp, vp)]
    ref_out, ref_lse = attention_reference(*ref_in, kv_start, causal, scale)
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert rel(out, ref_out) < tol
    assert (lse - ref_lse).abs().max().item() < 1e-2
    gout = torch.randn_like(out)
    grads = torch.ops.ctp_fast.prefix_attention_backward(gout, q, k, v, kp, vp, out, lse, kv_start, causal, scale)
    ref_out.backward(gout.float())
    names = ("dq", "dk", "dv", "dk_prefix", "dv_prefix")
    for name, got, src, t in zip(names, grads, ref_in, (q, k, v, kp, vp)):
        assert got.shape == t.shape and got.dtype == t.dtype, name
        if t.numel():
            assert rel(got, src.grad) < 3 * tol, (name, rel(got, src.grad))


def test_prefix_attention_decode_equals_last_row_of_prefill():
    case = (2, 8, 2, 24, 24, 100, 64, True, None)
    q, k, v, kp, vp, _, causal, scale = attn_inputs(case, torch.float16, seed=1)
    full, _ = torch.ops.ctp_fast.prefix_attention(q, k, v, kp, vp, None, True, scale)
    last, _ = torch.ops.ctp_fast.prefix_attention(q[:, :, -1:], k, v, kp, vp, None, True, scale)
    assert rel(last, full[:, :, -1:]) < 2e-3


def test_prefix_attention_bad_input():
    q, k, v, kp, vp, kv_start, causal, scale = attn_inputs(ATTN_CASES[1], torch.float16)
    op = torch.ops.ctp_fast.prefix_attention
    with pytest.raises(RuntimeError, match="k: expected Half like q"):
        op(q, k.bfloat16(), v, kp, vp, kv_start, causal, scale)
    with pytest.raises(RuntimeError, match="v_prefix: expected a CUDA tensor"):
        op(q, k, v, kp, vp.cpu(), kv_start, causal, scale)
    with pytest.raises(RuntimeError, match="kv_start: expected an int32 or int64"):
        op(q, k, v, kp, vp, kv_start.float(), causal, scale)
    with pytest.raises(RuntimeError, match="must be a multiple of the kv heads"):
        op(q[:, :3], k[:, :2], v[:, :2], kp[:2], vp[:2], kv_start, causal, scale)
    with pytest.raises(RuntimeError, match="k: expected at least as many keys as queries"):
        op(q, k[:, :, :10], v[:, :, :10], kp, vp, kv_start, causal, scale)
    with pytest.raises(RuntimeError, match="head_dim must be in 1..256"):
        big = torch.zeros(1, 1, 1, 300, device=DEV, dtype=torch.float16)
        op(big, big, big, big[0], big[0], None, True, 1.0)
    with pytest.raises(RuntimeError, match="the CUDA kernels take float16 or bfloat16"):
        op(q.float(), k.float(), v.float(), kp.float(), vp.float(), None, True, 1.0)


@pytest.mark.parametrize("sparsity", [None, "2:4", 0.6])
def test_from_linear_on_the_gpu(sparsity):
    lin = torch.nn.Linear(256, 72).to(DEV, torch.float16)
    mod = CompressedLinear.from_linear(lin, group_size=64, sparsity=sparsity)
    assert mod._cuda_layout and mod.qweight.is_cuda and mod.bias.is_cuda
    x = torch.randn(5, 256, device=DEV, dtype=torch.float16)
    assert mre(mod(x), mod.dequantize().to(DEV, torch.float16)(x)) < 1e-3
