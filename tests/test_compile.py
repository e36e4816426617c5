"""torch.compile of a model with CompressedLinear (forward and input gradient), and opcheck of the ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ctp_fast
from ctp_fast import CompressedLinear, Int4Weight

from conftest import random_int4

pytestmark = pytest.mark.usefixtures("fixed_seed", "one_thread")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = CompressedLinear.from_linear(nn.Linear(64, 96), group_size=32, symmetric=False,
                                              perm=torch.randperm(64))
        self.b = CompressedLinear.from_linear(nn.Linear(96, 40, bias=False), group_size=-1)

    def forward(self, x):
        return self.b(F.gelu(self.a(x))) * 2 + 1


def _run(model, x):
    x = x.detach().clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return y.detach(), x.grad, model.a.bias.grad.clone()


def _check_matches_eager(compiled, model, shapes, rtol=1e-6, atol=1e-6):
    for shape in shapes:
        x = torch.randn(shape)
        ye, gxe, gbe = _run(model, x)
        yc, gxc, gbc = _run(compiled, x)
        torch.testing.assert_close(yc, ye, rtol=rtol, atol=atol)
        torch.testing.assert_close(gxc, gxe, rtol=rtol, atol=atol)
        torch.testing.assert_close(gbc, gbe, rtol=rtol, atol=atol)


def test_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    model = Small()
    compiled = torch.compile(model, backend="aot_eager")
    _check_matches_eager(compiled, model, [(3, 64), (2, 5, 64)])


def test_compile_fullgraph_dynamic():
    """fullgraph=True: the op is traced (fake impl + autograd registration), no graph break; the
    batch size is dynamic, so the fake impl must compute the output shape symbolically."""
    torch._dynamo.reset()
    model = Small()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    _check_matches_eager(compiled, model, [(3, 64), (7, 64), (2, 9, 64)])


def test_compile_inductor_matches_eager():
    """Inductor (compiles C++ for the surrounding ops; ~25 s cold on 2 cores)."""
    torch._dynamo.reset()
    model = Small()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    _check_matches_eager(compiled, model, [(5, 64)], rtol=1e-5, atol=1e-5)


def _linear_samples():
    w1 = random_int4(40, 70, 32, symmetric=False, scale_dtype=torch.float16, act_order=True, seed=1)
    w2 = random_int4(33, 129, 64, symmetric=True, scale_dtype=torch.bfloat16, seed=2)
    w3 = random_int4(64, 40, -1, symmetric=False, scale_dtype=torch.float32, seed=3)
    # (x, *w.kernel_args() [codes, scales, zeros, perm, masks, offsets], bias, *w.kernel_ints()
    #  [layout, bits, out_features, in_features, group_size])
    return [
        (torch.randn(3, 70, requires_grad=True), *w1.kernel_args(), torch.randn(40, requires_grad=True),
         *w1.kernel_ints()),
        (torch.randn(2, 6, 129, dtype=torch.bfloat16), *w2.kernel_args(), None, *w2.kernel_ints()),
        (torch.randn(40, requires_grad=True), *w3.kernel_args(), None, *w3.kernel_ints()),
        (torch.randn(20, 40, requires_grad=True), *w3.kernel_args(), torch.randn(64, requires_grad=True),
         *w3.kernel_ints()),
    ]


@pytest.mark.parametrize("i", range(4))
def test_opcheck_packed_linear(i):
    sample = _linear_samples()[i]
    torch.library.opcheck(torch.ops.ctp_fast.packed_linear.default, sample)


@pytest.mark.parametrize("i", range(2))
def test_opcheck_packed_linear_grad_input(i):
    w = [random_int4(40, 70, 32, False, act_order=True, seed=1), random_int4(33, 129, 128, True, seed=2)][i]
    gy = torch.randn(5, w.out_features) if i == 0 else torch.randn(2, 3, w.out_features, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.ctp_fast.packed_linear_grad_input.default,
                          (gy, *w.kernel_args(), *w.kernel_ints()))


def test_fake_tensor_shapes():
    """Under FakeTensorMode the op only computes shapes and dtypes, matching the real op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = random_int4(40, 70, 32, False, act_order=True)
    real = ctp_fast.int4_linear(torch.randn(2, 3, 70, dtype=torch.bfloat16), w)
    with FakeTensorMode() as mode:
        fw = w.map(mode.from_tensor)
        assert isinstance(fw, Int4Weight)
        y = ctp_fast.int4_linear(torch.empty(2, 3, 70, dtype=torch.bfloat16), fw)
        gx = ctp_fast.int4_linear_grad_input(torch.empty(5, 40), fw)
    assert y.shape == real.shape and y.dtype == real.dtype
    assert gx.shape == (5, 70) and gx.dtype == torch.float32
