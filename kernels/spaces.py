"""Names of feature spaces that are not a layer of the model (torch-free, so that stages
without a model can name them)."""

PIXELS = "pixels"  # pseudo-layer: the model input itself, downsampled (pixel-space neighbours)
