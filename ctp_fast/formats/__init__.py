"""Weight formats: packing, the pure-torch reference `unpack`, sizes and state dicts."""
from .int4 import Int4Weight, rtn_quantize

__all__ = ["Int4Weight", "rtn_quantize"]
