"""ctp_fast: compressed LLMs on real low-bit kernels, and soft prompts that recover their quality."""
from .formats import DenseWeight, Int4Weight, PackedWeight, Sparse24Weight, UnstructuredWeight
from .nn import CompressedLinear, swap_linears
from .checkpoint import load_compressed, save_compressed  # registers the transformers quantizer
from .compress.pipeline import Recipe, compress as compress_model
from .ops import (get_isa, int4_linear, int4_linear_grad_input, packed_linear, packed_linear_grad_input, set_isa,
                  supported_isas)

__version__ = "0.1.0"
__all__ = ["CompressedLinear", "DenseWeight", "Recipe", "compress_model", "Int4Weight", "PackedWeight", "Sparse24Weight", "UnstructuredWeight",
           "get_isa", "load_compressed", "save_compressed", "int4_linear", "int4_linear_grad_input", "packed_linear", "packed_linear_grad_input", "set_isa",
           "supported_isas", "swap_linears"]
