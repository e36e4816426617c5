"""Op wrappers: the registered ops' fake (meta) impls and autograd, and typed Python entry points.

The ops live in the extension (`torch.ops.ctp_fast.*`, registered by csrc/bindings.cpp); this module
makes them traceable by torch.compile / torch.export and differentiable with respect to the input.
The weight is frozen: no gradient flows to the packed tensors.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the extension, which registers torch.ops.ctp_fast)
from .formats.int4 import Int4Weight

_ops = torch.ops.ctp_fast


@torch.library.register_fake("ctp_fast::int4_linear")
def _int4_linear_fake(x, qweight, scales, zeros, perm, bias, out_features, group_size):
    torch._check(x.shape[-1] == qweight.shape[1], lambda: f"x: expected last dimension {qweight.shape[1]}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("ctp_fast::int4_linear_grad_input")
def _int4_linear_grad_input_fake(grad_y, qweight, scales, zeros, perm, out_features, group_size):
    torch._check(grad_y.shape[-1] == out_features, lambda: f"grad_y: expected last dimension {out_features}")
    return grad_y.new_empty((*grad_y.shape[:-1], qweight.shape[1]))


def _int4_setup(ctx, inputs, output):
    x, qweight, scales, zeros, perm, bias, out_features, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros, perm)
    ctx.out_features, ctx.group_size = out_features, group_size
    ctx.has_bias = bias is not None


def _int4_backward(ctx, grad_y):
    qweight, scales, zeros, perm = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.int4_linear_grad_input(grad_y, qweight, scales, zeros, perm, ctx.out_features,
                                             ctx.group_size)
    grad_b = None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_b, None, None


torch.library.register_autograd("ctp_fast::int4_linear", _int4_backward, setup_context=_int4_setup)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias straight from the packed int4 weight; differentiable in x (and bias)."""
    return _ops.int4_linear(x, w.qweight, w.scales, w.zeros, w.perm, bias, w.out_features, w.kernel_group_size)


def int4_linear_grad_input(grad_y: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """grad_x = grad_y W straight from the packed int4 weight."""
    return _ops.int4_linear_grad_input(grad_y, w.qweight, w.scales, w.zeros, w.perm, w.out_features,
                                       w.kernel_group_size)


def set_isa(name: str) -> None:
    """Force the CPU instruction-set path ('scalar', 'avx2', 'avx512'); CTP_FAST_ISA sets the default."""
    _C.set_isa(name)


def get_isa() -> str:
    return _C.get_isa()


def supported_isas() -> list[str]:
    return list(_C.supported_isas())
