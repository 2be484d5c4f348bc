"""The run's pictures a report shows, kept inside it: report/pictures/, the run's layout below.

A report is built from tables (each unit's top-k list and activations, the AUCs of saliency
maps, explained pairs) and shows pictures other stages drew from the same tables. Linked from
the run, a picture drawn again after the report was built (strips of a top-k merged again,
units rendered with other steps, saliency maps of other options) appeared beside the old
lists and numbers: a unit's strip showed other images than its page listed, and a report
opened from disk said nothing. Kept here, each picture stays the one its table was built with
until the report is built again, and a report copied away from its run keeps its pictures.

Each stage writes a set of pictures into one folder under that folder's writer lock
(`atomic.one_writer`), and the table that vouches for them last. The report puts its
pictures in place holding those locks shared (`folders`, `atomic.reading`), after it checked
that no table it read changed since: a picture kept is one its table was read with.

Hard links cost no space until the run's picture is drawn again, and then hold it as it
was: the stages never write into a picture, they rename a new file over it (`atomic_path`).
Where the file system has no hard links, a copy is made; either is made again only when the
run's picture changed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import tmp_path_for
from featscope.pipelines.core.rundir import RunDir

FOLDER = "pictures"  # under report/


class KeptPictures:
    """The pictures one build shows: `keep` names each while the data are computed, `write`
    puts them in place once the report before is withdrawn, and drops those no longer shown."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd
        self.folder = rd.report_dir / FOLDER
        self.wanted: dict[Path, Path] = {}  # kept path -> the run's picture

    def keep(self, picture: Path) -> str:
        """`picture` (a file of the run) as the pages link to it."""
        relative = picture.relative_to(self.rd.root)
        self.wanted[self.folder / relative] = picture
        return f"{FOLDER}/{relative.as_posix()}"

    def folders(self) -> set[Path]:
        """The folders the kept pictures are in: each is one stage's set (see above)."""
        return {picture.parent for picture in self.wanted.values()}

    def write(self) -> int:
        """Put each picture in place where the kept one is not it; returns how many were."""
        placed = 0
        for kept, picture in self.wanted.items():
            if not picture.exists():  # deleted since it was read: the pages would show a hole
                raise FeatscopeError(f"{picture} went away while the report was built: run `featscope report` again")
            if not _same(kept, picture):
                _place(picture, kept)
                placed += 1
        if self.folder.is_dir():
            for path in sorted(self.folder.rglob("*"), reverse=True):  # files before their folders
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                elif not path.is_dir() and path not in self.wanted:
                    path.unlink()
        return placed


def _same(kept: Path, picture: Path) -> bool:
    """Whether `kept` is `picture` as it is now: the same file (a link), or a copy of it made
    since it last changed (same size and modification time, which the copy takes over)."""
    try:
        a, b = kept.stat(), picture.stat()
    except FileNotFoundError:
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _place(picture: Path, kept: Path) -> None:
    """Link `picture` at `kept` (a copy where links fail), replacing what was there at once."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(kept)
    try:
        try:
            os.link(picture, tmp)
        except OSError:  # no hard links here (another file system, FAT, some network mounts)
            shutil.copy2(picture, tmp)
        os.replace(tmp, kept)
    finally:
        tmp.unlink(missing_ok=True)
