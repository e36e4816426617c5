"""Compression algorithms: calibration-free (magnitude, rtn) and calibrated layer-level ones (gptq,
sparsegpt, wanda) over the statistics of HessianAccumulator; each returns a LayerResult.

The algorithm functions live in their modules under the same names (ctp_fast.compress.gptq.gptq,
.rtn.rtn, .sparsegpt.sparsegpt, .wanda.wanda, .magnitude.magnitude); they are not re-exported here
so that `ctp_fast.compress.gptq` etc. stay the modules.
"""
from .layer import HessianAccumulator, LayerResult
from .magnitude import magnitude_mask, nm_mask, parse_sparsity, unstructured_mask
from .pipeline import CompressionReport, Recipe, compress
from .rtn import prune_then_rtn
from .wanda import wanda_mask

__all__ = ["CompressionReport", "HessianAccumulator", "LayerResult", "Recipe", "compress", "magnitude_mask", "nm_mask", "parse_sparsity", "prune_then_rtn",
           "unstructured_mask", "wanda_mask"]
