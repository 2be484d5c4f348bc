"""Stages, CLI, data loading, the Parquet store and the run directory.

For notebooks: `load_features(run, layer)` reads a layer's vectors with the manifest's
columns; `RunDir` knows where every file of a run lives. Loaded on first use, so that
`featscope --help` and the stages without a model stay quick to start.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatscopeError": "featscope.kernels.errors",
    "Features": "featscope.pipelines.core.load",
    "load_features": "featscope.pipelines.core.load",
    "RunDir": "featscope.pipelines.core.rundir",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featscope.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
