"""The run's history: one JSON line per workflow run, appended when it ends.

Each line says when the run started and ended, how many images the dataset had, what the
manifest changed (added, edited, retired), which jobs ran (their timing records) and
whether it succeeded, so a scheduled run's record answers "what did last night's run do".
"""

from __future__ import annotations

import json
import time

from featscope.pipelines.core.atomic import append_line
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.timings import read_timings

STAMP = "%Y-%m-%d %H:%M:%S"


def record_run(rd: RunDir, started: float, status: str) -> dict:
    """Append the line of a workflow run that began at `started` (time.time())."""
    since = time.strftime(STAMP, time.localtime(started))
    config = rd.read_config() if rd.run_json.exists() else {}
    update = config.get("last_update") or {}
    changed = update if update.get("at", "") >= since else {}
    live = len(rd.live_ids.read_text().split()) if rd.live_ids.exists() else None
    row = {
        "started": since, "finished": time.strftime(STAMP), "seconds": round(time.time() - started, 1),
        "status": status, "images": live, "added": changed.get("added", 0), "edited": changed.get("edited", 0),
        "retired": changed.get("retired", 0), "relabelled": changed.get("relabelled", 0),
        "jobs": sorted(t["stage"] for t in read_timings(rd) if t["finished"] >= since),
    }
    rd.root.mkdir(parents=True, exist_ok=True)
    append_line(rd.history, json.dumps(row, sort_keys=True))
    return row


def read_history(rd: RunDir) -> list[dict]:
    """Every recorded run, oldest first (a torn last line, from a crash, is skipped)."""
    if not rd.history.exists():
        return []
    rows = []
    for line in rd.history.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
