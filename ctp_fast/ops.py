"""Op wrappers: the registered ops' fake (meta) impls and autograd, and typed Python entry points.

The ops live in the extension (`torch.ops.ctp_fast.*`, registered by csrc/bindings.cpp); this module
makes them traceable by torch.compile / torch.export and differentiable with respect to the input.
The weight is frozen: no gradient flows to the packed tensors.
"""
from __future__ import annotations

import torch

from . import _C
from .formats.base import PackedWeight

_ops = torch.ops.ctp_fast


def _check_devices(first: str, x, **tensors) -> None:
    # A meta tensor anywhere routes the call here rather than to the CPU kernel (whose checks would
    # fire), so mixed devices must be refused here, or a CPU call would return uninitialised memory.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected a tensor on {x.device} like {first}, got {t.device}")


@torch.library.register_fake("ctp_fast::packed_linear")
def _packed_linear_fake(x, codes, scales, zeros, perm, masks, offsets, bias, layout, bits, out_features,
                        in_features, group_size):
    _check_devices("x", x, codes=codes, scales=scales, zeros=zeros, perm=perm, masks=masks, offsets=offsets,
                   bias=bias)
    torch._check(x.shape[-1] == in_features, lambda: f"x: expected last dimension {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("ctp_fast::packed_linear_grad_input")
def _packed_linear_grad_input_fake(grad_y, codes, scales, zeros, perm, masks, offsets, layout, bits, out_features,
                                   in_features, group_size):
    _check_devices("grad_y", grad_y, codes=codes, scales=scales, zeros=zeros, perm=perm, masks=masks,
                   offsets=offsets)
    torch._check(grad_y.shape[-1] == out_features, lambda: f"grad_y: expected last dimension {out_features}")
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


def _setup(ctx, inputs, output):
    x, codes, scales, zeros, perm, masks, offsets, bias, *ints = inputs
    ctx.save_for_backward(codes, scales, zeros, perm, masks, offsets)
    ctx.ints = ints
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.packed_linear_grad_input(grad_y, *ctx.saved_tensors, *ctx.ints)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return (grad_x, None, None, None, None, None, None, grad_b, None, None, None, None, None)


torch.library.register_autograd("ctp_fast::packed_linear", _backward, setup_context=_setup)


def packed_linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias straight from a packed weight (any format); differentiable in x (and bias)."""
    return _ops.packed_linear(x, *w.kernel_args(), bias, *w.kernel_ints())


def packed_linear_grad_input(grad_y: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """grad_x = grad_y W straight from a packed weight."""
    return _ops.packed_linear_grad_input(grad_y, *w.kernel_args(), *w.kernel_ints())


# ---------------------------------------------------------------------- prompt-prefixed attention
@torch.library.register_fake("ctp_fast::prefix_attention")
def _prefix_attention_fake(q, k, v, k_prefix, v_prefix, kv_start, causal, scale):
    _check_devices("q", q, k=k, v=v, k_prefix=k_prefix, v_prefix=v_prefix, kv_start=kv_start)
    torch._check(q.dim() == 4 and k.dim() == 4 and k_prefix.dim() == 3, lambda: "q, k: expected 4-D, k_prefix 3-D")
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("ctp_fast::prefix_attention_backward")
def _prefix_attention_backward_fake(grad_out, q, k, v, k_prefix, v_prefix, out, lse, kv_start, causal, scale):
    _check_devices("q", q, grad_out=grad_out, k=k, v=v, k_prefix=k_prefix, v_prefix=v_prefix, out=out, lse=lse,
                   kv_start=kv_start)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), k_prefix.new_empty(k_prefix.shape),
            v_prefix.new_empty(v_prefix.shape))


def _attn_setup(ctx, inputs, output):
    q, k, v, kp, vp, start, causal, scale = inputs
    ctx.save_for_backward(q, k, v, kp, vp, start, *output)
    ctx.causal, ctx.scale = causal, scale


def _attn_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output (saved for this backward); gradients through it are not supported.
    q, k, v, kp, vp, start, out, lse = ctx.saved_tensors
    grads = _ops.prefix_attention_backward(grad_out.contiguous(), q, k, v, kp, vp, out, lse, start, ctx.causal,
                                           ctx.scale)
    return (*grads, None, None, None)


torch.library.register_autograd("ctp_fast::prefix_attention", _attn_backward, setup_context=_attn_setup)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
                     v_prefix: torch.Tensor, causal: bool = True, scale: float | None = None,
                     kv_start: torch.Tensor | None = None, return_lse: bool = False):
    """Attention of q [B, H, L, D] over a shared prompt's keys/values [Hkv, P, D] followed by each sequence's
    own k, v [B, Hkv, S, D] (S >= L; query i at own position S - L + i; causal on the own part; own keys
    before kv_start[b] masked: left padding). Grouped-query heads: H a multiple of Hkv. Differentiable in
    q, k, v and the prompt's k/v (their gradients are summed over the batch). See csrc/cpu/attention.h."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _ops.prefix_attention(q, k, v, k_prefix, v_prefix, kv_start, bool(causal), scale)
    return (out, lse) if return_lse else out


# The dense int4 entry points under their own names (they accept any packed format).
int4_linear = packed_linear
int4_linear_grad_input = packed_linear_grad_input


def set_isa(name: str) -> None:
    """Force the CPU instruction-set path ('scalar', 'avx2', 'avx512', 'avx512bf16', 'amx'); CTP_FAST_ISA sets the
    default, else the best this CPU supports."""
    _C.set_isa(name)


def bf16_gemm(m: int) -> bool:
    """Whether bf16 activations of m rows run on bf16 dot products on the current path (avx512bf16 and
    m > 4): W's dequantized values are then rounded to bf16, as in a bf16 matmul; fp32 activations, and
    every other path, use W exactly."""
    return bool(_C.bf16_gemm(int(m)))


def get_isa() -> str:
    return _C.get_isa()


def supported_isas() -> list[str]:
    return list(_C.supported_isas())
