"""Stages, CLI, data loading, the Parquet store and the run directory.

For notebooks: `load_features(run, layer)` reads a layer's vectors with the manifest's
columns; `RunDir` knows where every file of a run lives.
"""

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.load import Features, load_features
from featscope.pipelines.core.rundir import RunDir

__all__ = ["FeatscopeError", "Features", "RunDir", "load_features"]
