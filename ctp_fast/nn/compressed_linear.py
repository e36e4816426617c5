"""CompressedLinear: a drop-in nn.Linear whose weight stays packed, and swap_linears to install it."""
from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..formats import DenseWeight, PackedWeight, Sparse24Weight, UnstructuredWeight
from ..formats.cuda_layout import CudaPackedWeight, move_weight, to_cuda_layout
from ..ops import packed_linear

log = logging.getLogger(__name__)
_WEIGHT_KEYS = ("qweight", "scales", "zeros", "perm", "masks", "offsets")


def format_for(sparsity, mask: torch.Tensor | None) -> type[PackedWeight]:
    """The packed format that stores a given sparsity: dense, 2:4, or unstructured (also for 4:8)."""
    from ..compress.magnitude import parse_sparsity  # lazy: ctp_fast.compress imports this module

    kind, arg = parse_sparsity(sparsity)
    if kind == "nm":
        return Sparse24Weight if arg == (2, 4) else UnstructuredWeight
    if kind == "unstructured" or mask is not None:
        return UnstructuredWeight
    return DenseWeight


class CompressedLinear(nn.Module):
    """y = x W^T + b with W kept in a packed low-bit format (frozen buffers).

    The forward runs the packed kernel; the input gradient runs the packed grad_input kernel, so a
    model made of these can be trained upstream of them (e.g. a soft prompt) with no dense weight.
    On a GPU the buffers hold the CUDA layout of the format (see formats/cuda_layout.py): `.to("cuda")`
    and `.cpu()` repack, and state dicts always hold the CPU layout.
    """

    _cuda_layout = False  # buffers in the CUDA layout (set by _set_weight)

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        weight.validate()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, w: PackedWeight | CudaPackedWeight) -> None:
        for key in _WEIGHT_KEYS:
            self.register_buffer(key, getattr(w, key, None))
        self._format_cls, self.group_size, self.bits = getattr(w, "source_cls", type(w)), w.group_size, w.bits
        self._cuda_layout = isinstance(w, CudaPackedWeight)

    @property
    def weight_format(self) -> PackedWeight | CudaPackedWeight:
        """The packed weight (a view of this module's buffers; the CUDA layout while on a GPU)."""
        if self._cuda_layout:
            return CudaPackedWeight(self.qweight, self.scales, self.zeros, self.perm, self.out_features,
                                    self.in_features, self.group_size, self.bits, source_cls=self._format_cls,
                                    masks=self.masks, offsets=self.offsets)
        extra = {k: getattr(self, k) for k in self._format_cls.EXTRA_TENSORS}
        return self._format_cls(self.qweight, self.scales, self.zeros, self.perm, self.out_features,
                                self.in_features, self.group_size, self.bits, **extra)

    @property
    def cpu_weight_format(self) -> PackedWeight:
        """The packed weight in its device-neutral (CPU) format, as checkpoints store it."""
        w = self.weight_format
        return w.cpu_weight() if self._cuda_layout else w

    def _apply(self, fn, recurse=True):
        # Moving between the CPU and a GPU repacks the weight into that device's layout; while in the
        # CUDA layout the packed buffers follow device moves only (their dtypes are the layout's).
        probe = fn(torch.zeros(1, device=self.qweight.device))
        if (probe.device.type == "cuda") != self._cuda_layout:
            self._set_weight(move_weight(self.weight_format, probe.device))
        if not self._cuda_layout:
            return super()._apply(fn, recurse)
        packed = {k: self._buffers.pop(k) for k in _WEIGHT_KEYS}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in packed.items():
                self._buffers[k] = None if t is None else t.to(probe.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    scale_dtype: torch.dtype = torch.float16, perm: torch.Tensor | None = None,
                    sparsity=None, mask: torch.Tensor | None = None) -> "CompressedLinear":
        """Quantize (round to nearest) and optionally prune an nn.Linear.

        sparsity: None (dense), "2:4", "4:8" or a fraction such as 0.5; pruning is by magnitude unless a
        mask of kept weights is given (calibrated algorithms live in ctp_fast.compress).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        from ..compress.magnitude import magnitude_mask  # lazy: ctp_fast.compress imports this module

        weight = linear.weight.detach()
        if mask is None:
            mask = magnitude_mask(weight, sparsity)
        fmt = format_for(sparsity, mask)
        # packing runs on the CPU; a GPU linear gets its module moved (repacked) to the GPU after
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        w = fmt.pack(weight.cpu(), group_size=group_size, symmetric=symmetric, bits=bits, scale_dtype=scale_dtype,
                     perm=cpu(perm), mask=cpu(mask))
        mod = cls(w, linear.bias)
        return mod.to(weight.device) if weight.device.type != "cpu" else mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, as nn.Linear: the activations in the autocast dtype (on the CPU, bf16 runs the
        # kernels' bf16 dot products at larger M); the packed weight and its scales stay as stored.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return packed_linear(x, self.weight_format, self.bias)

    def dequantize(self) -> nn.Linear:
        """An nn.Linear holding the dense weight this module computes with."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight_format.unpack())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias not included)."""
        return self.weight_format.nbytes

    def extra_repr(self) -> str:
        w = self.weight_format
        g = "per-channel" if w.group_size == -1 else f"g{w.group_size}"
        kind = "sym" if w.symmetric else "asym"
        act = ", act-order" if w.perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={w.FORMAT} int{w.bits} {g} {kind}{act} scales={str(w.scales.dtype).replace('torch.', '')}, "
                f"bytes={self.nbytes} ({self.nbytes / (self.in_features * self.out_features):.3f}/weight)")

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._cuda_layout:  # checkpoints stay device-neutral: always the CPU layout
            for key in _WEIGHT_KEYS:
                destination.pop(prefix + key, None)
            for key, t in self.cpu_weight_format.tensors().items():
                destination[prefix + key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Check the incoming packed tensors against this module's format before anything is copied,
        # so a truncated or foreign state dict fails with a message naming the tensor.
        cfg = self.cpu_weight_format.config()
        tensors = {k: state_dict[prefix + k] for k in _WEIGHT_KEYS if prefix + k in state_dict}
        try:
            w = PackedWeight.from_state_dict({**tensors, "config": cfg})
        except ValueError as e:
            raise ValueError(f"{prefix or 'CompressedLinear.'}{e}") from None
        if self._cuda_layout:  # checkpoints hold the CPU layout: repack, and let the copy below be a no-op
            self._set_weight(to_cuda_layout(w, self.qweight.device))
            state_dict = {**state_dict, **{prefix + k: getattr(self, k) for k in _WEIGHT_KEYS
                                           if getattr(self, k) is not None}}
        else:
            self._set_weight(w.map(torch.clone))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@dataclass
class SwapReport:
    replaced: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} linear layers: {self.bytes_before / 2**20:.2f} MiB -> "
                f"{self.bytes_after / 2**20:.2f} MiB (saved {self.bytes_saved / 2**20:.2f} MiB)")


def _matcher(where) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, mod: True
    if callable(where):
        return where
    patterns = [where] if isinstance(where, str) else list(where)
    return lambda name, mod: any(fnmatch.fnmatch(name, p) for p in patterns)


def swap_linears(model: nn.Module, where: str | Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                 skip: Iterable[str] = ("lm_head", "*.lm_head"), **quant_kwargs) -> SwapReport:
    """Replace the chosen nn.Linear modules of `model` in place by CompressedLinear.

    where: None (every nn.Linear), fnmatch pattern(s) over module names, or a callable(name, module).
    skip:  fnmatch patterns never replaced (the output head by default).
    quant_kwargs go to CompressedLinear.from_linear (bits, group_size, symmetric, scale_dtype).
    """
    match, skip = _matcher(where), list(skip)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and match(name, mod)
               and not any(fnmatch.fnmatch(name, p) for p in skip)]
    before = after = 0
    for name, lin in targets:
        comp = CompressedLinear.from_linear(lin, **quant_kwargs)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, comp)
        before += lin.weight.numel() * lin.weight.element_size()
        after += comp.nbytes
    report = SwapReport([n for n, _ in targets], before, after)
    log.info("swap_linears: %s", report)
    return report


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every CompressedLinear replaced by the nn.Linear of its dequantized
    weight: the same weights in dense floats (the reference the packed kernels are checked against)."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, CompressedLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, mod.dequantize())
    return dense


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the model's linears take as stored, bytes they would take in fp32), the input embedding
    (or an output head tied to it) not counted."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    stored = fp32 = 0
    for mod in model.modules():
        if isinstance(mod, CompressedLinear):
            stored += mod.nbytes
            fp32 += mod.in_features * mod.out_features * 4
        elif isinstance(mod, nn.Linear) and (emb is None or mod.weight is not emb.weight):
            stored += mod.weight.numel() * mod.weight.element_size()
            fp32 += mod.weight.numel() * 4
    return stored, fp32
