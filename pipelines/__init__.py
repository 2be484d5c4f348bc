"""Stages, CLI, data loading, the Parquet store and the run directory."""

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.rundir import RunDir

__all__ = ["FeatscopeError", "RunDir"]
