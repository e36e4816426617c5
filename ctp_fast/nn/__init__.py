"""Drop-in modules that run on the packed kernels."""
from .compressed_linear import CompressedLinear, SwapReport, dequantized_copy, linear_bytes, swap_linears

__all__ = ["CompressedLinear", "SwapReport", "dequantized_copy", "linear_bytes", "swap_linears"]
