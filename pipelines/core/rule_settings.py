"""What decides a workflow rule's outputs, kept in a file whose changes Snakemake sees.

Snakemake reruns a rule whose params changed, but it records no params for a job whose
params function takes `threads` (they count as derived): extract and the two saliency rules.
A change of `topk.k`, of a saliency option or of the evaluation's steps in the config then
redid nothing, and the run kept outputs made with the old settings as if they were current.

Each such rule takes `as_input(rd, rule)` as an input: a file that `record` rewrites, at each
invocation of the workflow, when what decides the rule's outputs changes (its options that
differ from their defaults, but the tuning ones, threads and workers and the like: see
`options.deciding`). Its new time then reruns every job of the rule. A record written for
the first time is given the time 0 and is no input yet: the outputs there are (none in a new
run; those of a run made before records were kept) count as made with the settings of now,
since listing a new input would rerun them all, as any change to a rule's inputs does;
unless the outputs tell otherwise (`made_so`: extract's candidates record their top-k).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import rewrite_if_changed, write_bytes_atomic
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import file_metadata


def record(rd: RunDir, rule: str, settings: str, *, made_so: Callable[[], bool] = lambda: True) -> bool:
    """Keep `settings` as what decides `rule`'s outputs; True where they changed (the file is
    then rewritten, and its time reruns the rule). `made_so`: whether the outputs there are
    were made with `settings`, as far as they tell, asked when the record is first written
    (a run whose config changed before records were kept reruns the rule then)."""
    path, data = rd.rule_settings(rule), (settings + "\n").encode()
    if not path.exists():
        write_bytes_atomic(path, data)
        if not made_so():
            return True
        os.utime(path, ns=(0, 0))  # see the module's docstring
        return False
    return rewrite_if_changed(path, data)


def candidates_are(rd: RunDir, layers: list[str], k: int) -> bool:
    """Whether every shard's top-k candidates of `layers` there are keep the top `k`, as
    their metadata says (extract's outputs: whether they were made with `topk.k` = k)."""
    for layer in layers:
        folder = rd.topk_candidates_part(layer, 0).parent
        for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
            try:
                if int(file_metadata(part).get("k", -1)) != k:
                    return False
            except (FeatscopeError, ValueError):
                return False  # damaged or foreign: its job makes it again
    return True


def as_input(rd: RunDir, rule: str) -> list[str]:
    """The rule's record as a list of inputs: empty until its settings first changed."""
    path = rd.rule_settings(rule)
    try:
        return [str(path)] if path.stat().st_mtime_ns > 0 else []
    except FileNotFoundError:
        return []
