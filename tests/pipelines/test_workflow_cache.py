"""The Snakefile's cache of what it derives from a config and the code: a hit returns the
stored value, any change of the code or the config misses, and only what reads back equal is
kept. (tests/e2e/test_changing_dataset.py checks a cached workflow start against an uncached one.)"""

import json
import os

import pytest

from featscope.pipelines.app import workflow_cache
from featscope.pipelines.app.workflow_cache import WorkflowCache, code_fingerprint


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_saved_result_is_returned_without_computing_it_again(tmp_path):
    first = WorkflowCache(tmp_path, {"run": "a"})
    compute = Counter({"cmd": "featscope extract --shard 3"})
    assert first.get("command", ["extract", 3], compute) == compute.value
    assert first.get("command", ["extract", 3], compute) == compute.value and compute.calls == 1
    first.save()
    again = Counter("something else")
    assert WorkflowCache(tmp_path, {"run": "a"}).get("command", ["extract", 3], again) == compute.value
    assert again.calls == 0
    # another config, other arguments: computed
    assert WorkflowCache(tmp_path, {"run": "b"}).get("command", ["extract", 3], again) == "something else"
    assert WorkflowCache(tmp_path, {"run": "a"}).get("command", ["extract", 4], again) == "something else"
    assert again.calls == 2


def test_values_that_do_not_read_back_equal_and_errors_are_not_kept(tmp_path):
    cache = WorkflowCache(tmp_path, {})
    assert cache.get("x", 1, lambda: (1, 2)) == (1, 2)  # JSON reads a tuple back as a list
    assert cache.get("y", 1, lambda: {1: "a"}) == {1: "a"}  # and int keys as strings

    def fails():
        raise ValueError("bad config")

    with pytest.raises(ValueError):
        cache.get("z", 1, fails)
    cache.save()
    later = Counter("computed")
    for kind in ("x", "y", "z"):
        assert WorkflowCache(tmp_path, {}).get(kind, 1, later) == "computed"
    assert later.calls == 3


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    cache = WorkflowCache(tmp_path, {})
    cache.get("k", 1, lambda: "v")
    cache.save()
    [path] = tmp_path.glob("*.json")
    for damage in (b"{not json", b"[1, 2]", b""):
        path.write_bytes(damage)
        assert WorkflowCache(tmp_path, {}).get("k", 1, lambda: "fresh") == "fresh"


def test_the_fingerprint_follows_every_source_file(tmp_path, monkeypatch):
    package = tmp_path / "fakepkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "stage.py").write_text("X = 1\n")
    (package / "schema.yaml").write_text("a: 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(workflow_cache, "PACKAGES", ("fakepkg",))
    before = code_fingerprint()
    assert code_fingerprint() == before
    for path in (package / "sub" / "stage.py", package / "schema.yaml"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        after = code_fingerprint()
        assert after != before
        before = after
    (package / "sub" / "new.py").write_text("")
    assert code_fingerprint() != before
    snakefile = tmp_path / "Snakefile"  # files named besides featscope's own
    snakefile.write_text("rule all:\n")
    with_snakefile = code_fingerprint(snakefile)
    assert with_snakefile != code_fingerprint()
    os.utime(snakefile, ns=(0, snakefile.stat().st_mtime_ns + 1_000_000))
    assert code_fingerprint(snakefile) != with_snakefile


def test_a_new_fingerprint_replaces_the_old_files(tmp_path, monkeypatch):
    cache = WorkflowCache(tmp_path, {})
    cache.get("k", 1, lambda: "v")
    cache.save()
    monkeypatch.setattr(workflow_cache, "code_fingerprint", lambda *files: "0123456789abcdef")
    newer = WorkflowCache(tmp_path, {})
    assert newer.get("k", 1, lambda: "recomputed") == "recomputed"
    newer.save()
    [path] = tmp_path.glob("*.json")
    assert path.name.startswith("0123456789abcdef") and json.loads(path.read_text()) == {"k:1": "recomputed"}
