"""The report's neighbour lists (each image's k nearest other images per indexed space),
recomputed on a rerun only where the change can reach.

A rerun reads the previous lists back from the report's data files and recomputes only
those a change can reach (`neighbours.lists_to_redo`) and the new images' own: the same
lists as a full recomputation, at the cost of searching the old images against the few new
ones. Approximate indexes, another k, or no
previous report: everything is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featscope.pipelines.core.atomic import write_json_atomic
from featscope.pipelines.core.neighbours import list_identity, lists_to_redo, neighbours_of, open_index
from featscope.pipelines.core.progress import progress_bar
from featscope.pipelines.core.rundir import RunDir


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


def neighbour_lists(rd: RunDir, ids: np.ndarray, k: int, progress: bool
                    ) -> tuple[dict[str, dict[int, list]], dict[str, int], dict, dict[str, np.ndarray]]:
    """Per indexed space: each image's k nearest other images as [[id, distance], ...]; per
    space how many lists were computed afresh; the state to `save_state` once written; and
    per space the images of `ids` its index lacks (they have no list)."""
    previous, state = _previous(rd, k)
    found: dict[str, dict[int, list]] = {}
    computed: dict[str, int] = {}
    absent: dict[str, np.ndarray] = {}
    new_state = {"k": k, "spaces": {}}
    for layer in rd.index_layers():
        index = open_index(rd, layer)
        indexed = np.isin(ids, index.ids)
        present, absent[layer] = ids[indexed], ids[~indexed]
        exact = index.meta.get("kind") == "flat"
        same = state.get("spaces", {}).get(layer) == list_identity(index)
        old = previous.get(layer, {}) if exact and same else {}
        added = present[~np.isin(present, np.fromiter(old, np.int64, len(old)))]  # (and any list not kept)
        redo = lists_to_redo(index, old, present, k, added) if old else present
        found[layer] = {i: old[i] for i in present.tolist() if i in old}
        for start in progress_bar(range(0, len(redo), 4096), desc=f"neighbours {layer}", progress=progress):
            chunk = redo[start:start + 4096]
            result = neighbours_of(index, chunk, k)
            for query, row_ids, row_d in zip(chunk, result.image_ids, result.distances):
                found[layer][int(query)] = [[int(i), round(float(d), 4)] for i, d in zip(row_ids, row_d) if i >= 0]
        computed[layer] = len(redo)
        new_state["spaces"][layer] = list_identity(index)
    return found, computed, new_state, absent


def save_state(rd: RunDir, state: dict) -> None:
    """Record what the lists were made with; called once the data files hold them."""
    write_json_atomic(_state_path(rd), state)
