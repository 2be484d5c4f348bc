"""Pure tensor compute: tensors in, tensors out. No files, no Parquet, no Dask."""

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerSpec, LayerTap, layer_aliases, resolve_layer
from featscope.kernels.summary import conv_summary

__all__ = ["FeatscopeError", "LayerSpec", "LayerTap", "layer_aliases", "resolve_layer", "conv_summary"]
