"""Manifests: every source kind, stable ids as the dataset grows, removals marked, shards;
an image's identity is its path and content: edits retire the old id, moves keep ids."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.app.status import status
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import file_digest
from featscope.pipelines.core.rundir import ID_KEYED, RunDir
from featscope.pipelines.core.store import RunIdentity, candidates_run_short, read_errors, write_table, write_topk


def touch_images(root, names):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # content is irrelevant to the manifest


def rows(rd):
    """path under images/ -> the live row (or the last row, for a path with none live)."""
    out = {}
    for r in sorted(manifest.read(rd, include_removed=True).to_pylist(), key=lambda r: (not r["removed"], r["image_id"])):
        out[r["path"].rsplit("/images/", 1)[1]] = r
    return out


def test_label_folders_give_labels_and_flat_files_none(tmp_path):
    touch_images(tmp_path / "images", ["cat/a.jpg", "cat/b.PNG", "dog/c.jpeg", "loose.png", "notes.txt"])
    rd = RunDir(tmp_path / "run")
    s = manifest.run(rd, tmp_path / "images", shard_size=2)
    got = rows(rd)
    assert set(got) == {"cat/a.jpg", "cat/b.PNG", "dog/c.jpeg", "loose.png"}
    assert got["cat/a.jpg"]["label"] == "cat" and got["loose.png"]["label"] is None
    assert sorted(r["image_id"] for r in got.values()) == [0, 1, 2, 3]
    assert [r["shard"] for r in sorted(got.values(), key=lambda r: r["image_id"])] == [0, 0, 1, 1]
    assert s.total == 4 and s.shards == 2
    assert rd.read_config()["shard_size"] == 2


def test_growth_keeps_old_ids_and_shards_and_puts_new_images_in_new_shards(tmp_path):
    root = tmp_path / "images"
    touch_images(root, ["a/1.png", "a/2.png", "b/3.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, root, shard_size=2)
    before = rows(rd)
    touch_images(root, ["a/0.png", "c/9.png"])  # "a/0" sorts before existing files
    (root / "b/3.png").unlink()
    s = manifest.run(rd, root)
    after = rows(rd)
    for path, row in before.items():
        assert after[path]["image_id"] == row["image_id"] and after[path]["shard"] == row["shard"]
    assert after["b/3.png"]["removed"] and not after["a/1.png"]["removed"]
    assert {after["a/0.png"]["image_id"], after["c/9.png"]["image_id"]} == {3, 4}
    assert after["a/0.png"]["shard"] == after["c/9.png"]["shard"] == 2  # a new shard, same shard size
    assert s.added == 2 and s.removed == 1 and s.new_shards == [2]
    assert manifest.shards(rd) == [0, 2]  # shard 1 held only the removed image


def test_rerun_without_changes_leaves_the_manifest_file_untouched(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    stamp = rd.manifest.stat().st_mtime_ns
    assert manifest.run(rd, tmp_path / "images").added == 0
    assert rd.manifest.stat().st_mtime_ns == stamp


def test_text_list_and_tables_with_a_path_column(tmp_path):
    touch_images(tmp_path / "images", ["x/1.png", "x/2.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimages/x/1.png\n\n" + str(tmp_path / "images/x/2.png") + "\n")
    rd = RunDir(tmp_path / "r1")
    assert manifest.run(rd, listing).total == 2
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": ["images/x/1.png"], "label": ["one"]}), table)
    rd2 = RunDir(tmp_path / "r2")
    manifest.run(rd2, table)
    assert pq.read_table(rd2.manifest)["label"].to_pylist() == ["one"]
    csv = tmp_path / "t.csv"
    csv.write_text("path\nimages/x/2.png\n")
    assert manifest.run(RunDir(tmp_path / "r3"), csv).total == 1


def test_a_source_that_lists_no_image_retires_nothing_unless_asked(tmp_path):
    """A scheduled run over a folder whose file system is not mounted (an empty mount point),
    or over an emptied list, used to retire every image and delete every feature part: each
    image came back under a new id, extracted anew, when the folder did."""
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    rd.feature_part("pool", 0).parent.mkdir(parents=True)
    rd.feature_part("pool", 0).write_bytes(b"part")
    (tmp_path / "unmounted").mkdir()
    (tmp_path / "list.txt").write_text("# every line was removed\n")
    listed, recorded = rd.manifest.read_bytes(), rd.run_json.read_bytes()
    for source in (tmp_path / "unmounted", tmp_path / "list.txt"):
        with pytest.raises(ParamError, match="lists no image now, but run .* has 2.*Nothing was changed") as refused:
            manifest.run(rd, source)
        assert refused.value.param == "allow_empty"  # the CLI names --allow-empty
        assert rd.manifest.read_bytes() == listed and rd.run_json.read_bytes() == recorded
        assert rd.feature_part("pool", 0).exists()
    assert manifest.run(rd, tmp_path / "images").total == 2  # back: the same ids, nothing to redo
    done = manifest.run(rd, tmp_path / "unmounted", allow_empty=True)  # gone for good, as asked
    assert (done.total, done.retired_now) == (0, 2) and not rd.feature_part("pool", 0).exists()
    assert manifest.run(rd, tmp_path / "unmounted").total == 0  # nothing live left to protect


def test_images_a_listing_cannot_read_now_are_kept_not_retired(tmp_path, monkeypatch):
    """A label folder linked to a share that is not mounted, a folder that cannot be opened,
    a file that cannot be stat'ed: each used to be left out of the listing in silence (the
    link, the file) or with a word (the folder), and its images were retired, their features
    deleted, and given new ids when they came back. Unknown is not gone: they are kept."""
    images, share = tmp_path / "images", tmp_path / "share"
    touch_images(images, ["a/1.png", "a/2.png", "b/1.png", "b/2.png"])
    touch_images(share, ["1.png", "2.png"])
    os.symlink(share, images / "c")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images)
    listed = rd.manifest.read_bytes()
    ids = {k: r["image_id"] for k, r in rows(rd).items()}
    assert len(ids) == 6

    share.rename(tmp_path / "away")  # the link now points at nothing
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path="."):
        if os.fspath(path).endswith("/images/b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if os.fspath(path).endswith("/images/a/2.png"):
            raise OSError(5, "Input/output error", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        m.setattr(os, "stat", stat)
        s = manifest.run(rd, images)
        assert (s.retired_now, s.added, s.unavailable) == (0, 0, 5)
        assert "5 images kept as they were" in s.line()
        assert sorted(why.split(" (")[0] for _, why in s.skipped) == [
            "broken link", "unreadable file", "unreadable folder"]
        assert rd.manifest.read_bytes() == listed  # nothing retired, nothing renumbered
        pending = status(rd)
        assert pending.pending["vanished"] == 0 and "5 live images under a folder, link or file not readable" in \
            "\n".join(pending.lines)
    (tmp_path / "away").rename(share)
    s = manifest.run(rd, images)  # back: the same ids, nothing to redo
    assert (s.retired_now, s.added, s.unavailable, s.skipped) == (0, 0, 0, [])
    assert {k: r["image_id"] for k, r in rows(rd).items()} == ids


def test_a_folder_found_empty_and_untouched_retires_nothing_unless_asked(tmp_path):
    """A label folder that is there, empty, and unchanged since the last update is what the
    mount point of a file system that is not mounted looks like: its images used to be
    retired and their shards extracted again, and when the folder came back every image got
    a new id. A folder whose files were deleted (which touches it), or a folder deleted, is an
    ordinary removal."""
    images = tmp_path / "images"
    touch_images(images, ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/3.png", "c/1.png", "d/1.png", "d/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images)
    listed = rd.manifest.read_bytes()

    def unmount(folder):  # what is left: the mount point, as old as when it was made
        for path in folder.iterdir():
            path.unlink()
        os.utime(folder, ns=(1_000_000_000, 1_000_000_000))

    unmount(images / "b")
    with pytest.raises(ParamError, match=r"images/b is empty now, but run .* has 3 images from it: .*Nothing was "
                                         r"changed") as refused:
        manifest.run(rd, images)
    assert refused.value.param == "allow_empty" and rd.manifest.read_bytes() == listed
    said = next(line for line in status(rd).lines if line.startswith("images "))
    assert "images/b is empty now" in said and "manifest update refuses to retire them" in said
    (images / "c" / "1.png").unlink()  # deleted by hand: the folder is touched
    shutil.rmtree(images / "d")  # a folder deleted
    with pytest.raises(ParamError, match="images/b is empty now"):
        manifest.run(rd, images)
    touch_images(images, ["b/1.png", "b/2.png", "b/3.png"])  # mounted again
    s = manifest.run(rd, images)
    assert (s.retired_now, s.added) == (3, 0)  # c/1.png and the two of d
    unmount(images / "a")
    s = manifest.run(rd, images, allow_empty=True)  # gone for good, as asked
    assert (s.retired_now, s.total) == (2, 3)


def test_the_listing_changes_when_an_extraction_records_unreadable_images(tmp_path):
    """The workflow reruns the manifest when listing.sha256 changes: an extraction that could
    not read some images changes it each time it records them, so each invocation tries
    them again; images that do not decode change nothing."""
    from featscope.pipelines.core.store import write_errors

    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    manifest.write_listing(rd, tmp_path / "images")
    assert not manifest.write_listing(rd, tmp_path / "images")  # nothing changed
    row = {"image_id": 0, "path": "a/1.png", "stage": "extract", "message": "x"}
    write_errors(rd.error_part("extract", 0), [row | {"error": "bad_image"}])
    assert not manifest.write_listing(rd, tmp_path / "images")
    assert manifest.run(rd, tmp_path / "images").invalidated_shards == []
    write_errors(rd.error_part("extract", 0), [row | {"error": "unreadable"}])
    assert manifest.write_listing(rd, tmp_path / "images")
    assert not manifest.write_listing(rd, tmp_path / "images")
    os.utime(rd.error_part("extract", 0), ns=(1, 1))  # recorded again by the next extraction
    assert manifest.write_listing(rd, tmp_path / "images")
    assert manifest.run(rd, tmp_path / "images").invalidated_shards == [0]
    assert not rd.error_part("extract", 0).exists()  # went with the shard's files
    assert manifest.write_listing(rd, tmp_path / "images")  # back to the folder alone


def test_num_shards_splits_evenly(tmp_path):
    touch_images(tmp_path / "images", [f"a/{i}.png" for i in range(10)])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", num_shards=3)
    shards = pq.read_table(rd.manifest)["shard"].to_pylist()
    assert sorted(set(shards)) == [0, 1, 2] and max(shards.count(s) for s in set(shards)) == 4


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FeatscopeError, match="does not exist"):
        manifest.run(RunDir(tmp_path / "r"), tmp_path / "nope")
    csv = tmp_path / "t.csv"
    csv.write_text("file\na.png\n")
    with pytest.raises(FeatscopeError, match="no 'path' column"):
        manifest.run(RunDir(tmp_path / "r"), csv)


def test_a_file_listed_twice_is_one_image_and_with_two_labels_an_error(tmp_path):
    touch_images(tmp_path / "images", ["1.png", "2.png"])
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimages/1.png,cat\n./images/1.png,cat\nimages/2.png,dog\n")
    rd = RunDir(tmp_path / "run")
    assert manifest.run(rd, listing).total == 2
    listing.write_text("path,label\nimages/1.png,cat\nimages/2.png,dog\nimages/1.png,dog\n")
    with pytest.raises(FeatscopeError, match=r"lists .*images/1.png twice, labelled 'cat' and 'dog'"):
        manifest.run(rd, listing)
    assert [r["label"] for r in manifest.read(rd).to_pylist()] == ["cat", "dog"]  # the manifest is as it was


def test_paths_are_stored_relative_so_a_moved_dataset_keeps_its_ids(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "b/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    assert sorted(pq.read_table(rd.manifest)["path"].to_pylist()) == ["a/1.png", "b/2.png"]
    before = {k: r["image_id"] for k, r in rows(rd).items()}
    shutil.move(tmp_path / "images", tmp_path / "moved" / "images")
    s = manifest.run(rd, tmp_path / "moved" / "images")
    assert s.added == 0 and s.removed == 0 and s.invalidated_shards == []
    after = manifest.read(rd).to_pylist()
    assert {r["path"].rsplit("/images/", 1)[1]: r["image_id"] for r in after} == before
    assert all(os.path.exists(r["path"]) and "/moved/" in r["path"] for r in after)  # read() gives usable paths


def test_an_edited_file_is_a_new_image_and_its_old_shard_keeps_its_files(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png", "b/3.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    rd.feature_part("pool", 0).parent.mkdir(parents=True)
    for s in (0, 1):  # what extract would have written
        rd.feature_part("pool", s).write_bytes(b"part")
    live_before = rd.live_ids.read_text()
    (tmp_path / "images/a/2.png").write_bytes(b"other bytes")
    s = manifest.run(rd, tmp_path / "images")
    got = manifest.read(rd, include_removed=True).to_pylist()
    old = next(r for r in got if r["image_id"] == 1)
    assert old["removed"] and old["replaced_by"] == 3
    new = next(r for r in got if r["image_id"] == 3)
    assert not new["removed"] and new["path"].endswith("a/2.png") and new["shard"] == 2
    assert s.edited == 1 and s.added == 0 and s.invalidated_shards == []  # no top-k candidates ran short
    assert rd.feature_part("pool", 0).exists() and rd.feature_part("pool", 1).exists()
    assert rd.live_ids.read_text().split() == ["0", "2", "3"] != live_before.split()


def test_a_touched_file_keeps_its_id_and_the_live_set_file_its_time(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    stamp = rd.live_ids.stat().st_mtime_ns
    path = tmp_path / "images/a/2.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    s = manifest.run(rd, tmp_path / "images")
    assert s.edited == 0 and s.removed == 0 and s.invalidated_shards == []
    assert rows(rd)["a/2.png"]["mtime_ns"] == path.stat().st_mtime_ns  # the fast check is up to date
    assert rd.live_ids.stat().st_mtime_ns == stamp


def write_candidates(rd, shard, channel, image_id, k, depth):
    """A shard's top-k candidates as extract writes them (values and cells do not matter here)."""
    n = len(channel)
    columns = {"channel": channel, "rank": np.zeros(n), "value": np.zeros(n), "image_id": image_id,
               "fy": np.zeros(n), "fx": np.zeros(n)}
    rd.topk_candidates_part("pool", shard).parent.mkdir(parents=True, exist_ok=True)
    write_topk(rd.topk_candidates_part("pool", shard), columns, RunIdentity("m", "w", "{}"), k=k, depth=depth)


def test_candidates_run_short_only_where_a_full_list_lost_too_many():
    channel = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # depth 4: units 0 and 1 full, unit 2 held every image
    image_id = np.array([1, 2, 3, 4, 1, 5, 6, 7, 1, 2])
    assert list(candidates_run_short(channel, image_id, np.array([1, 2]), k=2, depth=4)) == []
    assert list(candidates_run_short(channel, image_id, np.array([1, 2, 3]), k=2, depth=4)) == [0]
    assert list(candidates_run_short(channel, image_id, np.array([1, 5, 6]), k=2, depth=4)) == [1]


def test_a_removal_reextracts_a_shard_only_where_its_candidates_ran_short(tmp_path):
    touch_images(tmp_path / "images", [f"a/{i}.png" for i in range(8)])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=4)  # shard 0: ids 0-3, shard 1: ids 4-7
    write_candidates(rd, 0, np.array([0, 0]), np.array([0, 1]), k=1, depth=2)
    write_candidates(rd, 1, np.array([0, 0]), np.array([4, 5]), k=1, depth=2)
    for name in ("a/0.png", "a/4.png", "a/5.png"):  # shard 0 keeps id 1; shard 1 lost both candidates
        (tmp_path / "images" / name).unlink()
    s = manifest.run(rd, tmp_path / "images")
    assert s.invalidated_shards == [1] and manifest.shards(rd) == [0, 1]
    assert rd.topk_candidates_part("pool", 0).exists() and not rd.topk_candidates_part("pool", 1).exists()


def test_removals_invalidate_their_shards_and_a_vanished_shard_leaves_the_run(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png", "b/3.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    rd.topk_candidates_part("pool", 1).parent.mkdir(parents=True)
    rd.topk_candidates_part("pool", 1).write_bytes(b"candidates")
    (tmp_path / "images/b/3.png").unlink()
    s = manifest.run(rd, tmp_path / "images")
    assert s.retired_now == 1 and s.invalidated_shards == [1] and manifest.shards(rd) == [0]
    assert not rd.topk_candidates_part("pool", 1).exists()


def test_a_manifest_from_before_content_checks_is_migrated_without_renumbering(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    legacy = manifest.read(rd, include_removed=True).select(["image_id", "path", "label", "shard", "removed"])
    pq.write_table(legacy, rd.manifest)  # absolute paths, no sizes or hashes
    s = manifest.run(rd, tmp_path / "images")
    assert s.added == s.edited == s.removed == 0
    stored = pq.read_table(rd.manifest).to_pylist()
    assert [r["path"] for r in stored] == ["a/1.png", "a/2.png"] and all(r["sha256"] for r in stored)


def test_odd_folders_and_names_are_followed_skipped_or_reported_never_a_crash(tmp_path):
    images = tmp_path / "images"
    touch_images(images, ["cat/1.png"])
    touch_images(tmp_path / "elsewhere", ["2.png"])
    os.symlink(tmp_path / "elsewhere", images / "dog")  # a symlinked label folder: followed
    os.symlink(images, images / "cat" / "loop")  # a loop back up: each real folder read once
    rd = RunDir(images / "run")  # a run inside the image folder: never read as images
    manifest.run(rd, images)
    touch_images(images / "run" / "report" / "thumbs", ["0.jpg"])
    odd = os.fsencode(images / "cat") + b"/caf\xe9.png"  # a Latin-1 name, not UTF-8
    with open(odd, "wb") as f:
        f.write(b"x")
    locked = images / "locked"
    locked.mkdir()
    touch_images(locked, ["3.png"])
    locked.chmod(0)
    try:
        s = manifest.run(rd, images)
    finally:
        locked.chmod(0o755)
    root_reads_all = os.geteuid() == 0
    paths = sorted(r["path"] for r in pq.read_table(rd.manifest).to_pylist())
    assert paths == ["cat/1.png", "dog/2.png"] + (["locked/3.png"] if root_reads_all else [])
    reasons = sorted(reason for _, reason in s.skipped)
    expected = ["name is not UTF-8"] + ([] if root_reads_all else ["unreadable folder"])
    assert reasons == expected and "left out" in s.warning()
    assert read_errors(rd.errors_dir).num_rows == len(expected)


def edit_keeping_size_and_times(path, data):
    """Other bytes of the same length, with the access and modification times put back, as
    `exiftool -P`, `cp -p` or `touch -r` leave an edited file."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_edit_that_keeps_size_and_mtime_is_told_by_the_change_time(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    path = tmp_path / "images/a/2.png"
    listed = manifest.listing_fingerprint(tmp_path / "images")
    edit_keeping_size_and_times(path, b"y")
    assert manifest.listing_fingerprint(tmp_path / "images") != listed  # the workflow reruns the manifest
    assert manifest.listing_fingerprint(tmp_path / "images", "mtime") == manifest.listing_fingerprint(
        tmp_path / "images", "mtime")
    s = manifest.run(rd, tmp_path / "images")
    assert s.edited == 1 and s.reread == 0
    old, new = (r for r in manifest.read(rd, include_removed=True).to_pylist() if r["path"].endswith("a/2.png"))
    assert old["removed"] and old["replaced_by"] == new["image_id"] and new["ctime_ns"] == path.stat().st_ctime_ns


def test_check_mtime_trusts_size_and_mtime_and_check_content_reads_every_file(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png", "a/3.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", check="mtime")
    assert rd.read_config()["check"] == "mtime"
    edit_keeping_size_and_times(tmp_path / "images/a/2.png", b"y")
    s = manifest.run(rd, tmp_path / "images", check="mtime")  # what this check cannot see, it does not see
    assert s.edited == 0 and s.reread == 0
    s = manifest.run(rd, tmp_path / "images", check="content")
    assert s.edited == 1 and s.reread == 2 and "2 files read again, bytes unchanged" in s.line()
    assert len(manifest.read(rd)) == 3
    first, second = (manifest.listing_fingerprint(tmp_path / "images", "content") for _ in range(2))
    assert first != second  # the workflow reruns the manifest, which reads every file, every time
    with pytest.raises(FeatscopeError, match="check must be one of stat, mtime, content"):
        manifest.run(rd, tmp_path / "images", check="size")


def test_a_moved_change_time_costs_a_read_and_keeps_the_id(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    path = tmp_path / "images/a/1.png"
    ids = {r["path"]: r["image_id"] for r in manifest.read(rd).to_pylist()}
    stamp = rd.live_ids.stat().st_mtime_ns
    os.chmod(path, 0o600)  # moves the ctime only
    s = manifest.run(rd, tmp_path / "images")
    assert s.edited == s.added == s.removed == 0 and s.reread == 1
    assert {r["path"]: r["image_id"] for r in manifest.read(rd).to_pylist()} == ids
    assert rd.live_ids.stat().st_mtime_ns == stamp
    assert manifest.run(rd, tmp_path / "images").reread == 0  # the new ctime is kept


def test_a_manifest_from_before_change_times_is_read_verified_and_brought_up_to_date(tmp_path):
    from featscope.pipelines.app.verify import verify

    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    write_table(pq.read_table(rd.manifest).drop_columns(["ctime_ns"]), rd.manifest)  # as featscope wrote it
    assert not verify(rd).failed, verify(rd).line()
    edit_keeping_size_and_times(tmp_path / "images/a/2.png", b"y")  # before the upgrade, unseen then
    s = manifest.run(rd, tmp_path / "images")  # every file is read once
    assert s.edited == 1 and s.reread == 1
    assert pq.read_schema(rd.manifest).names == manifest.MANIFEST_SCHEMA.names
    assert all(r["ctime_ns"] for r in manifest.read(rd).to_pylist())


def test_two_files_of_one_size_and_mtime_swapped_are_both_new_images(tmp_path):
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "dog").mkdir()
    (images / "cat/1.bmp").write_bytes(b"cat picture")
    (images / "dog/1.bmp").write_bytes(b"dog picture")
    for path in (images / "cat/1.bmp", images / "dog/1.bmp"):
        os.utime(path, ns=(10**18, 10**18))  # as a dataset unpacked from one archive
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images)
    (images / "cat/1.bmp").rename(images / "swap")  # a label fix: each picture to the other's folder
    (images / "dog/1.bmp").rename(images / "cat/1.bmp")
    (images / "swap").rename(images / "dog/1.bmp")
    s = manifest.run(rd, images)
    assert s.edited == 2 and s.total == 2
    live = {r["path"].rsplit("/images/", 1)[1]: r["sha256"] for r in manifest.read(rd).to_pylist()}
    assert live == {name: file_digest(images / name) for name in ("cat/1.bmp", "dog/1.bmp")}


def test_a_label_fixed_in_the_list_keeps_the_id_and_reruns_only_what_shows_labels(tmp_path):
    from featscope.pipelines.app.status import status

    touch_images(tmp_path / "images", ["1.png", "2.png", "3.png"])
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimages/1.png,cat\nimages/2.png,dog\nimages/3.png,dog\n")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, listing)
    ids = {r["path"]: r["image_id"] for r in manifest.read(rd).to_pylist()}
    live = rd.live_ids.stat().st_mtime_ns
    fingerprint = rd.live_labels.read_text()
    listing.write_text("path,label\nimages/1.png,cat\nimages/2.png,cat\nimages/3.png,dog\n")  # 2 was no dog
    assert status(rd).pending == {"new": 0, "edited": 0, "vanished": 0, "relabelled": 1}
    s = manifest.run(rd, listing)
    assert (s.added, s.edited, s.relabelled) == (0, 0, 1) and "1 relabelled" in s.line()
    now = manifest.read(rd).to_pylist()
    assert {r["path"]: r["image_id"] for r in now} == ids
    assert [r["label"] for r in now] == ["cat", "cat", "dog"]
    assert rd.live_ids.stat().st_mtime_ns == live  # the live set is the same: extract and top-k have nothing to do
    assert rd.live_labels.read_text() != fingerprint  # what shows labels reruns
    assert rd.read_config()["last_update"]["relabelled"] == 1
    labels = rd.live_labels.stat().st_mtime_ns
    assert manifest.run(rd, listing).relabelled == 0 and rd.live_labels.stat().st_mtime_ns == labels


def test_a_run_with_features_refuses_a_manifest_made_anew(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    rd.feature_part("pool", 0).parent.mkdir(parents=True)
    rd.feature_part("pool", 0).write_bytes(b"part")  # what extract would have written
    rd.manifest.unlink()
    (tmp_path / "images/a/1.png").unlink()  # ids handed out now would name other images
    with pytest.raises(FeatscopeError, match=r"holds outputs of an earlier manifest \(features\) but no manifest"):
        manifest.run(rd, tmp_path / "images")
    assert not rd.manifest.exists()


def test_a_run_with_outputs_refuses_another_model_and_keeps_its_record(tmp_path):
    """`manifest --model` of another model (or weights) over a run that has outputs used to
    rewrite run.json's model silently: status then named the new model beside the old one's
    features, and extract failed on 'the weights changed'."""
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    manifest.run(rd, tmp_path / "images", model="mobilenet_v2", weights="imagenet")  # nothing made yet: a free choice
    assert (rd.read_config()["model"], rd.read_config()["weights"]) == ("mobilenet_v2", "imagenet")
    rd.feature_part("pool", 0).parent.mkdir(parents=True)
    rd.feature_part("pool", 0).write_bytes(b"part")  # what extract would have written
    touch_images(tmp_path / "images", ["a/3.png"])
    recorded, listed = rd.run_json.read_bytes(), rd.manifest.read_bytes()
    for model, weights in (("resnet18", None), (None, "random"), ("resnet18", "imagenet")):
        with pytest.raises(FeatscopeError, match=r"holds the outputs of mobilenet_v2 \(weights imagenet\), not "):
            manifest.run(rd, tmp_path / "images", model=model, weights=weights)
        assert rd.run_json.read_bytes() == recorded and rd.manifest.read_bytes() == listed  # nothing written
    assert manifest.run(rd, tmp_path / "images", model="mobilenet_v2").added == 1  # the same model goes on


@pytest.mark.parametrize("output", ID_KEYED)
def test_outputs_keyed_by_id_refuse_a_manifest_made_anew_even_without_run_json(tmp_path, output):
    """Saliency maps (or any output named by image ids) left after manifest.parquet, run.json
    and the features were deleted: a new manifest would start again at id 0, and the maps of
    the old images would pass for maps of the new ones, the index and the map as current."""
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    (rd.root / output / "0.npz").parent.mkdir(parents=True, exist_ok=True)
    (rd.root / output / "0.npz").write_bytes(b"an output of image 0")
    rd.manifest.unlink()
    rd.run_json.unlink()
    touch_images(tmp_path / "images", ["a/0.png"])  # would be image 0 now
    with pytest.raises(FeatscopeError, match=rf"earlier manifest \({output}\) but no manifest.parquet"):
        manifest.run(rd, tmp_path / "images")
    assert not rd.manifest.exists() and not rd.run_json.exists()  # nothing written
    shutil.rmtree(rd.root / output)  # deleted, as the message offers: a fresh start
    assert manifest.run(rd, tmp_path / "images").added == 3


def test_overlapping_updates_of_one_run_take_turns(tmp_path):
    import fcntl
    import threading

    touch_images(tmp_path / "images", ["a/1.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images")
    touch_images(tmp_path / "images", ["a/2.png"])
    done = threading.Event()
    with open(rd.root / ".manifest.lock", "a") as held:  # another update is under way
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (manifest.run(rd, tmp_path / "images"), done.set()))
        worker.start()
        assert not done.wait(0.5) and len(manifest.read(rd)) == 1  # waits, writing nothing
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(10)
    assert done.is_set() and len(manifest.read(rd)) == 2


def test_shard_digests_follow_the_images_not_the_file_order_and_carry_their_version(tmp_path):
    touch_images(tmp_path / "images", [f"a/{i}.png" for i in range(5)])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    digests = manifest.shard_digests(rd)
    assert sorted(digests) == [0, 1, 2] and manifest.shard_digests(rd, [1]) == {1: digests[1]}
    table = pq.read_table(rd.manifest)
    pq.write_table(table.take([4, 2, 0, 3, 1]), rd.manifest)  # the same rows in another order
    assert manifest.shard_digests(rd) == digests
    pq.write_table(table.set_column(1, "path", table["path"].take([1, 0, 2, 3, 4])), rd.manifest)
    changed = manifest.shard_digests(rd)
    assert changed[0] != digests[0] and (changed[1], changed[2]) == (digests[1], digests[2])
    assert manifest.made_for_other_images(digests[0], changed[0])
    assert not manifest.made_for_other_images(None, changed[0])  # a part from before digests
    assert not manifest.made_for_other_images("0:" + "f" * 64, changed[0])  # another recipe's digest


def test_a_manifest_restored_from_an_older_backup_never_hands_an_id_out_again(tmp_path):
    touch_images(tmp_path / "images", ["a/1.png", "a/2.png"])
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    backup = rd.manifest.read_bytes()
    touch_images(tmp_path / "images", ["a/3.png"])
    manifest.run(rd, tmp_path / "images")  # id 2, shard 1: its features, maps and thumbnails are made
    (tmp_path / "images/a/3.png").unlink()
    touch_images(tmp_path / "images", ["a/4.png"])
    rd.manifest.write_bytes(backup)  # the manifest of before a/3.png, restored
    manifest.run(rd, tmp_path / "images")
    new = rows(rd)["a/4.png"]
    assert (new["image_id"], new["shard"]) == (3, 2)  # not id 2 or shard 1 again, for another picture
    assert 2 not in manifest.read(rd, include_removed=True)["image_id"].to_pylist()
    rd.manifest.write_bytes(backup)  # restored once more: the next ids stay past every one used
    manifest.run(rd, tmp_path / "images")
    assert (rows(rd)["a/4.png"]["image_id"], rows(rd)["a/4.png"]["shard"]) == (4, 3)


def test_a_new_run_of_no_images_is_refused_unless_asked(tmp_path):
    """A new run over an empty folder (a mount point with nothing mounted, a typo'd subfolder)
    used to be made with 0 images: every later stage ran, finished and analysed nothing."""
    (tmp_path / "empty").mkdir()
    rd = RunDir(tmp_path / "run")
    with pytest.raises(ParamError, match=r"lists no image, and run .* is new.*Nothing was changed; to make it anyway"
                       ) as refused:
        manifest.run(rd, tmp_path / "empty")
    assert refused.value.param == "allow_empty" and not rd.manifest.exists() and not rd.run_json.exists()
    assert manifest.run(rd, tmp_path / "empty", allow_empty=True).total == 0  # as asked: it fills later
    from featscope.pipelines.stages import embed

    with pytest.raises(FeatscopeError, match="no images yet: its image source listed none"):  # not "extract first"
        embed.embed(rd, "pool")
    touch_images(tmp_path / "empty", ["a/1.png"])
    assert manifest.run(rd, tmp_path / "empty").total == 1
