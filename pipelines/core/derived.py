"""Which files an output was made from: a layer's top-k from its shards' candidates, a mosaic
from its layer's map, a neighbour sheet from its indexes, the precision@k evaluation from the
indexes it measured. An output made from an
earlier map or index shows images retired since, places that moved, neighbours and figures
that changed; status and the report must not pass it off as current.

A job `forget`s the record and `stamp`s its sources before it reads them, and `remember`s
that stamp once its output is in place (a source rewritten meanwhile then makes the output
stale, never current). An output without a record (a job killed between the two, or an
output made before records were kept) counts as current only if it is newer than each of
its sources. Reads without torch: status and the report use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core.atomic import withdraw, write_json_atomic
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.trust import files_stamp


def record(output: Path) -> Path:
    """The hidden record beside an output: `.<name>.from.json`."""
    return output.with_name(f".{output.name}.from.json")


def stamp(sources: Sequence[Path]) -> list[str]:
    """The sources as they are now (name, size and modification time of each; "-" if absent)."""
    return files_stamp(list(sources))


def forget(output: Path) -> None:
    """Before an output is made again: until it is, it vouches for no sources."""
    withdraw(record(output))


def remember(output: Path, stamped: list[str]) -> None:
    """After an output is in place: the `stamp` of its sources taken before they were read."""
    write_json_atomic(record(output), {"from": stamped})


def current(output: Path, sources: Sequence[Path]) -> bool:
    """Whether `output` was made from `sources` as they are now."""
    if not output.exists():
        return False
    try:
        return json.loads(record(output).read_text())["from"] == stamp(sources)
    except FileNotFoundError:
        return all(output.stat().st_mtime_ns >= source.stat().st_mtime_ns for source in sources if source.exists())
    except (ValueError, KeyError, TypeError):  # a damaged record vouches for nothing
        return False


def mosaic_sources(rd: RunDir, layer: str, kind: str) -> list[Path]:
    """A mosaic (`grid`, `scatter`) is drawn from its layer's map; the `plot` is coloured by
    label too."""
    return [rd.embedding(layer)] + ([rd.live_labels] if kind == "plot" else [])


def sheet_sources(rd: RunDir, layer: str) -> list[Path]:
    """A neighbour sheet: the layer's index, the pixel index where there is one (its second
    row), and the labels of its captions."""
    indexes = [rd.index_meta(layer)] + ([rd.index_meta(PIXELS)] if layer != PIXELS and
                                        rd.index_meta(PIXELS).exists() else [])
    return indexes + [rd.live_labels]


def evaluation_sources(rd: RunDir, layers: Sequence[str]) -> list[Path]:
    """The precision@k evaluation: the indexes of the layers it measured, and the labels it
    counts by."""
    return [rd.index_meta(layer) for layer in layers] + [rd.live_labels]


def topk_sources(rd: RunDir, layer: str) -> list[Path]:
    """A layer's merged top-k (and mask thresholds): the live images and every shard's
    candidates and sketch (a shard extracted again, same ids or not, rewrites them)."""
    return [rd.live_ids, *rd.topk_candidate_parts(layer), *rd.topk_sketch_parts(layer)]
