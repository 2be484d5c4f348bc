"""Pure tensor compute: tensors in, tensors out. No files, no Parquet, no Dask."""

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import PIXELS, LayerSpec, LayerTap, layer_aliases, resolve_layer
from featscope.kernels.summary import conv_summary, pixel_thumbnail

__all__ = [
    "FeatscopeError", "LayerSpec", "LayerTap", "PIXELS", "layer_aliases", "resolve_layer", "conv_summary",
    "pixel_thumbnail",
]
