"""Stages `index build`, `index evaluate` and `query`: feature-space neighbours of a run.

The index of a layer is built from its feature parts (shard by shard, never all in
memory), without images marked removed, and carries the run's identity so a query never
mixes models. `pixels` is a layer like the others (downsampled model input), which is
what lets every query compare feature space with pixel space.
"""

from __future__ import annotations

import json
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from featscope.index import (
    KINDS,
    METRICS,
    NeighbourIndex,
    build_index,
    choose_plan,
    options_of,
    parse_bytes,
    recall_shortfall,
    update_index,
    why_rebuild,
)
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import one_writer, write_bytes_atomic, write_json_atomic
from featscope.pipelines.core.neighbours import (
    image_rows,
    list_identity,
    lists_to_redo,
    neighbours_of,
    not_in_index,
    open_index,
    rewritten_note,
    unindexed_note,
)
from featscope.pipelines.core.options import Command, Group, Options, option, seed_option
from featscope.pipelines.core.progress import progress_bar
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity, file_metadata, iter_features, part_stamp
from featscope.pipelines.core.version import FEATSCOPE_VERSION


@dataclass
class IndexSummary:
    layer: str
    meta: dict
    how: str = "built"  # "built", "built (why not updated)" or "updated"

    def line(self) -> str:
        m = self.meta
        if self.how == "updated":
            u = m["last_update"]
            how = f"updated (+{u['added']} -{u['removed']} vectors, {u['seconds']:.1f}s)"
        else:
            how = f"{self.how}, {m['build_seconds']:.1f}s"
        return (f"index {self.layer}: {m['vectors']} vectors x {m['dims']} ({m['factory']}, {m['metric']}), "
                f"recall@10 {m['recall_at_10']:.3f} vs exact on {m['recall_queries']} queries; {how}")

    def warning(self) -> str:
        """Said when an approximate index misses the recall aimed for even at its widest search."""
        return recall_shortfall(self.meta)


def build(rd: RunDir, layer: str, *, kind: str = "auto", metric: str = "cosine", max_memory: str | int = "4GB",
          seed: int = 0, rebuild: bool = False, progress: bool = True) -> IndexSummary:
    """Bring the index of `layer`'s features up to date with the live images: update the
    previous index where `why_rebuild` allows (and recall holds), else build it anew."""
    identity = RunIdentity.of_run(rd.read_config())
    parts = manifest.feature_parts(rd, layer)
    dims = int(file_metadata(parts[0])["dims"])
    present = np.sort(np.asarray(manifest.read(rd)["image_id"].to_numpy(), dtype=np.int64))
    part_ids = [pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in parts]
    indexed = np.sort(np.concatenate([ids[np.isin(ids, present)] for ids in part_ids]))
    n = len(indexed)

    def chunks(selected: list[Path] = parts, wanted: np.ndarray = indexed):
        for ids, vectors in iter_features(selected, identity, batch_rows=16_384):  # small temporaries
            keep = np.isin(ids, wanted)
            yield ids[keep], vectors[keep]

    options = options_of(kind, metric, parse_bytes(max_memory), seed)
    if n:  # a plan that cannot be made (too small a budget, too few vectors to train) before any work
        choose_plan(n, dims, kind=kind, max_memory=parse_bytes(max_memory))
    stamps = {p.name: part_stamp(p) for p in parts}  # which feature files, as written, the index holds
    previous, how, result = None if rebuild else _previous(rd, layer, identity), "built", None
    again = np.zeros(0, np.int64)
    # one bar, drawn when the first pass over the vectors starts and reset for each pass after,
    # named by it: an update with nothing to add or remove drew "index pool: 0/5012" and stopped
    bars, steps = [], []
    with ExitStack() as closing:
        def show(step: str, read: int, total: int) -> None:
            if not bars:
                if not total:  # a pass over nothing: no bar yet
                    return
                bars.append(closing.enter_context(progress_bar(progress=progress, total=total, unit="vec")))
            bar = bars[0]
            if steps[-1:] != [step]:
                steps.append(step)
                bar.reset(total)
                bar.set_description(f"index {layer}: {step}")
            bar.update(read - bar.n)

        if previous is not None:
            # images whose part was written again since (extracted again: their vectors may
            # differ) go out and in again, as if retired and added
            was = previous.meta.get("feature_parts") or {}
            rewritten = [ids for p, ids in zip(parts, part_ids) if was.get(p.name, stamps[p.name]) != stamps[p.name]]
            again = indexed[np.isin(indexed, np.concatenate([np.zeros(0, np.int64), *rewritten]))
                            & np.isin(indexed, previous.ids)]
            removed = np.union1d(previous.ids[~np.isin(previous.ids, indexed)], again)
            added = np.union1d(indexed[~np.isin(indexed, previous.ids)], again)
            reason = ("it does not record which feature files it holds (built by an older featscope)"
                      if "feature_parts" not in previous.meta
                      else why_rebuild(previous.meta, n=n, removed=len(removed), options=options))
            if reason is None:
                with_new = [p for p, ids in zip(parts, part_ids) if np.isin(ids, added).any()]
                result = update_index(previous.index, previous.ids, previous.meta, removed_ids=removed,
                                      added=lambda: chunks(with_new, added), collection=chunks, n=n,
                                      on_progress=show)
                reason = "recall fell below the target after an update" if result is None else None
            how = "updated" if result is not None else f"built ({reason})"
        if result is None:
            result = build_index(chunks, n=n, dims=dims, kind=kind, metric=metric, max_memory=parse_bytes(max_memory),
                                 seed=seed, on_progress=show)
    # neighbour lists kept by the report and the evaluation stay valid while the vectors of the
    # images they name do not change: a new version whenever they may have (a build, or an
    # update that took a part written again)
    same_vectors = how == "updated" and not len(again)
    version = previous.meta.get("vectors_version") if same_vectors else None
    extra = asdict(identity) | {"layer": layer, "featscope_version": FEATSCOPE_VERSION, "feature_parts": stamps,
                                "vectors_version": version or uuid.uuid4().hex[:12]}
    saved = NeighbourIndex.from_build(result)
    with one_writer(rd.index_root, f"index build {layer}"):  # the version and its stamp: one job's
        saved.save(rd.index_dir(layer), extra_meta=extra)
        stamp = {"layer": layer, "version": rd.index_dir(layer).resolve().name,
                 "vectors": int(result.meta["vectors"]), "how": how}
        write_json_atomic(rd.index_stamp(layer), stamp)
    return IndexSummary(layer, result.meta, how)


def _previous(rd: RunDir, layer: str, identity: RunIdentity) -> NeighbourIndex | None:
    """The layer's saved index if it can be updated: readable, same model and layer."""
    if not rd.index_meta(layer).exists():
        return None
    try:
        previous = NeighbourIndex.load(rd.index_dir(layer))
    except FeatscopeError:
        return None  # damaged or mismatched files: a fresh build replaces them
    same = {key: previous.meta.get(key) for key in (*asdict(identity), "layer")} == asdict(identity) | {"layer": layer}
    return previous if same else None


class Precision(NamedTuple):
    """Leave-one-out precision@k over `queries` images, overall and per label, and the
    queries' neighbour lists it was computed from."""

    overall: float
    queries: int
    per_label: dict[str, tuple[float, int]]  # label -> (precision, queries of that label)
    lists: dict[int, list] = {}  # query -> [[neighbour id, distance], ...]


def query_sample(ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to n of `ids` (sorted): those with the smallest pseudo-random priority, a fixed hash
    of the id and the seed. An image's priority never changes, so as the dataset grows or
    shrinks the sample changes only by the images that enter or leave it."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    with np.errstate(over="ignore"):  # splitmix64: arithmetic modulo 2^64
        x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return np.sort(ids[np.argsort(x, kind="stable")[:n]])


def precision_at_k(index: NeighbourIndex, labels: dict[int, str], *, k: int = 10, max_queries: int = 2000,
                   seed: int = 0, previous: dict[int, list] | None = None,
                   added: np.ndarray | None = None) -> Precision:
    """Leave-one-out precision@k: the share of each labelled image's k nearest other images
    that carry its label, averaged over up to `max_queries` labelled images (`query_sample`),
    and over those of each label (a small label can win or lose where the overall figure does
    not show it). `previous` lists, computed on this exact index before the images `added`
    entered it, are kept where no change can reach them (`lists_to_redo`)."""
    ids = np.array(sorted(i for i in labels if labels[i] is not None), dtype=np.int64)
    ids = ids[np.isin(ids, index.ids)]
    if len(ids) == 0:
        raise FeatscopeError("no labelled images in this run: precision@k needs labels")
    ids = query_sample(ids, max_queries, seed)
    old = previous or {}
    redo = lists_to_redo(index, old, ids, k, added if added is not None else index.ids) if old else ids
    redone = set(redo.tolist())
    lists = {i: old[i] for i in ids.tolist() if i in old and i not in redone}
    for start in range(0, len(redo), 4096):
        chunk = redo[start:start + 4096]
        found = neighbours_of(index, chunk, k)
        for query, row_ids, row_d in zip(chunk.tolist(), found.image_ids, found.distances):
            lists[query] = [[int(i), float(d)] for i, d in zip(row_ids, row_d) if i >= 0]
    scores, by_label = [], {}
    for query in ids.tolist():
        others = [n for n, _ in lists[query]]
        score = np.mean([labels.get(n) == labels[query] for n in others]) if others else 0.0
        scores.append(score)
        by_label.setdefault(str(labels[query]), []).append(score)
    per_label = {label: (float(np.mean(s)), len(s)) for label, s in sorted(by_label.items())}
    return Precision(float(np.mean(scores)), len(ids), per_label, lists)


def _kept_lists(rd: RunDir) -> dict:
    """What the last evaluation kept (see `_previous_lists`); {} if missing or unreadable."""
    try:
        kept = json.loads(rd.index_evaluation_lists.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _previous_lists(kept: dict, layer: str, index: NeighbourIndex, k: int, max_queries: int
                    ) -> tuple[dict[int, list] | None, np.ndarray | None]:
    """The lists the last evaluation kept for `layer`, and the images added to its index
    since, if they can be reused: an exact index, the same vectors' model, k and sample size."""
    try:
        space = kept["layers"][layer]
        if (index.meta.get("kind") != "flat" or space["identity"] != list_identity(index)
                or (kept["k"], kept["max_queries"]) != (k, max_queries)):
            return None, None
        # ids are never reused and new images get larger ones: those above the largest id
        # indexed then are the images added since
        return {int(q): found for q, found in space["lists"].items()}, index.ids[index.ids > space["largest_id"]]
    except (KeyError, TypeError, AttributeError):
        return None, None


def evaluate(rd: RunDir, layers: list[str] | None = None, *, k: int = 10, max_queries: int = 2000) -> dict:
    """precision@k per layer (pixels included where its index exists), overall and per label;
    written to index/evaluation.json. A rerun after a small change of an exact index
    recomputes only the queries' lists the change can reach."""
    built = rd.index_layers()
    layers = layers or built
    if not layers:
        raise FeatscopeError(f"no index in {rd.root}: run `featscope index build` first")
    sources = derived.stamp(rd, derived.evaluation_sources(rd, layers))
    rows = manifest.read(rd).to_pylist()
    labels = {r["image_id"]: r["label"] for r in rows}
    result = {"k": k, "layers": {}}
    if not any(label is not None for label in labels.values()):
        result["skipped"] = "the images have no labels"
        with one_writer(rd.index_evaluation.parent, "index evaluate"):  # the figures and their record: one job's
            derived.forget(rd.index_evaluation)
            write_json_atomic(rd.index_evaluation, result)
            derived.remember(rd.index_evaluation, sources[-1:])  # the labels' stamp: measured no index
        return result
    last, kept = _kept_lists(rd), {"k": k, "max_queries": max_queries, "layers": {}}
    for layer in layers:
        index = open_index(rd, layer)
        previous, added = _previous_lists(last, layer, index, k, max_queries)
        p = precision_at_k(index, labels, k=k, max_queries=max_queries, previous=previous, added=added)
        result["layers"][layer] = {"precision_at_k": round(p.overall, 4), "queries": p.queries,
                                   "per_label": {label: {"precision_at_k": round(v, 4), "queries": n}
                                                 for label, (v, n) in p.per_label.items()}}
        kept["layers"][layer] = {"identity": list_identity(index), "largest_id": int(index.ids.max()),
                                 "lists": {str(q): found for q, found in p.lists.items()}}
    with one_writer(rd.index_evaluation.parent, "index evaluate"):  # the figures and their record: one job's
        derived.forget(rd.index_evaluation)
        write_bytes_atomic(rd.index_evaluation_lists, json.dumps(kept, separators=(",", ":")).encode())
        write_json_atomic(rd.index_evaluation, result)
        derived.remember(rd.index_evaluation, sources)
    return result


def format_evaluation(result: dict) -> str:
    """The evaluation as a table: a row per label (full names, every label), a column per
    layer, the overall precision first."""
    layers = result["layers"]
    queries = max(v["queries"] for v in layers.values())
    labels = sorted({lab for v in layers.values() for lab in v.get("per_label", {})})
    first = next(iter(layers.values())).get("per_label", {})
    names = ["(all)", *labels]
    width = max(len(n) for n in names) + 2
    columns = [max(len(layer), 6) + 2 for layer in layers]
    lines = [f"precision@{result['k']} of same-label neighbours (leave-one-out, {queries} queries)",
             "label".ljust(width) + "queries" + "".join(layer.rjust(w) for layer, w in zip(layers, columns))]
    lines.append("(all)".ljust(width) + f"{queries:7d}" +
                 "".join(f"{v['precision_at_k']:{w}.3f}" for v, w in zip(layers.values(), columns)))
    for lab in labels:
        cells = "".join(f"{v['per_label'][lab]['precision_at_k']:{w}.3f}" if lab in v.get("per_label", {})
                        else "-".rjust(w) for v, w in zip(layers.values(), columns))
        count = first[lab]["queries"] if lab in first else 0
        lines.append(lab.ljust(width) + f"{count:7d}" + cells)
    return "\n".join(lines)


@dataclass
class QueryAnswer:
    """`query`'s neighbours, best first, and a note when the layer's index lacks some of the
    run's live images (added since it was last updated: no answer can name them), or misses
    the recall aimed for."""
    neighbours: list[dict]
    note: str = ""
    as_json: bool = False

    def line(self) -> str:
        return format_answer(self.neighbours, self.as_json)

    def warning(self) -> str:
        return self.note


def query(rd: RunDir, layer: str, *, image_id: int | None = None, path: str | None = None,
          image: str | Path | None = None, k: int = 10, mmap: bool = False) -> QueryAnswer:
    """Nearest images to an image id, a path in the run, or a new image file."""
    if sum(x is not None for x in (image_id, path, image)) != 1:
        raise ParamError("id", "or <path> or <image>: give exactly one")
    index = open_index(rd, layer, mmap=mmap)
    rows = image_rows(rd)
    failed = manifest.extraction_failures(rd)
    if path is not None:
        wanted = str(Path(path).resolve())
        matches = sorted((r["removed"], i) for i, r in rows.items() if r["path"] == wanted)  # the live one first
        if not matches:
            raise FeatscopeError(f"{path} is not an image of run {rd.root}")
        image_id = matches[0][1]
    if image is not None:
        from featscope.pipelines.core.features import ImageEmbedder, checked_vector

        found = index.search_vectors(checked_vector(ImageEmbedder(rd.read_config(), [layer]).embed(image, layer),
                                                    layer), k=k)
    else:
        if image_id not in rows:
            raise FeatscopeError(f"image_id {image_id} is not in run {rd.root}")
        if rows[image_id]["removed"]:
            raise FeatscopeError(f"image {image_id} was retired from run {rd.root} (its file went away or changed): "
                                 "it has no neighbours now")
        if image_id in failed:
            raise FeatscopeError(f"image {image_id} has no {layer} features: {failed[image_id]} (errors.parquet)")
        if image_id not in index:
            raise not_in_index(rd, layer, image_id)
        found = neighbours_of(index, [image_id], k)
    live = np.fromiter((i for i, r in rows.items() if not r["removed"] and i not in failed), dtype=np.int64)
    note = unindexed_note(rd, layer, index.ids, live)
    if again := rewritten_note(rd, layer, index.meta):
        note = "; ".join(filter(None, [note, again]))
    if shortfall := recall_shortfall(index.meta):
        note = "; ".join(filter(None, [note, f"the '{layer}' index's {shortfall}"]))
    return QueryAnswer([{"rank": rank + 1, "image_id": int(i), "path": rows[int(i)]["path"],
                         "label": rows[int(i)]["label"], "distance": float(d)}
                        for rank, (i, d) in enumerate(zip(found.image_ids[0], found.distances[0])) if i >= 0], note)


def format_answer(answer: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps(answer, indent=2)
    lines = [f"{'rank':>4}  {'image_id':>8}  {'distance':>9}  {'label':<10} path"]
    lines += [f"{a['rank']:>4}  {a['image_id']:>8}  {a['distance']:>9.4f}  {str(a['label']):<10} {a['path']}"
              for a in answer]
    return "\n".join(lines)



# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexBuildOptions(Options):
    layer: str = option(help="an extracted layer, or `pixels` for pixel space", required=True)
    kind: str = option("auto", help="auto: exact below 200k vectors within max_memory, else IVF with the most "
                                    "compact codes that fit", choices=KINDS)
    metric: str = option("cosine", help="distance between feature vectors", choices=METRICS)
    max_memory: str = option("4GB", help="memory budget of the index, e.g. 4GB or 512MB",
                             pattern=r"^\s*[0-9.eE+]+\s*[KMGTkmgt]?(i?[Bb])?\s*$")
    seed: int = seed_option(0, help="seed of the training and recall samples")
    rebuild: bool = option(False, help="build anew even where the previous index can be updated")


@dataclass(frozen=True)
class IndexEvaluateOptions(Options):
    layers: list[str] | None = option(help="comma-separated (default: every built index)")
    k: int = option(10, help="neighbours per query", min=1, max=1000)
    queries: int = option(2000, help="labelled images to query (a seeded sample)", min=1)


@dataclass(frozen=True)
class QueryOptions(Options):
    layer: str = option(help="an indexed layer", required=True)
    id: int | None = option(help="an image_id of the run")
    path: str | None = option(help="the path of an image of the run")
    image: Path | None = option(help="any image file: embedded with the run's model")
    k: int = option(10, help="neighbours returned", min=1, max=100_000)
    json: bool = option(False, help="machine-readable output")
    mmap: bool = option(False, help="memory-map the index instead of reading it")


def _build(rd: RunDir, options: IndexBuildOptions, progress: bool = True) -> IndexSummary:
    return build(rd, options.layer, kind=options.kind, metric=options.metric, max_memory=options.max_memory,
                 seed=options.seed, rebuild=options.rebuild, progress=progress)


def _evaluate(rd: RunDir, options: IndexEvaluateOptions) -> str:
    result = evaluate(rd, options.layers, k=options.k, max_queries=options.queries)
    if "skipped" in result:
        return f"index evaluate: skipped, {result['skipped']}"
    return format_evaluation(result)


def _query(rd: RunDir, options: QueryOptions) -> QueryAnswer:
    answer = query(rd, options.layer, image_id=options.id, path=options.path, image=options.image, k=options.k,
                   mmap=options.mmap)
    answer.as_json = options.json
    return answer


COMMANDS = [
    Command("index build", IndexBuildOptions, _build, help="build the neighbour index of one layer (or `pixels`)",
            description="auto: exact search below 200k vectors within --max-memory, else IVF (with PCA to 256 "
                        "dims, then PQ, only if needed to fit); recall@10 is measured against exact search. "
                        "A previous index of the layer is updated (retired images out, new ones in) unless the "
                        "options changed, the collection doubled since training, or recall fell: then rebuilt."),
    Command("index evaluate", IndexEvaluateOptions, _evaluate,
            help="precision@k of same-label neighbours, feature vs pixel space"),
    Command("query", QueryOptions, _query, help="nearest images to an image of the run or a new image file",
            groups=(Group(("id", "path", "image"), required=True),), records_timing=False),
]
