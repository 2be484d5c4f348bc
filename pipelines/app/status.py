"""`featscope status`: where a run stands, and what a rerun of the workflow would do.

It compares the image folder with the manifest (new, edited and vanished images, without
writing anything), then each stage's outputs with the live images: a layer's shards
extracted, an index or a map that holds exactly the live images (else "stale"), top-k,
saliency maps and their evaluation, the report; and it ends with the last runs of the history. It imports no
model and reads only small files, so it answers in about a second.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core import derived, leftovers, manifest
from featscope.pipelines.core.atomic import WRITER_LOCK, writer
from featscope.pipelines.core.history import read_history
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.rundir import RunDir, read_record
from featscope.pipelines.core.store import FLOAT16_MAX, NON_FINITE, OUT_OF_RANGE, file_metadata, parts_written_again
from featscope.pipelines.core.text import listed, plural
from featscope.pipelines.core.trust import (
    current_evaluation,
    current_strips,
    current_unit_table,
    read_evaluation,
    read_sanity,
)


@dataclass
class Status:
    """The lines `featscope status` prints, and the facts behind them for tests."""

    lines: list[str] = field(default_factory=list)
    pending: dict[str, int] = field(default_factory=dict)  # new, edited, vanished
    stale: list[str] = field(default_factory=list)  # outputs that do not describe the live images
    written_now: list[Path] = field(default_factory=list)  # folders a job is writing (`atomic.one_writer`)
    left_by_stopped_jobs: dict[str, int] = field(default_factory=lambda: {"count": 0, "bytes": 0})  # core.leftovers
    check: bool = False  # `--check`: a run that is not current fails the command (exit 1)
    as_json: bool = False  # `--json`: the facts as one JSON object instead of the lines

    @property
    def current(self) -> bool:
        """Every output describes the image folder as it is now: no change pending, none stale."""
        return not self.stale and not any(self.pending.values())

    @property
    def failed(self) -> bool:
        return self.check and not self.current

    def line(self) -> str:
        if self.as_json:
            return json.dumps({"current": self.current, "pending": self.pending, "stale": self.stale,
                               "written_now": [str(p) for p in self.written_now],
                               "left_by_stopped_jobs": self.left_by_stopped_jobs, "lines": self.lines}, indent=1)
        return "\n".join(self.lines)


def _ids(path: Path, column: str = "image_id") -> np.ndarray:
    return np.unique(pq.read_table(path, columns=[column])[column].to_numpy())


def _other_precision(rd: RunDir, layer: str, shards: list[int], precision: str | None) -> list[int]:
    """The shards whose part records another precision than the run's (extracted before
    run.json was edited under a lock, when two jobs of a fresh run could each record their
    own, or with run.json edited by hand); parts from before precisions were recorded say nothing."""
    if precision is None or layer == PIXELS:
        return []
    found = {s: file_metadata(rd.feature_part(layer, s)).get("precision") for s in shards}
    return [s for s, p in found.items() if p not in (None, precision)]


def _map_errors(rd: RunDir, method: str) -> dict[int, str]:
    """image_id -> error kind, for the images whose map the last saliency run of `method`
    could not make (the stage records them, and tries them again on its next run)."""
    part = rd.error_part(f"saliency-{method}", 0)
    if not part.exists():
        return {}
    try:
        table = pq.read_table(part, columns=["image_id", "error"])
    except (OSError, pa.ArrowException):
        return {}  # damaged: `featscope verify` names it
    return dict(zip(table["image_id"].to_pylist(), table["error"].to_pylist()))


def _failed_maps(rd: RunDir, method: str, live: set[int], maps: dict) -> dict[str, int]:
    """Error kind -> how many live images without a map it keeps from one (`_map_errors`)."""
    kinds = {i: kind for i, kind in _map_errors(rd, method).items() if i in live and i not in maps}
    return dict(sorted(Counter(kinds.values()).items()))


def _selection(rd: RunDir, method: str) -> str | None:
    """The `--select` the last saliency run of `method` was given (its summary records it)."""
    try:
        selection = (pq.read_schema(rd.saliency_summary(method)).metadata or {}).get(b"select", b"").decode()
    except (OSError, pa.ArrowException):
        return None  # no summary (a stopped run) or a damaged one: `featscope verify` names it
    return selection or None  # none: made before the summary recorded it


def _unmapped(rd: RunDir, method: str, maps: dict, selection: str, rows: list[dict]) -> int:
    """How many live images (`rows`) `selection` chooses now that have no map of `method` and
    no recorded failure: added since its last run."""
    try:
        chosen = manifest.choose(rows, selection)
    except FeatscopeError:
        return 0  # chooses nothing now (a label gone): the stage itself says so
    failed = _map_errors(rd, method)
    return sum(r["image_id"] not in maps and r["image_id"] not in failed for r in chosen)


MAP_FAILURES = {"unreadable": "could not be read", "bad_image": "do not decode",
                "no_target": "have no class of the model to explain", NON_FINITE: "got NaN or inf from the model"}


def status(rd: RunDir, *, history: int = 5) -> Status:
    config = rd.read_config()
    out = Status()
    table = manifest.read(rd, include_removed=True)
    removed = table["removed"].to_numpy()
    live = np.sort(table["image_id"].to_numpy()[~removed])
    shards = manifest.shards(rd)
    out.lines.append(f"run {rd.root}: {config.get('model') or 'no model yet'} ({config.get('weights') or '-'}), "
                     f"{plural(len(live), 'live image')} ({int(removed.sum())} retired) in "
                     f"{plural(len(shards), 'shard')}")

    source = config.get("images")
    if source and Path(source).exists():
        # the run's own check, but never every file read for a look (`content`: its stat)
        found = manifest.compare(rd, source, check="mtime" if config.get("check") == "mtime" else "stat")
        vanished = len(found.retired) - found.edited
        out.pending = {"new": len(found.new) - found.edited, "edited": found.edited, "vanished": vanished,
                       "relabelled": found.relabelled}
        if why := manifest.looks_unmounted(rd, source, found):
            out.lines.append(f"images {source}: {why}; the workflow's manifest update refuses to retire them "
                             "(`featscope manifest --allow-empty` does, if they are gone for good)")
        elif found.changed:
            again = manifest.shards_to_redo(rd, found.retired, found.rows)
            out.lines.append(f"images {source}: {out.pending['new']} new, {found.edited} edited, {vanished} vanished, "
                             f"{found.relabelled} relabelled since the manifest; a rerun updates the manifest, "
                             "extracts the new images"
                             + (f", extracts shards {', '.join(map(str, again))} again" if again else "")
                             + " and redoes every whole-dataset stage")
        else:
            out.lines.append(f"images {source}: as the manifest lists them")
        if found.unavailable:
            first = next(path for path, why in found.skipped if why.startswith(manifest.UNAVAILABLE))
            out.lines[-1] += (f"; {plural(found.unavailable, 'live image')} under a folder, link or file not readable "
                              f"now (first: {first}), kept as they were")
    else:
        out.lines.append(f"images {source or '-'}: not found (moved? give `featscope manifest` the new place)")
    extract_errors = manifest.extraction_error_kinds(rd)  # kind -> ids, read once
    unreadable = np.intersect1d(live, extract_errors.get("unreadable", []))
    if len(unreadable):
        out.lines.append(f"  {plural(len(unreadable), 'live image')} could not be read when extracted (first id "
                         f"{unreadable[0]}; see errors.parquet): a rerun tries them again")
        out.stale.append("features of unreadable images")
    non_finite = np.intersect1d(live, extract_errors.get(NON_FINITE, []))
    undecodable = np.intersect1d(live, extract_errors.get("bad_image", []))
    if len(undecodable):
        out.lines.append(f"  {plural(len(undecodable), 'live image')} left out of every layer: not decodable (first "
                         f"id {undecodable[0]}; see errors.parquet)")
    if len(non_finite):
        precision = config.get("precision", "?")
        out.lines.append(f"  {plural(len(non_finite), 'live image')} left out of every layer: the model computed NaN "
                         f"or inf for them in {precision} (first id {non_finite[0]}; see errors.parquet)"
                         + ("; fp16 overflows past 65,504, a run in bf16 or fp32 does not" if precision == "fp16"
                            else ""))
    out_of_range = np.intersect1d(live, extract_errors.get(OUT_OF_RANGE, []))
    if len(out_of_range):
        out.lines.append(f"  {plural(len(out_of_range), 'live image')} left out of every layer: the model computed "
                         f"values past {FLOAT16_MAX:,.0f} for them, which the store's float16 cannot hold (first id "
                         f"{out_of_range[0]}; see errors.parquet)")

    for layer_dir in sorted(p for p in (rd.root / "features").glob("*") if p.is_dir()):
        layer = layer_dir.name
        done = [s for s in shards if rd.feature_part(layer, s).exists()]
        missing = len(shards) - len(done)
        out.lines.append(f"features {layer}: {len(done)}/{len(shards)} shards" + (f", {missing} to extract" if missing
                                                                                 else ""))
        if missing:
            out.stale.append(f"features {layer}")
        other = _other_precision(rd, layer, done, config.get("precision"))
        if other:
            out.lines.append(f"  shards {', '.join(map(str, other))} hold features of another precision than the "
                             f"run's {config['precision']}: delete those parts and extract them again")
            out.stale.append(f"features {layer} precision")

    # live images that extraction recorded as errors have no features for an index or a map
    # to hold (their own lines above say why); without them, a run with one image that does
    # not decode was called stale for good, and "rerun the workflow" could not change that
    featured = np.setdiff1d(live, manifest.featureless(rd, extract_errors))

    def describe(kind: str, name: str, ids: np.ndarray, extra: str = "", also: str = "") -> None:
        """A line for an output of the live images `ids`; `also`: another reason it is stale."""
        gone = int(np.isin(ids, live, invert=True).sum())
        lacking = int(np.isin(featured, ids, invert=True).sum())
        if gone or lacking or also:
            out.stale.append(f"{kind} {name}")
        why = [f"{plural(gone, 'retired image')} in it, {plural(lacking, 'live image')} missing" if gone or lacking
               else "", also]
        state = f"stale: {'; '.join(w for w in why if w)}" if gone or lacking or also else "current"
        out.lines.append(f"{kind} {name}: {plural(len(ids), 'image')}{extra}, {state}")

    unindexed: dict[str, int] = {}  # layer -> live images its index lacks (the report lists neighbours from it)
    for layer in rd.index_layers():
        from featscope.index import recall_shortfall  # faiss: only for a run with indexes

        meta = json.loads(rd.index_meta(layer).read_text())
        again = [str(shard) for shard in parts_written_again(rd.features_dir(layer), meta.get("feature_parts"))]
        indexed = _ids(rd.index_dir(layer) / "ids.parquet")
        if lacking := int(np.isin(featured, indexed, invert=True).sum()):
            unindexed[layer] = lacking
        describe("index", layer, indexed, f" ({meta.get('factory')})",
                 f"{plural(len(again), 'shard')} extracted again since it was built ({', '.join(again[:5])}): the "
                 "next `featscope index build` takes their vectors" if again else "")
        if shortfall := recall_shortfall(meta):
            out.lines.append(f"  approximate: {shortfall}")
    if rd.index_evaluation.exists():
        measured = json.loads(rd.index_evaluation.read_text())
        if derived.evaluation_current(rd, measured):
            figures = ", ".join(f"{layer} {space['precision_at_k']:.3f}" for layer, space in measured["layers"].items())
            out.lines.append(f"index evaluation: current (precision@{measured.get('k')} {figures})" if figures
                             else f"index evaluation: skipped ({measured.get('skipped')})")
        else:
            out.stale.append("index evaluation")
            out.lines.append("index evaluation: stale: measured on an earlier index or other labels: the next workflow "
                             "run or `featscope index evaluate` measures it again")
    for layer in sorted(p.stem for p in (rd.root / "neighbours").glob("*.jpg")):
        if not derived.current(rd, rd.neighbour_sheet(layer), derived.sheet_sources(rd, layer)):
            out.stale.append(f"neighbours {layer}")
            out.lines.append(f"neighbours {layer}: sheet drawn from an earlier index or labels, which may show other "
                             "neighbours and images retired since: the next workflow run or `featscope neighbours` "
                             "draws it again")
        elif lacking := [f"{space}: {unindexed[space]}" for space in dict.fromkeys((layer, PIXELS))
                         if space in unindexed]:
            out.stale.append(f"neighbours {layer}")
            out.lines.append(f"neighbours {layer}: sheet drawn from an index that lacks live images added since it was "
                             f"built ({', '.join(lacking)}), which may be nearer: the next workflow run, or `featscope "
                             "index build` and then `featscope neighbours`, draws it again")
        elif greys := rd.greyed_neighbours(layer):
            out.stale.append(f"neighbours {layer}")
            out.lines.append(f"neighbours {layer}: sheet with {plural(len(greys), 'grey tile')}, images that could not "
                             f"be read when it was drawn (ids {', '.join(map(str, greys[:5]))}"
                             f"{', ...' if len(greys) > 5 else ''}): the next workflow run or `featscope neighbours` "
                             "draws it again")
        else:
            out.lines.append(f"neighbours {layer}: sheet, current")
    for layer in rd.topk_layers():
        ids = _ids(rd.topk(layer))
        gone = int(np.isin(ids, live, invert=True).sum())
        older = not derived.current(rd, rd.topk(layer), derived.topk_sources(rd, layer))
        state = (f"stale: {gone} retired images in it" if gone else "stale: merged before the dataset or a shard's "
                 "candidates last changed (a shard extracted again): the next `featscope topk merge` merges it again"
                 if older else "current")
        if state != "current":
            out.stale.append(f"top-k {layer}")
        out.lines.append(f"top-k {layer}: {plural(len(ids), 'distinct image')}, {state}")
        if rd.topk_sketch(layer).exists():
            out.lines.append("  activation thresholds: every unit's, for masks")
        current, older = current_strips(rd, layer)
        if current or older:
            greyed = rd.greyed_strips(layer)
            out.lines.append(f"  patch strips: {len(current)} current" + (
                f", {len(older)} drawn from an earlier top-k (units {', '.join(map(str, older[:5]))}"
                f"{', ...' if len(older) > 5 else ''})" if older else "") + (
                f"; {len(greyed)} with a grey patch, an image that could not be read (units "
                f"{', '.join(map(str, greyed[:5]))}{', ...' if len(greyed) > 5 else ''}: the next workflow run or "
                "`featscope topk render` draws them again)" if greyed else ""))
            if older or greyed:
                out.stale.append(f"patches {layer}")
    for layer in sorted(p.name for p in (rd.root / "units").glob("*") if p.is_dir()):
        pictures = {"visualisations": "unit-*.png", "atlas": "atlas/cell-*.png"}  # what each table describes
        for name, path in (("visualisations", rd.units_table(layer)), ("labels", rd.units_labels(layer)),
                           ("atlas", rd.atlas_table(layer))):
            if not path.exists():
                if name in pictures and next(rd.units_dir(layer).glob(pictures[name]), None):
                    _unfinished(out, f"units {layer} {name}", rd.atlas_dir(layer) if name == "atlas"
                                else rd.units_dir(layer))
                continue
            rows = current_unit_table(rd, path, layer)
            what = f"{plural(len(rows), 'cell' if name == 'atlas' else 'unit')}" if rows is not None else \
                "stale: made from the dataset as it was before"
            if name in pictures:  # `auto` is bf16 on some machines and fp32 on others: always said
                what += f", rendered in {file_metadata(path).get('precision', 'fp32')}"
            out.lines.append(f"units {layer} {name}: {what}")
            if rows is None:
                out.stale.append(f"units {layer} {name}")
    for layer in sorted(p.name for p in (rd.root / "patches").glob("*") if p.is_dir()):
        if not rd.patches_record(layer).exists() and next(rd.patches_dir(layer).glob("unit-*.png"), None):
            _unfinished(out, f"patches {layer}", rd.patches_dir(layer))
    for path in sorted((rd.root / "embedding").glob("*.parquet")):
        describe("map", path.stem, _ids(path))
    fine: dict[str, list[str]] = {}  # layer -> its mosaics drawn from its map as it is, every image read
    for layer, kind in _mosaics(rd):
        picture = rd.mosaic(layer, kind, MOSAIC_SUFFIX[kind])
        if not derived.current(rd, picture, derived.mosaic_sources(rd, layer, kind)):
            out.stale.append(f"mosaic {layer} {kind}")
            out.lines.append(f"mosaic {layer} {kind}: stale: drawn from an earlier map of {layer}"
                             + (" or other labels" if kind == "plot" else "")
                             + (f" ({tiles})" if (tiles := _retired_tiles(rd, layer, kind, live)) else "")
                             + f": the next workflow run or `featscope mosaic {kind}` draws it again")
        elif any(behind := derived.map_behind(rd, layer, live, featured)):
            out.stale.append(f"mosaic {layer} {kind}")
            out.lines.append(f"mosaic {layer} {kind}: stale: drawn from a map of {layer} made before the dataset last "
                             f"changed ({plural(behind[0], 'retired image')} in it, {plural(behind[1], 'live image')} "
                             f"missing{'; ' + tiles if (tiles := _retired_tiles(rd, layer, kind, live)) else ''}): the "
                             f"next workflow run, or `featscope embed` and then `featscope mosaic {kind}`, draws it again")
        elif kind != "plot" and (left_out := read_record(rd.mosaic_unreadable(layer, kind)).get("ids")):
            out.stale.append(f"mosaic {layer} {kind}")
            out.lines.append(f"mosaic {layer} {kind}: {plural(len(left_out), 'image')} left out, unreadable when it "
                             f"was drawn (ids {', '.join(map(str, left_out[:5]))}"
                             f"{', ...' if len(left_out) > 5 else ''}): the next workflow run or `featscope mosaic "
                             f"{kind}` draws it again")
        else:
            fine.setdefault(layer, []).append(kind)
    for layer, kinds in sorted(fine.items()):
        out.lines.append(f"mosaic {layer}: {', '.join(kinds)}, current")
    live_set = set(live.tolist())
    for layer in rd.explain_layers():
        if not rd.explained_queries(layer).exists():
            continue
        listed = json.loads(rd.explained_queries(layer).read_text())["pairs"]
        pairs = [(int(q), n[0]) for q, found in listed.items() for n in found]
        gone = sum(q not in live_set or n not in live_set for q, n in pairs)
        earlier = derived.changed(rd, rd.explained_queries(layer), derived.explain_sources(rd, layer))
        again = (f"the next workflow run or `featscope explain --layer {layer} --queries {','.join(listed)}` explains "
                 "them again")
        if earlier:
            said = (f"stale: their neighbours were found in an earlier index of {layer} (the report leaves them out): "
                    + again)
        elif gone:
            said = f"stale: {gone} with an image that left the dataset (the report leaves those out)"
        elif layer in unindexed:
            said = (f"stale: their neighbours were found in an index of {layer} that lacks "
                    f"{plural(unindexed[layer], 'live image')} added since it was built, which may be nearer: the "
                    f"next workflow run, or `featscope index build` and then `featscope explain --layer {layer} "
                    f"--queries {','.join(listed)}`, explains them again")
        else:
            said = "current"
        out.lines.append(f"explain {layer}: {plural(len(pairs), 'pair')}, {said}")
        if earlier or gone or layer in unindexed:
            out.stale.append(f"explain {layer}")
    live_rows: list[dict] = []  # image_id and label of the live images, read once if a selection asks
    for method in rd.saliency_methods():
        maps = rd.saliency_overlays(method)
        gone = sum(i not in live_set for i in maps)
        failed = _failed_maps(rd, method, live_set, maps)
        why = ", ".join(f"{n} {MAP_FAILURES.get(kind, kind)}" for kind, n in failed.items())
        if (selection := _selection(rd, method)) and not live_rows:
            live_rows = table.filter(pa.array(~removed)).select(["image_id", "label"]).to_pylist()
        waiting = _unmapped(rd, method, maps, selection, live_rows) if selection else 0
        out.lines.append(f"saliency {method}: {plural(len(maps), 'map')}" + (f", {gone} of retired images" if gone
                                                                               else "")
                         + (f"; {plural(sum(failed.values()), 'selected image')} without one: {why} (errors.parquet; "
                            "the workflow's next run or `featscope saliency compute` tries again)" if failed else "")
                         + (f"; {plural(waiting, 'image')} that `--select {selection}` chooses now without one yet "
                            f"(added since it ran): the next workflow run or `featscope saliency compute --method "
                            f"{method} --select {selection}` makes them" if waiting else ""))
        if gone or waiting:
            out.stale.append(f"saliency {method}")
        evaluated = read_evaluation(rd, method)
        if evaluated:
            current = current_evaluation(rd, method)
            behind = len(maps) - len(current)
            out.lines.append(f"  faithfulness: {plural(len(current), 'map')} evaluated"
                             + (f", {behind} not (yet, or since their map was recomputed)" if behind else ""))
            if behind:
                out.stale.append(f"saliency evaluate {method}")
    shown = {picture: rd.viz_image(picture) for picture in rd.viz_pictures()}
    if gone := sorted({i for i in shown.values() if i is not None and i not in live_set}):
        out.lines.append(f"viz: {plural(sum(i in gone for i in shown.values()), 'picture')} of "
                         f"{plural(len(gone), 'image')} that left the dataset (ids {', '.join(map(str, gone[:5]))}"
                         f"{', ...' if len(gone) > 5 else ''}), which the report no longer shows: choose other "
                         "images in the config's viz section, and delete those pictures under viz/")
    _style_network(rd, out)
    verdicts = read_sanity(rd)
    checked_now = derived.sanity_current(rd, verdicts)
    for method, verdict in verdicts.items():
        out.lines.append(f"sanity {method}: {verdict['verdict']} (mean rank correlation {verdict['score']:.2f})"
                         + ("" if checked_now else "; stale: its maps were made again since (other images or "
                            "options): the next workflow run or `featscope saliency sanity` checks them again"))
    if verdicts and not checked_now:
        out.stale.append("sanity")
    if not verdicts and next((rd.root / "saliency").glob("sanity-*.png"), None):  # plots without their verdicts
        _unfinished(out, "sanity", rd.sanity_table.parent)
    run_js = rd.report_dir / "data" / "run.js"
    if run_js.exists():
        behind = derived.report_behind(rd)
        greys = read_record(rd.report_unreadable).get("ids", [])
        lacking = ", ".join(f"{layer}: {n}" for layer, n in unindexed.items())
        out.lines.append("report: " + (f"stale: {derived.report_staleness(rd, behind)} (the next workflow run or "
                                       "`featscope report` builds it again)" if behind else
                                       f"stale: its neighbour lists come from indexes that lack live images added "
                                       f"since they were built ({lacking}; its pages say so): the next workflow run, "
                                       "or `featscope index build` and then `featscope report`, builds it again"
                                       if unindexed else "current")
                         + (f"; {plural(len(greys), 'image')} shown as a grey square, unreadable when it was built "
                            f"(ids {', '.join(map(str, greys[:5]))}{', ...' if len(greys) > 5 else ''}): the next "
                            "workflow run or `featscope report` builds it again" if greys else ""))
        if behind or greys or unindexed:
            out.stale.append("report")
    elif (rd.report_dir / "index.html").exists():  # its pages say so too
        who = writer(rd.report_dir)
        out.lines.append("report: " + (f"being built now ({who})" if who else "unfinished: a build was stopped before "
                                       "it wrote data/run.js: the next workflow run or `featscope report` builds it "
                                       "again"))
        out.written_now += [rd.report_dir] if who else []
        out.stale.append("report")
    for lock in sorted({*rd.root.glob(f"*/{WRITER_LOCK}"), *rd.root.glob(f"*/*/{WRITER_LOCK}"),
                        *rd.root.glob(f"units/*/atlas/{WRITER_LOCK}")}):
        if lock.parent not in out.written_now and (who := writer(lock.parent)):
            out.written_now.append(lock.parent)  # saliency maps, explained pairs, a style network, ...
            out.lines.append(f"{lock.parent.relative_to(rd.root).as_posix()}: being written now ({who})")
    _leftovers(rd, out)
    runs = read_history(rd)
    if runs:
        out.lines.append(f"history: {plural(len(runs), 'workflow run')}; the last {min(history, len(runs))}:")
        for r in runs[-history:]:
            out.lines.append(f"  {r['finished']}  {r['status']:<6} {r['seconds']:>7.1f}s  {r['images']} images, "
                             f"+{r['added']} ~{r['edited']} -{r['retired']}, {plural(len(r['jobs']), 'job')}")
    if out.stale:
        out.lines.append(f"not current: {', '.join(out.stale)}; rerun the workflow (or, for an output made by hand "
                         "that the config does not ask for, the command its line names)")
    return out


MOSAIC_SUFFIX = {"grid": "jpg", "scatter": "jpg", "plot": "png"}


def _leftovers(rd: RunDir, out: Status) -> None:
    """Temporary files and index versions that jobs killed outright left where the large files
    go (see core.leftovers), none written to for an hour: they make no output wrong, but take
    space until `featscope clean` deletes them."""
    left = leftovers.find(rd)
    size = sum(item.size for item in left)
    out.left_by_stopped_jobs = {"count": len(left), "bytes": size}
    if left:
        names = [item.path.relative_to(rd.root).as_posix() for item in left]
        what = plural(len(left), "temporary file or index version", "temporary files or index versions")
        out.lines.append(f"left by stopped jobs: {what}, {size / 1e6:.1f} MB, none written "
                         f"to for over an hour ({listed(names, shown=2)}): nothing reads them; `featscope clean --run "
                         f"{rd.root}` deletes them")


def _style_network(rd: RunDir, out: Status) -> None:
    """The fast style network and what was made from it: its ONNX export and switch strips,
    each current or made from an earlier net.pt (trained on, or given a style, since)."""
    checkpoint = rd.style_net_dir / "net.pt"
    if not checkpoint.exists():
        return
    made = [p for p in (rd.style_net_dir / "net.onnx", *sorted((rd.viz_dir / "style").glob("switch-*.png")))
            if p.exists()]
    older = [p.relative_to(rd.root).as_posix() for p in made if derived.changed(rd, p, [checkpoint])]
    out.lines.append("style network: " + (f"{plural(len(made) - len(older), 'output')} of it current (its ONNX "
                                          "export, switch strips)" if made else "nothing exported or drawn from it")
                     + (f"; stale: {listed(older)} made from an earlier net.pt (trained on or given a style "
                        "since): the next workflow run, or `featscope style export` and `featscope style strip`, "
                        "makes them again" if older else ""))
    if older:
        out.stale.append("style network outputs")


def _mosaics(rd: RunDir) -> list[tuple[str, str]]:
    """(layer, kind) of every mosaic picture the run holds."""
    found = []
    for kind, suffix in MOSAIC_SUFFIX.items():
        found += [(p.name[: -len(f"-{kind}.{suffix}")], kind) for p in (rd.root / "mosaic").glob(f"*-{kind}.{suffix}")]
    return sorted(found)


def _retired_tiles(rd: RunDir, layer: str, kind: str, live: np.ndarray) -> str:
    """For a grid: how many of its tiles show images retired since it was drawn ('' if none)."""
    cells = rd.mosaic(layer, "grid", "parquet")
    if kind != "grid" or not cells.exists():
        return ""
    ids = _ids(cells)
    gone = int(np.isin(ids, live, invert=True).sum())
    return f"{gone} of its {len(ids)} tiles show images retired since" if gone else ""


def _unfinished(out: Status, what: str, folder: Path) -> None:
    """Pictures without the table that vouches for them: a job writing them now (it holds the
    folder's writer lock), or one stopped while it rewrote them (see core.atomic.withdraw).
    The report shows none of them."""
    who = writer(folder)
    if who:
        out.written_now.append(folder)
    out.lines.append(f"{what}: " + (f"being written now ({who}): shown once that job writes their table" if who else
                                    "unfinished (pictures without their table: a job was stopped while it wrote them)"))
    out.stale.append(what)


@dataclass(frozen=True)
class StatusOptions(Options):
    history: int = option(5, help="workflow runs of the history to show", min=0)
    check: bool = option(False, help="exit 1 unless the run is current: no change of the image folder pending "
                                     "and no output stale (a scheduled job's last step, or its alert)")
    json: bool = option(False, help="print the facts as JSON: current, pending changes, stale outputs, folders "
                                    "being written, what stopped jobs left (count, bytes), and the lines")


def run(rd: RunDir, options: StatusOptions) -> Status:
    if not rd.run_json.exists():
        raise FeatscopeError(f"{rd.root} is not a run: no run.json")
    out = status(rd, history=options.history)
    out.check, out.as_json = options.check, options.json
    return out


COMMANDS = [
    Command("status", StatusOptions, run, records_timing=False,
            help="where a run stands and what a rerun of the workflow would do",
            description=__doc__.split("\n\n")[1].replace("\n", " ")),
]
