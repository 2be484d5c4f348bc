"""Features of a run in one line, for notebooks and scripts.

    from featscope.pipelines import load_features
    f = load_features("runs/demo", "pool")
    f.vectors            # (N, D) float32, row i is image f.image_ids[i]
    f.labels             # the manifest's label of each row (None where unlabelled)
    f.to_pandas()        # image_id, path, label, shard, feature (one array per row)

The parts are read through the store, so a file from another model, weights or
preprocessing than the run records is refused, and images marked removed are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity, iter_features


@dataclass
class Features:
    """One layer's vectors of a run, with the manifest's columns in the same row order."""

    layer: str
    image_ids: np.ndarray  # (N,) int64
    vectors: np.ndarray  # (N, D) float32
    rows: pa.Table  # image_id, path, label, shard; row i describes vectors[i]

    @property
    def labels(self) -> list[str | None]:
        return self.rows["label"].to_pylist()

    @property
    def paths(self) -> list[str]:
        return self.rows["path"].to_pylist()

    def __len__(self) -> int:
        return len(self.image_ids)

    def to_arrow(self) -> pa.Table:
        """The manifest's columns plus `feature` as a fixed-size list of float32."""
        flat = pa.array(self.vectors.reshape(-1), pa.float32())
        feature = pa.FixedSizeListArray.from_arrays(flat, self.vectors.shape[1])
        return self.rows.append_column("feature", feature)

    def to_pandas(self):
        """A pandas DataFrame: image_id, path, label, shard and `feature` (one array per row)."""
        frame = self.rows.to_pandas()
        frame["feature"] = list(self.vectors)
        return frame


def load_features(run: str | Path | RunDir, layer: str, *, include_removed: bool = False) -> Features:
    """Every extracted vector of `layer` in run directory `run`, as float32, in image_id order."""
    rd = run if isinstance(run, RunDir) else RunDir(run)
    parts = manifest.feature_parts(rd, layer)
    identity = RunIdentity.of_run(rd.read_config())
    ids, chunks = [], []
    for batch_ids, values in iter_features(parts, identity):
        ids.append(batch_ids)
        chunks.append(np.asarray(values, dtype=np.float32))
    image_ids, vectors = np.concatenate(ids), np.concatenate(chunks)
    table = manifest.read(rd, include_removed=include_removed).select(["image_id", "path", "label", "shard"])
    known = table["image_id"].to_numpy()
    keep = np.isin(image_ids, known)
    image_ids, vectors = image_ids[keep], vectors[keep]
    order = np.argsort(image_ids, kind="stable")
    image_ids, vectors = image_ids[order], vectors[order]
    position = {int(i): n for n, i in enumerate(known)}
    rows = table.take(pa.array([position[int(i)] for i in image_ids], pa.int64()))
    return Features(layer, image_ids, vectors, rows)
