"""CompressedLinear (forward/backward vs the dequantized dense layer, state dict) and swap_linears."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctp_fast import CompressedLinear, Int4Weight, int4_linear, swap_linears
from ctp_fast.nn import dequantized_copy

from conftest import error_scale

pytestmark = pytest.mark.usefixtures("fixed_seed", "one_thread")

# fp32 compute on both sides, different summation orders: ~sqrt(K) 2^-24 relative to sum |x||W|
# (the small-M kernel: relative to sum |x| (q + z)|s|, see test_int4_kernels.py and conftest.error_scale).
RTOL, ATOL = 1e-5, 1e-5


def dense_ref(layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    """F.linear with the dequantized weight, in double."""
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight_format.unpack(torch.float64), b)


def assert_close_to_ref(y, ref, x, layer):
    mag = F.linear(x.double().abs(), error_scale(layer.weight_format),
                   None if layer.bias is None else layer.bias.double().abs())
    err = (y.double() - ref).abs()
    assert (err <= 1e-5 * mag).all(), f"max err {err.max().item():.3g}"


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("act", [False, True], ids=["noperm", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear_forward_matches_dequantized(isa, bias, g, sym, act):
    lin = nn.Linear(129, 70, bias=bias)
    perm = torch.randperm(129) if act else None
    layer = CompressedLinear.from_linear(lin, group_size=g, symmetric=sym, perm=perm)
    assert (layer.in_features, layer.out_features) == (129, 70)
    assert layer.group_size == g and (layer.zeros is None) == sym and (layer.perm is None) == (not act)
    if bias:
        assert torch.equal(layer.bias, lin.bias) and layer.bias is not lin.bias
    else:
        assert layer.bias is None
    for shape in [(3, 129), (2, 9, 129), (129,)]:
        x = torch.randn(shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 70)
        assert_close_to_ref(y, dense_ref(layer, x), x, layer)
    # and the dequantized weight is close to the original one (RTN: at most half a step away)
    assert (layer.weight_format.unpack() - lin.weight).abs().max() < 0.05


def test_dequantize_returns_linear_with_unpacked_weight():
    lin = nn.Linear(40, 33)
    layer = CompressedLinear.from_linear(lin, group_size=32, symmetric=False)
    d = layer.dequantize()
    assert type(d) is nn.Linear and (d.in_features, d.out_features) == (40, 33)
    assert torch.equal(d.weight, layer.weight_format.unpack())
    assert torch.equal(d.bias, layer.bias)
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), d(x), rtol=RTOL, atol=ATOL)
    d2 = CompressedLinear.from_linear(nn.Linear(40, 33, bias=False)).dequantize()
    assert d2.bias is None


def test_bf16_model():
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    layer = CompressedLinear.from_linear(lin, group_size=32, scale_dtype=torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), dense_ref(layer, x).float(), rtol=2 ** -7, atol=1e-3)


def test_autocast_runs_like_nn_linear():
    """Under bf16 autocast an fp32 CompressedLinear computes on bf16 activations and returns bf16, as
    nn.Linear does; the gradient reaching an fp32 input is fp32."""
    lin = nn.Linear(64, 48)
    layer = CompressedLinear.from_linear(lin, group_size=32)
    x = torch.randn(9, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16
    assert torch.equal(y, int4_linear(x.detach().bfloat16(), layer.weight_format, layer.bias))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer(x).dtype == torch.float32  # outside autocast: fp32 as before


def test_extra_repr_names_format_and_bytes():
    layer = CompressedLinear.from_linear(nn.Linear(129, 70), group_size=64, symmetric=False,
                                         perm=torch.randperm(129))
    r = repr(layer)
    assert r.startswith("CompressedLinear(")
    assert "in_features=129" in r and "out_features=70" in r and "bias=True" in r
    assert "format=dense int4 g64 asym, act-order scales=float16" in r
    assert f"bytes={layer.nbytes}" in r and layer.nbytes == layer.weight_format.nbytes
    assert f"({layer.nbytes / (129 * 70):.3f}/weight)" in r
    r2 = repr(CompressedLinear.from_linear(nn.Linear(64, 32, bias=False), group_size=-1,
                                           scale_dtype=torch.float32))
    assert "format=dense int4 per-channel sym scales=float32" in r2 and "bias=False" in r2
    assert "act-order" not in r2


def test_constructor_and_from_linear_reject():
    w = Int4Weight.pack(torch.randn(33, 40), group_size=32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(33,\)"):
        CompressedLinear(w, torch.randn(32))
    with pytest.raises(ValueError, match="bits: the dense format stores 3 or 4 or 8-bit codes, got 5"):
        CompressedLinear.from_linear(nn.Linear(40, 33), bits=5)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        CompressedLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="group_size"):
        CompressedLinear.from_linear(nn.Linear(40, 33), group_size=48)


# ------------------------------------------------------------------------------------------- state dict
# Two designs are accepted here: the state dict may carry the format config (`_extra_state`, then a
# config for another shape / format must be rejected), or the module may check the incoming tensors
# against its own format. Either way, a bad state dict raises a ValueError naming the offending key and
# leaves the module untouched, and a good one round-trips exactly.
def _fresh_like(layer_args, **quant):
    """A module of the same shape built from a differently-initialized nn.Linear."""
    torch.manual_seed(1234)
    return CompressedLinear.from_linear(nn.Linear(*layer_args), **quant)


def _tensors(module):
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_untouched(module, before):
    after = _tensors(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


QUANTS = [
    dict(group_size=32, symmetric=True),
    dict(group_size=64, symmetric=False, scale_dtype=torch.float32),
    dict(group_size=-1, symmetric=False, scale_dtype=torch.bfloat16, perm="random"),
]


def _quant(q, k):
    q = dict(q)
    if q.get("perm") == "random":
        q["perm"] = torch.randperm(k)
    return q


@pytest.mark.parametrize("quant", QUANTS, ids=["g32sym", "g64asym", "perchannel_act"])
def test_state_dict_round_trip(quant, tmp_path):
    layer = CompressedLinear.from_linear(nn.Linear(129, 70), **_quant(quant, 129))
    sd = layer.state_dict()
    assert {"qweight", "scales", "bias"} <= set(sd)
    assert ("zeros" in sd) == (not quant["symmetric"]) and ("perm" in sd) == ("perm" in quant)
    if "_extra_state" in sd:
        assert sd["_extra_state"]["format"] == "dense" and sd["_extra_state"]["bits"] == 4
    x = torch.randn(4, 129)
    y = layer(x)
    # a fresh module: same shape and format, different weights
    fresh = _fresh_like((129, 70), **_quant(quant, 129))
    assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    for key in ("qweight", "scales", "zeros", "perm", "bias"):
        a, b = getattr(layer, key), getattr(fresh, key)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), key
    assert fresh.group_size == layer.group_size
    # the loaded tensors are copies, not aliases of the state dict
    assert fresh.qweight.data_ptr() != sd["qweight"].data_ptr()
    # through a file
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh2 = _fresh_like((129, 70), **_quant(quant, 129))
    fresh2.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh2(x), y)


@pytest.mark.parametrize("saved", range(3), ids=["g32sym", "g64asym", "perchannel_act"])
@pytest.mark.parametrize("target", range(3), ids=["into_g32sym", "into_g64asym", "into_perchannel_act"])
def test_state_dict_into_other_format_never_silently_wrong(saved, target):
    """Loading into a module quantized differently either adopts the saved weight exactly or raises a
    ValueError naming a weight tensor (leaving the module as it was) - never a silently wrong layer."""
    layer = CompressedLinear.from_linear(nn.Linear(129, 70), **_quant(QUANTS[saved], 129))
    fresh = _fresh_like((129, 70), **_quant(QUANTS[target], 129))
    x = torch.randn(3, 129)
    before = _tensors(fresh)
    y_before = fresh(x)
    try:
        fresh.load_state_dict(layer.state_dict())
    except ValueError as e:
        assert any(k in str(e) for k in ("qweight", "scales", "zeros", "perm")), str(e)
        _assert_untouched(fresh, before)
        assert torch.equal(fresh(x), y_before)
    else:
        assert torch.equal(fresh(x), layer(x))
        assert torch.equal(fresh.weight_format.unpack(), layer.weight_format.unpack())


def test_state_dict_round_trip_nested_model(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40))
        swap_linears(m, group_size=32)
        return m
    m, fresh = build(0), build(1)
    x = torch.randn(3, 64)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(fresh(x), m(x))


def _corrupt(sd, **changes):
    sd = dict(sd)
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def test_corrupted_state_dict_raises_naming_the_key():
    layer = CompressedLinear.from_linear(nn.Linear(129, 70), group_size=64, symmetric=False)
    sd = layer.state_dict()
    fresh = _fresh_like((129, 70), group_size=64, symmetric=False)
    before = _tensors(fresh)
    cases = [
        (_corrupt(sd, qweight=sd["qweight"].to(torch.int32)), "qweight: expected torch.uint8"),
        (_corrupt(sd, qweight=sd["qweight"][:, :-1].clone()), r"qweight: expected torch.uint8 \(3, 129, 16\)"),
        (_corrupt(sd, qweight=sd["qweight"].flatten()), "qweight: expected torch.uint8"),
        (_corrupt(sd, scales=sd["scales"][:, :1].clone()), "scales: expected"),
        (_corrupt(sd, scales=sd["scales"].double()), "scales: expected"),
        (_corrupt(sd, scales=sd["scales"].to(torch.int32)), "scales: expected"),
        (_corrupt(sd, zeros=sd["zeros"].float()), "zeros: expected uint8"),
        (_corrupt(sd, zeros=sd["zeros"][..., :16].clone()), "zeros: expected uint8"),
        (_corrupt(sd, perm=torch.arange(129)), "perm"),  # act_order: a perm that this weight does not have
        (_corrupt(sd, qweight=None), "qweight"),
        (_corrupt(sd, scales=None), "scales"),
    ]
    if "_extra_state" in sd:  # the saved config itself
        cases += [
            (_corrupt(sd, _extra_state=None), "_extra_state"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "format": "fp8"}), "not a ctp_fast packed weight"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "version": 99}), "version 99"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "in_features": 128}),
             r"qweight: expected torch.uint8 \(3, 128, 16\)"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "bits": 8}), r"qweight: expected torch.uint8 \(3, 129, 32\)"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "out_features": 100}), "qweight"),
            (_corrupt(sd, _extra_state={**sd["_extra_state"], "symmetric": True}), "zeros: config says symmetric=True"),
        ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad)
        _assert_untouched(fresh, before)  # nothing was half-loaded


def test_state_dict_of_a_different_shape_raises():
    small = CompressedLinear.from_linear(nn.Linear(64, 32), group_size=32)
    big = CompressedLinear.from_linear(nn.Linear(129, 70), group_size=32)
    before = _tensors(big)
    # saved config: "state_dict holds a 32x64 weight, this module is 70x129"; own config: the qweight shape
    with pytest.raises(ValueError, match=r"32x64 weight, this module is 70x129|qweight: expected torch.uint8 \(3, 129, 16\)"):
        big.load_state_dict(small.state_dict())
    _assert_untouched(big, before)
    # nested: the message starts with the module's key prefix
    model = nn.Sequential(nn.Identity(), big)
    with pytest.raises(ValueError, match=r"^1\."):
        model.load_state_dict({f"1.{k}": v for k, v in small.state_dict().items()})
    with pytest.raises(ValueError, match=r"^1\.(_extra_state|.*qweight)"):
        model.load_state_dict({f"1.{k}": v for k, v in big.state_dict().items() if k not in ("_extra_state", "qweight")})
    _assert_untouched(big, before)


# ------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("act", [False, True], ids=["noperm", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_input_and_bias_grad_match_dense(isa, m, sym, act):
    lin = nn.Linear(129, 70)
    layer = CompressedLinear.from_linear(lin, group_size=32, symmetric=sym,
                                         perm=torch.randperm(129) if act else None)
    w_ref = layer.weight_format.unpack().requires_grad_(False)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    x = torch.randn(2, m, 129, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    gy = torch.randn(2, m, 70)
    layer(x).backward(gy)
    F.linear(x_ref, w_ref, b_ref).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=RTOL, atol=ATOL)
    # the packed weight is frozen: buffers, no grad; only the bias is a parameter
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    for key in ("qweight", "scales", "zeros", "perm"):
        t = getattr(layer, key)
        assert t is None or (not t.requires_grad and t.grad is None), key


def test_grad_without_bias_and_frozen_bias():
    layer = CompressedLinear.from_linear(nn.Linear(40, 33, bias=False), group_size=32)
    x = torch.randn(5, 40, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight_format.unpack().sum(0).expand(5, 40), rtol=RTOL, atol=ATOL)
    lin = nn.Linear(40, 33)
    lin.bias.requires_grad_(False)
    layer = CompressedLinear.from_linear(lin, group_size=32)
    x = torch.randn(5, 40, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and x.grad is not None


def test_bias_grad_only():
    layer = CompressedLinear.from_linear(nn.Linear(40, 33), group_size=32)
    x = torch.randn(4, 3, 40)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((33,), 12.0))


def test_empty_batch_backward(isa):
    layer = CompressedLinear.from_linear(nn.Linear(40, 33), group_size=32)
    x = torch.randn(0, 40, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 40) and torch.equal(layer.bias.grad, torch.zeros(33))


def test_bf16_input_grad():
    layer = CompressedLinear.from_linear(nn.Linear(64, 48), group_size=32)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(4, 48, dtype=torch.bfloat16)
    layer(x).backward(gy)
    assert x.grad.dtype == torch.bfloat16
    ref = gy.double() @ layer.weight_format.unpack(torch.float64)
    torch.testing.assert_close(x.grad.double(), ref, rtol=2 ** -7, atol=1e-2)


def test_gradcheck_reference_double():
    """The reference path (unpack + F.linear in double) is consistently differentiable."""
    w = Int4Weight.pack(torch.randn(6, 40), group_size=32, symmetric=False, perm=torch.randperm(40))
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: F.linear(x, w.unpack(torch.float64), b), (x, b))


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gradcheck_kernel_fp32(isa, sym):
    """The kernel's backward agrees with finite differences of the kernel's forward (fp32, loose)."""
    w = Int4Weight.pack(torch.randn(33, 40) * 0.3, group_size=32, symmetric=sym, perm=torch.randperm(40),
                        scale_dtype=torch.float32)
    x = torch.randn(2, 40, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: int4_linear(x, w, b), (x, b), eps=1e-2, atol=1e-2, rtol=1e-2)
    x1 = torch.randn(40, requires_grad=True)  # 1-D input, gemv path
    assert torch.autograd.gradcheck(lambda x: int4_linear(x, w, None), (x1,), eps=1e-2, atol=1e-2, rtol=1e-2)
    x3 = torch.randn(2, 3, 40, requires_grad=True)  # leading dims, GEMM path
    assert torch.autograd.gradcheck(lambda x: int4_linear(x, w, None), (x3,), eps=1e-2, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------- swap_linears
class Block(nn.Module):
    def __init__(self, d: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm(x)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ToyLM(nn.Module):
    def __init__(self, d: int = 64, vocab: int = 50, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(x)


LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "up", "down")]


def _toy():
    torch.manual_seed(0)
    return ToyLM().eval()


def test_swap_linears_default_replaces_all_but_lm_head():
    dense = _toy()
    model = copy.deepcopy(dense)
    report = swap_linears(model, group_size=32)
    assert sorted(report.replaced) == sorted(LINEARS)
    for name, mod in model.named_modules():
        if name in LINEARS:
            assert isinstance(mod, CompressedLinear) and mod.group_size == 32, name
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    # bytes: fp32 dense weights before, packed int4 after
    before = sum(dense.get_submodule(n).weight.numel() * 4 for n in LINEARS)
    after = sum(model.get_submodule(n).nbytes for n in LINEARS)
    assert report.bytes_before == before and report.bytes_after == after
    assert report.bytes_saved == before - after > 0
    d = 64
    n_weights = 4 * d * d * 2 + 2 * (d * 4 * d * 2)
    assert after == n_weights // 2 + (n_weights // 32) * 2  # 4 bits + one fp16 scale per 32 weights
    assert f"replaced {len(LINEARS)} linear layers" in str(report) and "saved" in str(report)
    # output close to the dense model; identical to the dequantized dense model
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        y_dense, y_q = dense(ids), model(ids)
        y_deq = dequantized_copy(model)(ids)
    rel = (y_q - y_dense).norm() / y_dense.norm()
    assert 0 < rel < 0.2, rel
    torch.testing.assert_close(y_q, y_deq, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where,expect", [
    ("*.q", ["blocks.0.q", "blocks.1.q"]),
    (["blocks.0.*", "*.down"], [f"blocks.0.{n}" for n in ("q", "k", "v", "o", "up", "down")] + ["blocks.1.down"]),
    (lambda name, mod: mod.out_features == 256, ["blocks.0.up", "blocks.1.up"]),
    ("lm_head", []),  # skipped by default even when asked for
    ("nothing*", []),
])
def test_swap_linears_where(where, expect):
    model = _toy()
    report = swap_linears(model, where=where, group_size=64, symmetric=False)
    assert sorted(report.replaced) == sorted(expect)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, CompressedLinear)) and name:
            assert isinstance(mod, CompressedLinear) == (name in expect), name
            if name in expect:
                assert mod.zeros is not None and mod.group_size == 64
    if not expect:
        assert report.bytes_before == report.bytes_after == report.bytes_saved == 0


def test_swap_linears_skip_override_includes_lm_head():
    model = _toy()
    report = swap_linears(model, skip=(), group_size=32)
    assert "lm_head" in report.replaced and isinstance(model.lm_head, CompressedLinear)
    model2 = _toy()
    report2 = swap_linears(model2, skip=("*.up", "*.down", "lm_head"), group_size=32)
    assert sorted(report2.replaced) == sorted(n for n in LINEARS if not n.endswith(("up", "down")))


def test_swapped_model_trains_upstream():
    """Gradients flow through the swapped layers to an upstream parameter (e.g. a soft prompt)."""
    dense = _toy()
    model = copy.deepcopy(dense)
    swap_linears(model, group_size=32)
    deq = dequantized_copy(model)
    ids = torch.randint(0, 50, (2, 6))
    model(ids).square().mean().backward()
    deq(ids).square().mean().backward()
    torch.testing.assert_close(model.embed.weight.grad, deq.embed.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.blocks[0].q.bias.grad, deq.blocks[0].q.bias.grad, rtol=1e-4, atol=1e-6)
