"""Drop-in modules that run on the packed kernels."""
from .compressed_linear import CompressedLinear, SwapReport, swap_linears

__all__ = ["CompressedLinear", "SwapReport", "swap_linears"]
