"""What `saliency evaluate`, `saliency sanity` and the unit tables store, read without torch
(the report and status read it too): the evaluation's schema and rows, which rows still
describe the map that is there now, the sanity verdicts, and whether a unit table or a
patch strip still describes the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featscope.pipelines.core.rundir import RunDir

BASELINES = ("random", "centre")
CURVES = ("deletion", "insertion")


def map_stamp(path: Path) -> str:
    """The map file as its evaluation saw it: a recomputed map (new size or time) is another."""
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


EVALUATION_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()),
    pa.field("method", pa.string()),
    pa.field("target", pa.int32()),
    pa.field("deletion_auc", pa.float32()),
    pa.field("insertion_auc", pa.float32()),
    *[pa.field(f"{b}_{c}_auc", pa.float32()) for b in BASELINES for c in CURVES],
    pa.field("map_stamp", pa.string()),
    pa.field("options", pa.string()),
])


def read_evaluation(rd: RunDir, method: str) -> dict[int, dict]:
    """image_id -> the stored evaluation row of a method (current or not)."""
    path = rd.faithfulness(method)
    return {r["image_id"]: r for r in pq.read_table(path, schema=EVALUATION_SCHEMA).to_pylist()} \
        if path.exists() else {}


def current_evaluation(rd: RunDir, method: str) -> dict[int, dict]:
    """image_id -> evaluation row, only where the row measured the map that is there now."""
    maps = rd.saliency_maps(method)
    return {i: r for i, r in read_evaluation(rd, method).items() if i in maps and map_stamp(maps[i]) == r["map_stamp"]}


def read_sanity(rd: RunDir) -> dict[str, dict]:
    """method -> verdict facts of the last sanity run, or {}."""
    return json.loads(rd.sanity_verdicts.read_text()) if rd.sanity_verdicts.exists() else {}


def features_stamp(rd: RunDir, layer: str) -> str:
    """The layer's feature parts as a table computed from them saw them (`units label`): a
    shard extracted again, for the same images or not, makes the table stale."""
    from featscope.pipelines.core import derived  # here: derived stamps with this module's map_stamp

    return json.dumps(derived.stamp(rd, rd.feature_parts(layer)))


def dataset_stamp(rd: RunDir, layer: str, labels: bool = False) -> str:
    """The live images and the layer's top-k (and with `labels`, the live images' labels) as a
    unit table saw them: after the dataset changes, a table with another stamp is stale and
    its figures are not shown."""
    files = (rd.live_ids, rd.topk(layer)) + ((rd.live_labels,) if labels else ())
    return " ".join(map_stamp(f) if f.exists() else "-" for f in files)


def uses_labels(rd: RunDir, path: Path, layer: str) -> bool:
    """Whether a unit table names labels (units label's, the atlas's most common label per cell)."""
    return path in (rd.units_labels(layer), rd.atlas_table(layer))


def current_unit_table(rd: RunDir, path: Path, layer: str) -> list[dict] | None:
    """A unit table's rows if it was made from the dataset as it is now, else None."""
    if not path.exists():
        return None
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    then = meta.get("dataset", "").split(" ")
    now = dataset_stamp(rd, layer, labels=uses_labels(rd, path, layer)).split(" ")
    if path == rd.atlas_table(layer) and len(then) == len(now):  # the atlas reads no top-k: a new merge
        then[1] = now[1]  # (another k, say) leaves it current, and the workflow would not make it again
    current = then == now
    if current and "features" in meta:  # a table read from the features (tables from before: not recorded)
        current = meta["features"] == features_stamp(rd, layer)
    return table.to_pylist() if current else None


def current_strips(rd: RunDir, layer: str) -> tuple[list[int], list[int]]:
    """(units whose patch strip shows the layer's current top-k, units whose strip was drawn
    from another top-k): after the dataset changes and the top-k is merged again, a strip
    not yet drawn again shows images its unit's top-k no longer holds."""
    drawn = rd.drawn_strips(layer)
    if not drawn or not rd.topk(layer).exists():
        return [], sorted(drawn)
    table = pq.read_table(rd.topk(layer), columns=["channel", "rank", "image_id"]).to_pydict()
    by_rank: dict[int, dict[int, int]] = {}
    for c, r, i in zip(table["channel"], table["rank"], table["image_id"]):
        by_rank.setdefault(c, {})[r] = i
    current = [u for u, ids in drawn.items() if ids == [by_rank.get(u, {}).get(r) for r in range(len(ids))]]
    return current, sorted(set(drawn) - set(current))
