"""Weight formats: packing, the pure-torch reference `unpack`, sizes and state dicts."""
from .base import PackedWeight, quantize
from .dense import DenseWeight, Int4Weight
from .sparse24 import Sparse24Weight
from .unstructured import UnstructuredWeight

__all__ = ["DenseWeight", "Int4Weight", "PackedWeight", "Sparse24Weight", "UnstructuredWeight", "quantize"]
