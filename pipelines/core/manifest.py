"""Stage `manifest`: list a dataset's images with stable ids, assigned to shards.

Sources: an image folder (one subfolder per label, or flat), a text file of paths, or a
Parquet/CSV table with a `path` (and optional `label`) column. Datasets change between
scheduled runs, and the manifest follows them:

- Paths are stored relative to the source (the folder, or the list's folder), so a moved or
  re-mounted dataset keeps its ids: give `manifest` the new location.
- An image's identity is its path *and* its content: size, modification time and change
  time are the fast check, a sha256 of the bytes confirms. A file whose bytes changed is a
  new image: it gets a new id (in a new shard) and the old id is retired (`removed`,
  `replaced_by` the new id). A file only touched keeps its id. The change time (ctime) is
  there because tools can put the modification time back after an edit (`exiftool -P`,
  `cp -p`, `touch -r`), and an edit that keeps the size too would pass as unchanged; no
  tool can set the ctime. `check` chooses: `stat` (all three, the default), `mtime` (size
  and mtime, for filesystems whose ctime moves on its own, e.g. under backup tools that put
  access times back: each such move costs a re-read, never a wrong answer), or `content`
  (every file read and hashed, every time).
- New paths get new ids in new shards; vanished ones are retired, never renumbered. Images
  under a folder, link or file the listing cannot read now are kept as they are (unknown is
  not gone), and an update that would retire a whole folder's images while the folder is
  there, empty and untouched since the last update (a mount point whose file system is not
  mounted; deleting files touches their folder), or every image, is refused unless asked
  for (`allow_empty`).
- A label is not part of the identity: a list or table that gives a listed file another
  label (a label fixed) changes that row's label and keeps its id. `manifest-labels.sha256`,
  a digest of the live images' labels, is rewritten then, and only then, so the rules whose
  outputs show or use labels rerun (as `manifest-live.txt` makes the whole-dataset rules
  rerun when the set of live images changes).
- A shard that lost images keeps its extracted files (every stage reads them without retired
  images) unless a unit's top-k candidates ran short there (shards keep 2k a unit): then its
  files are deleted (`RunDir.shard_files`) and extract redoes it, so a unit's top-k never
  needs a candidate the shard did not keep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core.atomic import file_digest, holding, rewrite_if_changed
from featscope.pipelines.core.images import is_image_name
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import candidates_run_short, file_metadata, write_errors, write_table
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.version import FEATSCOPE_VERSION

DEFAULT_SHARD_SIZE = 1000

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("path", pa.string(), nullable=False),  # relative to the source's root (absolute if outside it)
    pa.field("label", pa.string()),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("removed", pa.bool_(), nullable=False),
    pa.field("size", pa.int64()),  # bytes, and ...
    pa.field("mtime_ns", pa.int64()),  # ... modification time: the fast check for an edit
    pa.field("sha256", pa.string()),  # of the file's bytes: the confirmation
    pa.field("replaced_by", pa.int64()),  # for an image retired because its file changed: the new id
    pa.field("ctime_ns", pa.int64()),  # change time, which no tool can set: the fast check with size and mtime
])
# A manifest written before `ctime_ns` was kept: read as it is (its files are read and hashed
# once, on its next update), and whole to `featscope verify`.
MANIFEST_SCHEMA_BEFORE_CTIME = MANIFEST_SCHEMA.remove(MANIFEST_SCHEMA.get_field_index("ctime_ns"))
CHECKS = ("stat", "mtime", "content")  # how an update tells a file's edit (see the module's docstring)
# Why a path was left out of a listing while the images under it may still be there: the run's
# images under such a path are kept as they are, neither retired nor refreshed.
UNREADABLE_FOLDER, BROKEN_LINK, UNREADABLE_FILE = "unreadable folder", "broken link", "unreadable file"
UNAVAILABLE = (UNREADABLE_FOLDER, BROKEN_LINK, UNREADABLE_FILE)


@dataclass
class ManifestSummary:
    total: int
    added: int
    removed: int
    shards: int
    new_shards: list[int]
    seconds: float
    edited: int = 0
    retired_now: int = 0
    reread: int = 0  # files read and hashed again whose bytes had not changed
    relabelled: int = 0  # images whose label the source changed (ids kept)
    invalidated_shards: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable: int = 0  # live images an extraction could not read, whose shards are extracted again
    unavailable: int = 0  # live images under a folder, link or file the listing could not read: kept

    def warning(self) -> str:
        if not self.skipped:
            return ""
        path, reason = self.skipped[0]
        return (f"{plural(len(self.skipped), 'file or folder', 'files or folders')} left out (first: {path}: "
                f"{reason}); see errors.parquet/manifest-00000.parquet")

    def line(self) -> str:
        text = (f"manifest: {plural(self.total, 'image')} in {plural(self.shards, 'shard')}; {self.added} new "
                f"(shards {_ranges(self.new_shards) or 'none'}), {self.edited} edited, {self.retired_now} retired "
                f"now ({self.removed} in all)")
        if self.relabelled:
            text += f"; {self.relabelled} relabelled"
        if self.reread:
            text += f"; {plural(self.reread, 'file')} read again, bytes unchanged"
        if self.unavailable:
            text += f"; {plural(self.unavailable, 'image')} kept as they were (a folder or file not readable now)"
        if self.invalidated_shards:
            text += f"; shards {','.join(map(str, self.invalidated_shards))} to extract again"
            if self.unreadable:
                text += f" ({plural(self.unreadable, 'image')} unreadable when last extracted)"
        return text + f"; {self.seconds:.1f}s"


def _ranges(shards: list[int]) -> str:
    return f"{shards[0]}-{shards[-1]}" if len(shards) > 1 else ",".join(map(str, shards))


def source_root(source: str | Path) -> Path:
    """The folder that manifest paths are relative to: the image folder, or a list's folder."""
    source = Path(source).resolve()
    return source if source.is_dir() else source.parent


def relative_key(path: str, root: Path) -> str:
    """A path as the manifest stores it: relative to root (posix) when inside it."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _walk(source: Path, skipped: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Images under a folder, label = the folder relative to it. Symlinked folders are
    followed (each real folder once, in sorted order: no loops); featscope runs inside it (a
    folder with a run.json) are never read as images; unreadable folders, links to nothing (a
    folder linked to a share that is not mounted) and names that are not UTF-8 are left out
    and listed in `skipped` as (path, reason). Entries are told apart by the folder listing's
    file types, so a plain file costs no stat here (`compare` stats each image once)."""
    items, seen = [], set()
    stack = [str(source)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue  # a loop through a symlink, or a folder linked twice: read once
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            skipped.append((folder, UNREADABLE_FOLDER))
            continue
        if folder != str(source) and any(e.name == "run.json" and not e.is_dir() for e in entries):
            continue  # a featscope run: not images
        seen.add(real)
        parent = Path(folder).relative_to(source).as_posix()
        folders = []
        for entry in entries:
            path = entry.path
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append((path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                                "name is not UTF-8"))
                continue
            try:
                if entry.is_dir():  # (a link to a folder too)
                    folders.append(path)
                elif entry.is_file():
                    if is_image_name(entry.name):
                        items.append((path, None if parent == "." else parent))
                elif entry.is_symlink():  # to nothing: perhaps a label folder on a share that is away
                    skipped.append((path, BROKEN_LINK))
            except OSError as e:  # there, but not readable now (a share's I/O error)
                skipped.append((path, f"{UNREADABLE_FILE} ({e.strerror or e})"))
        stack.extend(sorted(folders, reverse=True))  # depth first, in name order (`scan` sorts the images)
    return items


def scan(source: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, str | None]]:
    """(absolute path, label or None) of every image a source names, sorted by path; files
    left out for a reason are added to `skipped`."""
    source = Path(source)
    skipped = [] if skipped is None else skipped
    if source.is_dir():
        items = _walk(source.resolve(), skipped)
    elif source.is_file() and source.suffix.lower() in (".parquet", ".csv"):
        table = pq.read_table(source) if source.suffix.lower() == ".parquet" else pacsv.read_csv(source)
        if "path" not in table.column_names:
            raise FeatscopeError(f"{source} has no 'path' column (columns: {', '.join(table.column_names)})")
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        items = [(_resolve(p, source.parent), None if lab is None else str(lab)) for p, lab in zip(paths, labels)]
    elif source.is_file():
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            raise FeatscopeError(f"{source} is not an image folder, a text list of paths, or a table (.parquet or "
                                 f".csv): it is not text")
        lines = [ln.strip() for ln in text.splitlines()]
        items = [(_resolve(ln, source.parent), None) for ln in lines if ln and not ln.startswith("#")]
    else:
        raise FeatscopeError(f"image source {source} does not exist")
    unique: dict[str, str | None] = {}
    for path, label in items:  # a file listed twice is one image; with two labels, the list is wrong
        if unique.setdefault(path, label) != label:
            raise FeatscopeError(f"{source} lists {path} twice, labelled '{unique[path]}' and '{label}' "
                                 "(an image has one label)")
    return sorted(unique.items())


def _check(check: str) -> str:
    if check not in CHECKS:
        raise ParamError("check", f"must be one of {', '.join(CHECKS)}, got '{check}'")
    return check


def _stamp(size: int | None, mtime_ns: int | None, ctime_ns: int | None, check: str) -> tuple:
    """What the fast check compares of a file's stat (see the module's docstring)."""
    return (size, mtime_ns) if check == "mtime" else (size, mtime_ns, ctime_ns)


def _unchanged(row: dict, st: os.stat_result, check: str) -> bool:
    """Whether a stored file passes the fast check, unread (never under `content`)."""
    return check != "content" and (_stamp(row["size"], row["mtime_ns"], row["ctime_ns"], check)
                                   == _stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, check))


def listing_fingerprint(source: str | Path, check: str = "stat") -> str:
    """sha256 of the images a source names with their stats as `check` compares them.

    It changes when images are added, removed or replaced, which is what tells a scheduler
    that the manifest must be brought up to date. Under `content` it changes every time: only
    reading every file can tell, and that is the manifest's work.
    """
    digest = hashlib.sha256()
    if _check(check) == "content":
        digest.update(f"content check at {time.time_ns()}\n".encode())
    for path, label in scan(source):
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{label}\0{_stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, check)}\n".encode())
        except OSError:
            digest.update(f"{path}\0{label}\0missing\n".encode())
    return digest.hexdigest()


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str((p if p.is_absolute() else base / p).resolve())


@dataclass
class Comparison:
    """The image source against the stored manifest: what an update would change."""

    root: Path
    old: list[dict]  # the stored rows
    rows: list[dict]  # the same rows brought up to date (retired ones marked, stats refreshed)
    new: list[tuple[str, str | None, os.stat_result, str]]  # (path key, label, stat, sha256) to add
    edited: int  # of `new`, paths whose bytes changed
    retired: list[dict]  # rows retired now (vanished or edited)
    reread: int = 0  # stored files read and hashed again, whose bytes had not changed
    relabelled: int = 0  # live rows whose label the source changed (ids kept)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out of the listing
    unavailable: int = 0  # live images under a skipped folder, link or file: kept as they are

    @property
    def changed(self) -> bool:
        return bool(self.new or self.retired or self.relabelled)


def compare(rd: RunDir, images: str | Path, *, check: str = "stat", progress: bool = False) -> Comparison:
    """Compare the source with the manifest, writing nothing (files that fail the fast
    `check` are hashed to tell an edit from a touch; under `content` every file is; `progress`:
    a bar over the files, which a first listing of millions of images, every one of them read
    and hashed, needs)."""
    _check(check)
    skipped: list[tuple[str, str]] = []
    found = scan(images, skipped)
    root = source_root(images)
    old = read_rows(rd, root)
    rows = [dict(r) for r in old]
    live = {r["path"]: r for r in rows if not r["removed"]}
    present = set()
    new, edited, reread, relabelled = [], 0, 0, 0
    for path, label in tqdm(found, desc="manifest", unit="file", disable=not progress, mininterval=1.0):
        key = relative_key(path, root)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not Path(images).is_dir():  # a list names it: say so (a folder's file vanished while listing)
                skipped.append((path, "listed, but no such file"))
            continue  # retired below
        except OSError as e:  # there, but not readable now (permissions, a share's I/O error)
            skipped.append((path, f"{UNREADABLE_FILE} ({e.strerror or e})"))
            continue
        present.add(key)
        row = live.get(key)
        if row is None:
            new.append((key, label, st, file_digest(path)))
            continue
        if not _unchanged(row, st, check):
            digest = file_digest(path)
            if row["sha256"] not in (None, digest):  # the same path with other bytes: a new image
                new.append((key, label, st, digest))
                row["replaced_by"] = -1  # the old id is retired; filled in with the new id by `run`
                edited += 1
                continue
            # touched, or a manifest from before content checks
            row.update(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, sha256=digest)
            reread += 1
        if row["label"] != label:  # the same image, given another label by the source
            row["label"] = label
            relabelled += 1
    unavailable = _under_unavailable(live, root, skipped)
    present |= unavailable  # not listed, but maybe there: kept as they are
    retired = [r for r in rows if not r["removed"] and (r["path"] not in present or r["replaced_by"] == -1)]
    for r in retired:
        r["removed"] = True
    return Comparison(root, old, rows, new, edited, retired, reread=reread, relabelled=relabelled, skipped=skipped,
                      unavailable=len(unavailable))


def looks_unmounted(rd: RunDir, images: str | Path, found: Comparison) -> str | None:
    """Why the images an update would retire look unmounted rather than gone, or None: the
    source lists no image for a new run, or none while the run has some, or a folder of the run's images is there,
    empty and untouched since the last update (`_emptied_folders`). An update refuses to
    retire them unless asked (`allow_empty`), and status says so."""
    if not found.old and not found.new:
        unread = f" ({plural(len(found.skipped), 'file')} it could not read)" if found.skipped else ""
        return (f"{images} lists no image{unread}, and run {rd.root} is new: a run of no images analyses nothing, "
                "and a folder whose file system is not mounted looks empty")
    live_before = sum(not r["removed"] for r in found.old)
    if live_before and not found.new and len(found.retired) == live_before:
        return (f"{images} lists no image now, but run {rd.root} has {live_before}: a folder whose file system is "
                "not mounted looks empty")
    if found.old and (emptied := _emptied_folders(found, rd.manifest.stat().st_mtime_ns)):
        (folder, count), *more = sorted(emptied.items(), key=lambda item: (-item[1], item[0]))
        others = f" (and {plural(len(more), 'other folder')}: {', '.join(f for f, _ in more[:3])}" \
                 f"{', ...' if len(more) > 3 else ''})" if more else ""
        return (f"{found.root / folder} is empty now, but run {rd.root} has {plural(count, 'image')} from it{others}: "
                "a folder whose file system is not mounted looks empty")
    return None


def _emptied_folders(found: Comparison, listed_ns: int) -> dict[str, int]:
    """{folder: live images} of the folders that held live images of the run and are there
    now with nothing in them, unchanged since the manifest was last written (`listed_ns`):
    the mount point of a file system that is not mounted looks so. Deleting a folder's files
    changes its modification time, so a folder emptied by hand since is an ordinary removal,
    as is a folder deleted."""
    still = {os.path.dirname(r["path"]) for r in found.rows if not r["removed"]}
    still |= {os.path.dirname(key) for key, *_ in found.new}
    held: dict[str, int] = {}
    for r in found.retired:
        if r["replaced_by"] != -1:  # gone, not edited
            folder = os.path.dirname(r["path"])
            held[folder] = held.get(folder, 0) + 1
    return {folder: n for folder, n in held.items()
            if folder not in still and _empty_and_untouched(found.root / folder, listed_ns)}


def _empty_and_untouched(path: Path, since_ns: int) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None and path.stat().st_mtime_ns < since_ns
    except OSError:  # gone, not a folder, or unreadable (then its images were kept, see compare)
        return False


def _under_unavailable(live: dict[str, dict], root: Path, skipped: list[tuple[str, str]]) -> set[str]:
    """The live paths at or under a path the listing could not read (a folder it could not
    open, a link to nothing, a file it could not stat): unknown, not gone. Retiring them would
    delete their features, and when the share came back every one would get a new id."""
    places = {path for path, reason in skipped if reason.startswith(UNAVAILABLE)}
    if not places:
        return set()
    prefixes = tuple(os.path.join(place, "") for place in places)
    absolute = {key: key if os.path.isabs(key) else str(root / key) for key in live}
    return {key for key, path in absolute.items() if path in places or path.startswith(prefixes)}


@contextmanager
def updating(rd: RunDir) -> Iterator[None]:
    """Held while the manifest is read, compared and written: two overlapping updates of one
    run (two workflows started from different folders, a requeued job beside its first copy)
    take turns, so the second reads what the first wrote instead of overwriting it with a
    listing of its own, which would hand the first one's new ids out again, to other images."""
    with holding(rd.root / ".manifest.lock"):
        yield


def run(rd: RunDir, images: str | Path, *, num_shards: int | None = None, shard_size: int | None = None,
        model: str | None = None, weights: str | None = None, check: str = "stat", allow_empty: bool = False,
        progress: bool = False) -> ManifestSummary:
    """Create or update `manifest.parquet` and `run.json` for the images in `images`; `check`:
    how a stored file's edit is told (stat | mtime | content, see the module's docstring);
    `allow_empty`: retire the run's images when `images` lists none, or those of a folder that
    is empty now, or make a new run of no images (otherwise refused: a folder whose file system is not mounted looks empty).
    One update of a run at a time (`updating`)."""
    with updating(rd):
        return _update(rd, images, num_shards=num_shards, shard_size=shard_size, model=model, weights=weights,
                       check=check, allow_empty=allow_empty, progress=progress)


def _update(rd: RunDir, images: str | Path, *, num_shards: int | None, shard_size: int | None,
            model: str | None, weights: str | None, check: str, allow_empty: bool, progress: bool
            ) -> ManifestSummary:
    start = time.perf_counter()
    if num_shards is not None and shard_size is not None:
        raise ParamError("num_shards", "cannot be given with <shard_size>")
    if (num_shards is not None and num_shards < 1) or (shard_size is not None and shard_size < 1):
        raise ParamError("num_shards", "and <shard_size> must be at least 1")
    config = rd.read_config() if rd.run_json.exists() else {}
    if not rd.manifest.exists() and ((kept := rd.id_keyed_outputs()) or "weights_sha256" in config):
        what = ", ".join(kept) or "run.json records an extraction"
        raise FeatscopeError(f"run {rd.root} holds outputs of an earlier manifest ({what}) but no manifest.parquet: "
                             "they are keyed by image ids that a new manifest would hand out anew, to other images; "
                             "restore manifest.parquet, delete those outputs, or use another run directory")
    _refuse_another_model(rd, config, model, weights)
    found = compare(rd, images, check=check, progress=progress)
    root, old, rows, new, edited, retired = (found.root, found.old, found.rows, found.new, found.edited,
                                             found.retired)
    if not allow_empty and (why := looks_unmounted(rd, images, found)):
        remedy = ("to make it anyway, to fill as images arrive, use <allow_empty>" if not old else
                  "if they are gone for good, retire them with <allow_empty>")
        raise ParamError("allow_empty", f"{why}. Nothing was changed; {remedy}")
    if shard_size is None:
        if num_shards is not None:
            shard_size = max(1, math.ceil(len(new) / num_shards))
        else:
            shard_size = config.get("shard_size", DEFAULT_SHARD_SIZE)
    # past every id and shard handed out before, by this manifest or by a later one that a
    # manifest restored from a backup has forgotten (run.json remembers): an id is never reused
    next_id = max(max((r["image_id"] for r in old), default=-1) + 1, config.get("next_id", 0))
    next_shard = max(max((r["shard"] for r in old), default=-1) + 1, config.get("next_shard", 0))
    successor = {}
    for offset, (key, label, st, digest) in enumerate(new):
        successor[key] = next_id + offset
        rows.append({"image_id": next_id + offset, "path": key, "label": label,
                     "shard": next_shard + offset // shard_size, "removed": False, "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": digest,
                     "replaced_by": None})
    for r in retired:
        if r["replaced_by"] == -1:
            r["replaced_by"] = successor[r["path"]]
    if rows != old or not rd.manifest.exists():  # an unchanged dataset leaves the file untouched
        write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), rd.manifest,
                    {"featscope_version": FEATSCOPE_VERSION})
    error_part = rd.error_part("manifest", 0)
    if found.skipped:
        write_errors(error_part, [{"image_id": None, "path": p, "stage": "manifest", "error": "skipped",
                                   "message": reason} for p, reason in found.skipped])
    else:
        error_part.unlink(missing_ok=True)
    shard_of_live = {r["image_id"]: r["shard"] for r in rows if not r["removed"]}
    unreadable = [i for ids in unreadable_at_extraction(rd).values() for i in ids if i in shard_of_live]
    invalidated = sorted({*shards_to_redo(rd, retired, rows), *(shard_of_live[i] for i in unreadable)})
    for shard in invalidated:
        for path in rd.shard_files(shard):
            path.unlink(missing_ok=True)
    write_live_ids(rd, [r["image_id"] for r in rows if not r["removed"]])
    write_live_labels(rd, [(r["image_id"], r["label"]) for r in rows if not r["removed"]])
    write_live_script(rd, sum(not r["removed"] for r in rows))
    ours = {"name": rd.name, "images": str(Path(images).resolve()), "images_root": str(root),
            "shard_size": shard_size, "check": check, "featscope_version": FEATSCOPE_VERSION,
            "next_id": next_id + len(new), "next_shard": max([next_shard, *(r["shard"] + 1 for r in rows)])}
    ours |= {key: value for key, value in (("model", model), ("weights", weights)) if value is not None}
    if found.changed or not old:  # what the last real update did, for the run's history
        ours["last_update"] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "added": len(new) - edited,
                               "edited": edited, "retired": len(retired) - edited, "relabelled": found.relabelled}
    with rd.editing_config() as config:  # what an extract job recorded meanwhile (the model, the precision) stays
        config.update(ours)
    new_shards = sorted({r["shard"] for r in rows[len(old):]})
    return ManifestSummary(
        total=sum(not r["removed"] for r in rows), added=len(new) - edited, removed=sum(r["removed"] for r in rows),
        shards=len({r["shard"] for r in rows if not r["removed"]}), new_shards=new_shards,
        seconds=time.perf_counter() - start, edited=edited, retired_now=len(retired) - edited,
        invalidated_shards=invalidated, skipped=found.skipped, reread=found.reread, relabelled=found.relabelled,
        unreadable=len(unreadable), unavailable=found.unavailable,
    )


def _refuse_another_model(rd: RunDir, config: dict, model: str | None, weights: str | None) -> None:
    """A one-line error, before anything is written, when a run that has outputs is asked to
    record another model or weights: its features, maps and indexes are the recorded model's,
    and run.json naming another would misname all of them."""
    asked = {key: value for key, value in (("model", model), ("weights", weights)) if value is not None}
    differs = {key: value for key, value in asked.items() if config.get(key) not in (None, value)}
    if differs and ("weights_sha256" in config or rd.id_keyed_outputs()):
        recorded = f"{config.get('model')} (weights {config.get('weights')})"
        wanted = f"{asked.get('model', config.get('model'))} (weights {asked.get('weights', config.get('weights'))})"
        raise FeatscopeError(f"run {rd.root} holds the outputs of {recorded}, not {wanted}: a run holds one model's "
                             "outputs; give the new model a run directory of its own")


def unreadable_at_extraction(rd: RunDir) -> dict[Path, list[int]]:
    """Extract error part -> the ids it records as unreadable: listed images whose bytes the
    extraction could not read (gone for a while, an I/O error). Their shards are extracted
    again by the next manifest update while they are live, rather than left without them."""
    return extraction_errors(rd, "unreadable")


def _extract_error_tables(rd: RunDir, columns: tuple[str, ...] = ("image_id", "error")
                          ) -> Iterator[tuple[Path, pa.Table]]:
    """(part, its `columns`) for each extract error part that can be read (one damaged part
    hides only its own rows)."""
    for part in sorted(rd.errors_dir.glob("extract-*.parquet")) if rd.errors_dir.is_dir() else []:
        try:
            yield part, pq.read_table(part, columns=list(columns))
        except (OSError, pa.ArrowException):
            continue  # damaged: `featscope verify` names it


def extraction_failures(rd: RunDir) -> dict[int, str]:
    """image_id -> why extract could not give it features (its errors.parquet message)."""
    return {int(i): m for _, table in _extract_error_tables(rd, ("image_id", "message"))
            for i, m in zip(table["image_id"].to_pylist(), table["message"].to_pylist()) if i is not None}


def extraction_errors(rd: RunDir, kind: str) -> dict[Path, list[int]]:
    """Extract error part -> the ids it records with error `kind`."""
    found = {}
    for part, table in _extract_error_tables(rd):
        ids = table.filter(pc.equal(table["error"], kind))["image_id"].to_pylist()
        if ids:
            found[part] = [i for i in ids if i is not None]
    return found


def extraction_error_kinds(rd: RunDir) -> dict[str, np.ndarray]:
    """Error kind (unreadable, bad_image, non_finite, out_of_range) -> the ids extraction recorded with it:
    images it could not give features."""
    found: dict[str, list[int]] = {}
    for _, table in _extract_error_tables(rd):
        for image_id, kind in zip(table["image_id"].to_pylist(), table["error"].to_pylist()):
            if image_id is not None:
                found.setdefault(kind, []).append(image_id)
    return {kind: np.unique(np.asarray(ids, dtype=np.int64)) for kind, ids in found.items()}


def featureless(rd: RunDir, kinds: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The ids extraction recorded as errors (`kinds`: `extraction_error_kinds`, if read
    already): no index or map can hold them until they are extracted (an unreadable one is
    tried again by the next manifest update)."""
    kinds = extraction_error_kinds(rd) if kinds is None else kinds
    return np.unique(np.concatenate([np.zeros(0, np.int64), *kinds.values()]))


def shards_to_redo(rd: RunDir, retired: list[dict], rows: list[dict]) -> list[int]:
    """Shards whose extracted files must go now that `retired` images left them: those with no
    live image left, and those where some unit's top-k candidates ran short (see
    `candidates_run_short`). The others keep their files; every stage reads them without the
    retired images, so a removal costs no re-extraction."""
    by_shard: dict[int, list[int]] = {}
    for r in retired:
        by_shard.setdefault(r["shard"], []).append(r["image_id"])
    live_shards = {r["shard"] for r in rows if not r["removed"]}
    ever_retired = np.asarray([r["image_id"] for r in rows if r["removed"]], dtype=np.int64)
    return [shard for shard, ids in sorted(by_shard.items())
            if shard not in live_shards
            or _candidates_short(rd, shard, np.asarray(ids, dtype=np.int64), ever_retired)]


def _candidates_short(rd: RunDir, shard: int, gone: np.ndarray, ever_retired: np.ndarray) -> bool:
    """True if, without the images `gone`, some layer's candidates of `shard` run short, or
    its sketches count too many retired images (or cannot be read: extracting again is the
    safe answer)."""
    for layer in rd.topk_candidate_layers():
        part = rd.topk_candidates_part(layer, shard)
        if not part.exists():
            continue
        try:
            meta = file_metadata(part)
            table = pq.read_table(part, columns=["channel", "image_id"])
        except (FeatscopeError, OSError, pa.ArrowException):
            return True
        k = int(meta.get("k", 0))
        if len(candidates_run_short(table["channel"].to_numpy(), table["image_id"].to_numpy(), gone, k,
                                    int(meta.get("depth", k)))):
            return True
        if _sketch_too_stale(rd.topk_sketch_part(layer, shard), ever_retired):
            return True
    return False


SKETCH_RETIRED_SHARE = 0.05  # a shard's sketch may count at most this share of retired images


def _sketch_too_stale(path: Path, retired: np.ndarray) -> bool:
    """True if the shard's activation histograms would count more than SKETCH_RETIRED_SHARE
    of images now retired (their values cannot be taken out; `topk merge` bounds the
    thresholds they blur, and this keeps those bounds narrow)."""
    if not path.exists():
        return False
    try:
        counted = np.asarray(json.loads(file_metadata(path)["image_ids"]), dtype=np.int64)
    except (FeatscopeError, KeyError, ValueError):
        return True
    return len(counted) > 0 and np.isin(counted, retired).sum() > SKETCH_RETIRED_SHARE * len(counted)


def read_rows(rd: RunDir, root: Path) -> list[dict]:
    """The stored manifest as rows with every column (older manifests: new columns None,
    absolute paths inside `root` made relative)."""
    if not rd.manifest.exists():
        return []
    table = pq.read_table(rd.manifest)
    rows = table.to_pylist()
    for r in rows:
        for name in MANIFEST_SCHEMA.names:
            r.setdefault(name, None)
        if os.path.isabs(r["path"]):
            r["path"] = relative_key(r["path"], root)
    return rows


def write_live_ids(rd: RunDir, ids: list[int]) -> None:
    """manifest-live.txt: rewritten only when the set of live ids changes (see RunDir.live_ids)."""
    rewrite_if_changed(rd.live_ids, "".join(f"{i}\n" for i in sorted(ids)).encode())


def write_live_labels(rd: RunDir, labels: list[tuple[int, str | None]]) -> None:
    """manifest-labels.sha256: a digest of the live images' labels, rewritten only when it
    changes (see RunDir.live_labels)."""
    digest = hashlib.sha256()
    for image_id, label in sorted(labels, key=lambda pair: pair[0]):
        digest.update(f"{image_id}\0{'' if label is None else label}\0{label is None}\n".encode())
    rewrite_if_changed(rd.live_labels, (digest.hexdigest() + "\n").encode())


def write_live_script(rd: RunDir, images: int) -> None:
    """manifest-live.js (see RunDir.live_script), rewritten only when the stamp changes."""
    body = json.dumps({"stamp": rd.live_stamp(), "images": images})
    rewrite_if_changed(rd.live_script, f"window.FS_LIVE = {body};\n".encode())


def write_listing(rd: RunDir, source: str | Path, check: str = "stat") -> bool:
    """listing.sha256 from the source's current listing; rewritten (True) only when it changed.
    An extraction that could not read some images changes it too (each time it records
    them), so the workflow's next invocation updates the manifest, which tries them again."""
    retry = [f"{part.name} {part.stat().st_mtime_ns}" for part in unreadable_at_extraction(rd)]
    return rewrite_if_changed(rd.listing, "\n".join([listing_fingerprint(source, check), *retry, ""]).encode())


def read(rd: RunDir, shard: int | None = None, *, include_removed: bool = False) -> pa.Table:
    """The manifest (optionally one shard), without removed images unless asked; `path`
    is absolute (stored paths are relative to the run's image source)."""
    if not rd.manifest.exists():
        raise FeatscopeError(f"no manifest in {rd.root}: run `featscope manifest --images DIR --run {rd.root}` first")
    table = pq.read_table(rd.manifest)
    mask = None
    if shard is not None:
        mask = pc.equal(table["shard"], shard)
    if not include_removed:
        keep = pc.invert(table["removed"])
        mask = keep if mask is None else pc.and_(mask, keep)
    table = table if mask is None else table.filter(mask)
    return _absolute_paths(rd, table)


def _absolute_paths(rd: RunDir, table: pa.Table) -> pa.Table:
    paths = table["path"]
    relative = pc.invert(pc.starts_with(paths, "/"))
    if not pc.any(relative).as_py():
        return table
    config = rd.read_config()
    if "images_root" not in config and "images" not in config:
        return table
    root = config.get("images_root") or str(source_root(config["images"]))
    joined = pc.binary_join_element_wise(pa.scalar(root), paths, "/")
    return table.set_column(table.schema.get_field_index("path"), "path", pc.if_else(relative, joined, paths))


def feature_parts(rd: RunDir, layer: str) -> list[Path]:
    """The feature parts of every shard with live images, in shard order; refused in one line
    if any is missing, so no stage silently describes part of the dataset (a half-extracted
    run, or shards whose images changed since)."""
    wanted = shards(rd)
    parts = [rd.feature_part(layer, s) for s in wanted]
    missing = [s for s, p in zip(wanted, parts) if not p.exists()]
    if len(missing) == len(wanted):
        raise FeatscopeError(f"no features for layer '{layer}' in {rd.root}: run "
                             f"`featscope extract --run {rd.root} --layers {layer}` first")
    digests = shard_digests(rd)
    other = [s for s, p in zip(wanted, parts) if p.exists() and made_for_other_images(file_metadata(p).get("images"),
                                                                                           digests[s])]
    if other:
        raise FeatscopeError(f"layer '{layer}': the features of {plural(len(other), 'shard')} "
                             f"({', '.join(map(str, other[:5]))}{', ...' if len(other) > 5 else ''}) were extracted "
                             "for other images than the manifest now gives those shards (was it made again, or "
                             f"overwritten by another update?): run `featscope extract --run {rd.root} --layers "
                             f"{layer}`, which extracts them again")
    if missing:
        raise FeatscopeError(f"layer '{layer}' is not extracted for {plural(len(missing), 'shard')} of {len(wanted)} "
                             f"({_ranges(missing) if len(missing) < 3 else ', '.join(map(str, missing[:5]))}"
                             f"{', ...' if len(missing) > 5 else ''}): run `featscope extract --run {rd.root} "
                             f"--layers {layer}` first")
    return parts


SHARD_DIGEST = "1"  # the version of shard_digests' recipe, the prefix of each digest


def shard_digests(rd: RunDir, only: list[int] | None = None) -> dict[int, str]:
    """shard -> a digest of the images it holds (ids, stored paths and sha256s, retired ones
    included). It stays the same for the life of a manifest, and differs where ids were handed
    out anew: a manifest deleted and made again over a changed folder, or overwritten by a
    concurrent update from an older listing. Extract records it in every part, so a part
    made for other images than its shard now holds is never taken for that shard's."""
    table = pq.read_table(rd.manifest, columns=["image_id", "path", "shard", "sha256"],
                          filters=[("shard", "in", only)] if only else None)
    shard, ids = table["shard"].to_numpy(), table["image_id"].to_numpy()
    if not (np.all(shard[1:] >= shard[:-1]) and np.all((ids[1:] > ids[:-1]) | (shard[1:] > shard[:-1]))):
        table = table.sort_by([("shard", "ascending"), ("image_id", "ascending")])  # as written, it is already
        shard = table["shard"].to_numpy()
    ids = table["image_id"].to_numpy().astype("<i8")
    strings = [pc.fill_null(table[name], "-").combine_chunks().cast(pa.large_string()) for name in ("path", "sha256")]
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]]) if len(shard) else np.zeros(0, np.int64)
    out = {}
    for start, end in zip(starts, [*starts[1:], len(shard)]):
        digest = hashlib.sha256(ids[start:end].tobytes())
        for column in strings:  # each string's length, then their bytes, straight from Arrow's buffers
            offsets = np.frombuffer(column.buffers()[1], dtype="<i8")[start:end + 1]
            digest.update(np.diff(offsets).tobytes())
            digest.update(memoryview(column.buffers()[2])[offsets[0]:offsets[-1]])
        out[int(shard[start])] = f"{SHARD_DIGEST}:{digest.hexdigest()}"
    return out


def made_for_other_images(recorded: str | None, digest: str) -> bool:
    """Whether a part's recorded shard digest names other images than `digest` (parts from
    before digests, or of another digest version, say nothing)."""
    return recorded is not None and recorded.split(":")[0] == SHARD_DIGEST and recorded != digest


def shards(rd: RunDir) -> list[int]:
    """Every shard id that has at least one image still present."""
    return sorted(set(read(rd)["shard"].to_pylist()))


def choose(rows: list[dict], selection: str = "all") -> list[dict]:
    """The manifest rows (with image_id and label) that `all`, `label=NAME` or `ids=1,2,3`
    chooses: the saliency stages' `--select`. Without torch: status asks it too."""
    if selection == "all":
        return rows
    key, _, value = selection.partition("=")
    if key == "label" and value:
        chosen = [r for r in rows if r["label"] == value]
        if not chosen:
            labels = sorted({str(r["label"]) for r in rows})
            raise FeatscopeError(f"no image has label '{value}'; labels are: {', '.join(labels[:20])}")
        return chosen
    if key == "ids" and value:
        try:
            wanted = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise ParamError("select", f"ids= needs comma-separated integers, got '{value}'") from None
        by_id = {r["image_id"]: r for r in rows}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise FeatscopeError(f"unknown image ids: {', '.join(map(str, unknown[:10]))}")
        return [by_id[i] for i in dict.fromkeys(wanted)]
    raise ParamError("select", f"must be all, label=NAME or ids=1,2,3; got '{selection}'")
