"""The report's neighbour lists (each image's k nearest other images per indexed space),
recomputed on a rerun only where the change can reach.

For an exact (flat) index an image's list can change only if one of its neighbours was
retired, or a new image is at least as near as its k-th neighbour. So a rerun reads the
previous lists back from the report's data files, recomputes those lists and the new
images' own, and keeps the rest: the same lists as a full recomputation, at the cost of
searching the old images against the few new ones. Approximate indexes, another k, or no
previous report: everything is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from featscope.pipelines.core.atomic import write_json_atomic
from featscope.pipelines.core.neighbours import neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir

TIE = 1e-4  # stored distances are rounded to 4 decimals: a new image this close to the k-th may enter


def read_script(path: Path) -> dict:
    """The object a report data file assigns (window.X = Object.assign(window.X || {}, {...}))."""
    text = path.read_text()
    return json.loads(text[text.index("}, ") + 3: text.rindex(")")])


def _state_path(rd: RunDir) -> Path:
    return rd.report_dir / "data" / "neighbours-state.json"


def _previous(rd: RunDir, k: int) -> tuple[dict[str, dict[int, list]], dict]:
    """The lists of the last report, per space, if made with the same k; and its state."""
    state_path = _state_path(rd)
    if not state_path.exists():
        return {}, {}
    state = json.loads(state_path.read_text())
    if state.get("k") != k:
        return {}, {}
    lists: dict[str, dict[int, list]] = {}
    for path in sorted((rd.report_dir / "data").glob("images-*.js")):
        try:
            entries = read_script(path)
        except (ValueError, OSError):
            return {}, {}  # damaged: recompute everything
        for key, entry in entries.items():
            for space, found in entry.get("neighbours", {}).items():
                lists.setdefault(space, {})[int(key)] = found
    return lists, state


def _distances(metric: str, squared_l2: np.ndarray) -> np.ndarray:
    """Squared L2 between prepared vectors -> the distances the index reports."""
    d = np.maximum(squared_l2, 0.0)
    return d / 2.0 if metric == "cosine" else np.sqrt(d)


def _to_redo(index, old: dict[int, list], present: np.ndarray, k: int) -> np.ndarray:
    """Ids among `present` whose lists must be computed (see the module's docstring)."""
    have = np.array(sorted(i for i in old if i in index), dtype=np.int64)
    have = have[np.isin(have, present)]
    new = present[~np.isin(present, have)]
    live = set(present.tolist())
    want = min(k, len(index) - 1)
    stale = [i for i in have.tolist() if len(old[i]) != want or any(n not in live for n, _ in old[i])]
    affected = []
    if len(new) and len(have):
        fresh = faiss.IndexFlatL2(index.dims)
        fresh.add(np.ascontiguousarray(index.vectors_of(new), dtype=np.float32))
        for start in range(0, len(have), 8192):
            chunk = have[start:start + 8192]
            squared, _ = fresh.search(np.ascontiguousarray(index.vectors_of(chunk), dtype=np.float32), 1)
            nearest_new = _distances(index.meta["metric"], squared[:, 0])
            kth = np.array([old[i][-1][1] if old[i] else np.inf for i in chunk.tolist()])
            affected.append(chunk[nearest_new <= kth + TIE])
    return np.unique(np.concatenate([new, np.asarray(stale, dtype=np.int64), *affected]))


def neighbour_lists(rd: RunDir, ids: np.ndarray, k: int, progress: bool
                    ) -> tuple[dict[str, dict[int, list]], dict[str, int], dict]:
    """Per indexed space: each image's k nearest other images as [[id, distance], ...]; per
    space how many lists were computed afresh; and the state to `save_state` once written."""
    previous, state = _previous(rd, k)
    found: dict[str, dict[int, list]] = {}
    computed: dict[str, int] = {}
    new_state = {"k": k, "spaces": {}}
    for layer in rd.index_layers():
        index = open_index(rd, layer)
        present = ids[np.isin(ids, index.ids)]
        exact = index.meta.get("kind") == "flat"
        same = state.get("spaces", {}).get(layer) == _identity(index)
        old = previous.get(layer, {}) if exact and same else {}
        redo = _to_redo(index, old, present, k) if old else present
        found[layer] = {i: old[i] for i in present.tolist() if i in old}
        for start in tqdm(range(0, len(redo), 4096), desc=f"neighbours {layer}", disable=not progress):
            chunk = redo[start:start + 4096]
            result = neighbours_of(index, chunk, k)
            for query, row_ids, row_d in zip(chunk, result.image_ids, result.distances):
                found[layer][int(query)] = [[int(i), round(float(d), 4)] for i, d in zip(row_ids, row_d) if i >= 0]
        computed[layer] = len(redo)
        new_state["spaces"][layer] = _identity(index)
    return found, computed, new_state


def save_state(rd: RunDir, state: dict) -> None:
    """Record what the lists were made with; called once the data files hold them."""
    write_json_atomic(_state_path(rd), state)


def _identity(index) -> dict:
    """What the lists of a space were computed with: the same kind, metric and vectors'
    model keep old lists valid (updates included)."""
    m = index.meta
    return {"kind": m.get("kind"), "metric": m.get("metric"), "dims": m.get("dims"),
            "weights_sha256": m.get("weights_sha256"), "preprocessing": m.get("preprocessing")}
