"""Compression algorithms."""
from .magnitude import magnitude_mask, nm_mask, parse_sparsity, unstructured_mask

__all__ = ["magnitude_mask", "nm_mask", "parse_sparsity", "unstructured_mask"]
