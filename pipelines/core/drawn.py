"""Which files a picture was drawn from: a mosaic from its layer's map, a neighbour sheet from
its indexes. A picture drawn from an earlier map or index shows images retired since, places
that moved and neighbours that changed; status and the report must not pass it off as current.

A drawing job `forget`s the record and `stamp`s its sources before it reads them, and
`remember`s that stamp once the picture is in place (a source rewritten while it drew then
makes the picture stale, never current). A picture without a record (a job killed between the two, or a picture
drawn before records were kept) counts as drawn from its sources only if it is newer than
each of them. Reads without torch: status and the report use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core.atomic import withdraw, write_json_atomic
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.trust import map_stamp


def record(picture: Path) -> Path:
    """The hidden record beside a picture: `.<name>.from.json`."""
    return picture.with_name(f".{picture.name}.from.json")


def stamp(sources: Sequence[Path]) -> list[str]:
    """The sources as they are now (name, size and modification time of each; "-" if absent)."""
    return [f"{source.name} {map_stamp(source) if source.exists() else '-'}" for source in sources]


def forget(picture: Path) -> None:
    """Before a picture is drawn again: until it is, it vouches for no sources."""
    withdraw(record(picture))


def remember(picture: Path, stamped: list[str]) -> None:
    """After a picture is in place: the `stamp` of its sources taken before they were read."""
    write_json_atomic(record(picture), {"from": stamped})


def drawn_from(picture: Path, sources: Sequence[Path]) -> bool:
    """Whether `picture` was drawn from `sources` as they are now."""
    if not picture.exists():
        return False
    try:
        return json.loads(record(picture).read_text())["from"] == stamp(sources)
    except FileNotFoundError:
        return all(picture.stat().st_mtime_ns >= source.stat().st_mtime_ns for source in sources if source.exists())
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
