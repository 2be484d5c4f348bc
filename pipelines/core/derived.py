"""Which files an output was made from: a layer's top-k from its shards' candidates, a mosaic
from its layer's map, a neighbour sheet from its indexes, the precision@k evaluation from the
indexes it measured, the explained queries from their layer's index, the report from all of
those and more. An output made from an earlier map or index shows images retired since,
places that moved, neighbours and figures that changed; status and the report must not pass
it off as current.

A job `stamp`s its sources before it reads them. When it writes, it `forget`s the record,
puts its output in place and `remember`s that stamp, all under the folder's writer lock
(`atomic.one_writer`): a source rewritten meanwhile then makes the output stale, never
current, and two jobs at once leave one job's output beside its own record. An output
without a record (a job killed between the two, or an output made before records were kept)
counts as current only if it is newer than each of its sources. Reads without torch: status
and the report use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core.atomic import holding, rewrite_if_changed, withdraw, write_json_atomic
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.text import listed
from featscope.pipelines.core.trust import map_stamp


def record(output: Path) -> Path:
    """The hidden record beside an output: `.<name>.from.json`."""
    return output.with_name(f".{output.name}.from.json")


def stamp(rd: RunDir, sources: Sequence[Path]) -> list[str]:
    """The sources as they are now: each one's path in the run, size and modification time
    ("-" if absent)."""
    return [f"{_in_run(rd, source)} {map_stamp(source) if source.exists() else '-'}" for source in sources]


def _in_run(rd: RunDir, path: Path) -> str:
    try:
        return path.relative_to(rd.root).as_posix()
    except ValueError:
        return str(path)


def forget(output: Path) -> None:
    """Before an output is made again: until it is, it vouches for no sources."""
    withdraw(record(output))


def remember(output: Path, stamped: list[str]) -> None:
    """After an output is in place: the `stamp` of its sources taken before they were read."""
    write_json_atomic(record(output), {"from": stamped})


def current(rd: RunDir, output: Path, sources: Sequence[Path]) -> bool:
    """Whether `output` was made from `sources` as they are now."""
    return output.exists() and not changed(rd, output, sources)


def changed(rd: RunDir, output: Path, sources: Sequence[Path]) -> list[str]:
    """The sources (paths in the run) that changed, appeared or went since `output` was made
    from them; [] if none did."""
    try:
        return since(rd, json.loads(record(output).read_text())["from"], sources)
    except FileNotFoundError:  # made before records were kept, or stopped before its record
        made = output.stat().st_mtime_ns if output.exists() else -1
        return [_in_run(rd, s) for s in sources if s.exists() and s.stat().st_mtime_ns > made]
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged record vouches for nothing
        return [_in_run(rd, s) for s in sources]


def since(rd: RunDir, stamped: list[str], sources: Sequence[Path]) -> list[str]:
    """The sources (paths in the run) that changed, appeared or went since they were `stamped`."""
    return sorted({entry.rsplit(" ", 1)[0] for entry in set(stamp(rd, sources)) ^ set(stamped)})


def mosaic_sources(rd: RunDir, layer: str, kind: str) -> list[Path]:
    """A mosaic (`grid`, `scatter`) is drawn from its layer's map; the `plot` is coloured by
    label too."""
    return [rd.embedding(layer)] + ([rd.live_labels] if kind == "plot" else [])


def map_behind(rd: RunDir, layer: str, live: np.ndarray, featured: np.ndarray) -> tuple[int, int]:
    """(images of the layer's 2-D map retired since, live images with features that it lacks).
    A map made before the dataset last changed is still the file its mosaics recorded, so
    their records call them current: they are not while it is behind."""
    ids = pq.read_table(rd.embedding(layer), columns=["image_id"])["image_id"].to_numpy()
    return int(np.isin(ids, live, invert=True).sum()), int(np.isin(featured, ids, invert=True).sum())


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


def evaluation_current(rd: RunDir, measured: dict) -> bool:
    """Whether `measured` (index/evaluation.json) was measured on the indexes and labels of now."""
    return current(rd, rd.index_evaluation, evaluation_sources(rd, list(measured.get("layers", {}))))


def sanity_sources(rd: RunDir, methods: Sequence[str]) -> list[Path]:
    """The model-randomisation verdicts: each checked method's maps as their summary lists them
    (rewritten whenever maps are made, with other options or for other images)."""
    return [rd.saliency_summary(method) for method in sorted(methods)]


def sanity_current(rd: RunDir, verdicts: dict) -> bool:
    """Whether the verdicts (saliency/sanity.json) were reached on the maps there are now (so
    where there are none)."""
    return not rd.sanity_verdicts.exists() or current(rd, rd.sanity_verdicts, sanity_sources(rd, list(verdicts)))


def explain_sources(rd: RunDir, layer: str) -> list[Path]:
    """The explained queries of a layer: its index, which chose each query's neighbours (an
    update rewrites it, with the images it added, took out or took back with new vectors)."""
    return [rd.index_meta(layer)]


def topk_sources(rd: RunDir, layer: str) -> list[Path]:
    """A layer's merged top-k (and mask thresholds): the live images and every shard's
    candidates and sketch (a shard extracted again, same ids or not, rewrites them)."""
    return [rd.live_ids, *rd.topk_candidate_parts(layer), *rd.topk_sketch_parts(layer)]


def report_sources(rd: RunDir) -> list[Path]:
    """What the report shows that other stages make: the live images, their labels and
    predictions, each index and the evaluation, top-k tables, sketches and patch strips,
    mosaics, saliency maps' summaries, AUCs and verdicts, explained pairs and unit tables. One
    that appears, changes or goes after the report was built makes the report stale (each is
    an input of the workflow's report rule, or made by a stage run by hand)."""
    # the folder of the images' predictions, which only extract writes: a shard extracted
    # again renames its part into it (a folder's modification time changes with its entries)
    files = [rd.live_ids, rd.live_labels, rd.predictions_dir, rd.index_evaluation, rd.sanity_verdicts]
    files += [rd.index_meta(layer) for layer in rd.index_layers()]
    for layer in rd.topk_layers():
        files += [rd.topk(layer), rd.topk_sketch(layer), rd.patches_record(layer)]
    for layer in rd.mosaic_layers():
        files += [rd.mosaic(layer, "grid"), rd.mosaic(layer, "grid", "parquet"), rd.mosaic(layer, "scatter"),
                  rd.mosaic(layer, "plot", "png")]
    for method in rd.saliency_methods():
        files += [rd.saliency_summary(method), rd.faithfulness(method)]
    files += [rd.explained_queries(layer) for layer in rd.explain_layers()]
    for folder in sorted(p for p in (rd.root / "units").glob("*") if p.is_dir()):
        files += [rd.units_table(folder.name), rd.units_labels(folder.name), rd.atlas_table(folder.name)]
    return files


def report_behind(rd: RunDir) -> list[str]:
    """What the report shows that changed since it was built (paths in the run); [] where it
    is current or there is no report."""
    run_js = rd.report_dir / "data" / "run.js"
    return changed(rd, run_js, report_sources(rd)) if run_js.exists() else []


def write_outputs_script(rd: RunDir) -> bool:
    """Rewrite outputs-live.js (`RunDir.outputs_script`) with the `stamp` of the report's
    sources as they are now, where the run has a report; True if it changed. Every writing
    `featscope` command calls it as it ends, and the report as it is built. One job at a
    time: a job's stamp, taken after its own outputs were in place, is never written over
    by an older one's."""
    if not (rd.report_dir / "data" / "run.js").exists():
        return False
    with holding(rd.root / ".outputs-live.lock"):
        body = json.dumps({"sources": stamp(rd, report_sources(rd))})
        return rewrite_if_changed(rd.outputs_script, f"window.FS_OUTPUTS = {body};\n".encode())


def dataset_changed(rd: RunDir, behind: list[str]) -> bool:
    """Whether the live images or their labels are among `report_behind`'s paths."""
    return bool({_in_run(rd, rd.live_ids), _in_run(rd, rd.live_labels)} & set(behind))


def report_staleness(rd: RunDir, behind: list[str]) -> str:
    """`report_behind`'s paths in words: what the report was built before."""
    if dataset_changed(rd, behind):
        return "built before the dataset last changed: its lists and pictures show the images as they were then"
    return f"built before {listed(behind)} changed: it shows them as they were then"
