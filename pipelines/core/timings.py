"""Stage timings: every `featscope` command on a run leaves one small JSON record.

One file per stage and target (timings/<stage>.json, e.g. extract-shard-00003,
saliency-occlusion), written atomically, so parallel jobs never share a file; the report
lists them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from featscope.pipelines.core.atomic import write_json_atomic
from featscope.pipelines.core.rundir import RunDir


def record(rd: RunDir, stage: str, seconds: float, detail: str = "") -> Path:
    path = rd.timings_dir / f"{stage}.json"
    write_json_atomic(path, {"stage": stage, "seconds": round(seconds, 3), "finished": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "detail": detail})
    return path


def read_timings(rd: RunDir) -> list[dict]:
    if not rd.timings_dir.is_dir():
        return []
    return sorted((json.loads(p.read_text()) for p in rd.timings_dir.glob("*.json")), key=lambda t: t["finished"])
