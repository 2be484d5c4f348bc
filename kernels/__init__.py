"""Pure tensor compute: tensors in, tensors out. No files, no Parquet, no Dask.

Import the modules themselves (`featscope.kernels.layers`, ...): this package imports
nothing, so a command that needs no model never pays for torch.
"""
