"""`featscope clean`: delete what killed jobs left in a run, and nothing else.

A job killed outright (SIGKILL, the OOM killer, a preempted or lost node) cannot remove its
hidden temporaries: half feature parts, whole index versions that never became current.
`featscope status` names those where the large files go; this command finds them in every
folder of the run and deletes each that nothing wrote to for `--idle-hours` (1 by default),
except in a folder another job is writing now. Outputs, their checksums and the history are
never touched, and a live job that loses a temporary fails loudly rather than writing a
wrong output.

See core.leftovers for what counts as left, and why deleting is safe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import leftovers
from featscope.pipelines.core.atomic import writer
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.text import listed, plural


@dataclass
class Cleaning:
    deleted: list[leftovers.Leftover] = field(default_factory=list)
    kept: list[leftovers.Leftover] = field(default_factory=list)  # in folders being written now
    dry_run: bool = False
    root: str = ""

    def line(self) -> str:
        names = [item.path.relative_to(self.root).as_posix() for item in self.deleted]
        size = sum(item.size for item in self.deleted) / 1e6
        verb = "would delete" if self.dry_run else "deleted"
        text = (f"clean: {verb} {plural(len(names), 'leftover')} of stopped jobs, {size:.1f} MB"
                + (f" ({listed(names)})" if names and not self.dry_run else ""))
        if self.kept:
            text += (f"; kept {plural(len(self.kept), 'leftover')} in folders another job is writing now "
                     f"({listed([item.path.relative_to(self.root).as_posix() for item in self.kept])})")
        if self.dry_run:  # each one, to look over before deleting
            text += "".join(f"\n  {name}  {item.size / 1e6:.1f} MB, idle {item.idle_s / 3600:.1f} h"
                            for name, item in zip(names, self.deleted))
        return text


def clean(rd: RunDir, *, idle_hours: float = 1.0, dry_run: bool = False, everywhere: bool = True,
          progress: bool = False) -> Cleaning:
    """Delete the run's leftovers idle for `idle_hours` (`dry_run`: only list them).
    `everywhere`: in every folder of the run, else only where the large files go (what the
    workflow does as it starts: no walk over a large run's every file)."""
    if not rd.run_json.exists():
        raise FeatscopeError(f"{rd.root} is not a run: no run.json")
    out = Cleaning(dry_run=dry_run, root=str(rd.root))
    written_now: dict[Path, bool] = {}  # folder -> whether a job holds its writer lock now
    for item in leftovers.find(rd, everywhere=everywhere, idle_for=idle_hours * 3600, progress=progress):
        folder = item.path.parent
        if folder not in written_now:
            written_now[folder] = writer(folder) is not None
        if written_now[folder]:
            out.kept.append(item)
            continue
        if not dry_run:
            leftovers.delete(item)
        out.deleted.append(item)
    return out


@dataclass(frozen=True)
class CleanOptions(Options):
    idle_hours: float = option(1.0, min=0.0, help="delete only leftovers nothing wrote to for this many hours: "
                                                  "longer than any job of the run goes without writing")
    dry_run: bool = option(False, help="list what would be deleted, and delete nothing")


def run(rd: RunDir, options: CleanOptions, progress: bool = True) -> Cleaning:
    return clean(rd, idle_hours=options.idle_hours, dry_run=options.dry_run, progress=progress)


COMMANDS = [
    Command("clean", CleanOptions, run, records_timing=False,
            help="delete the temporary files and index versions that killed jobs left in a run",
            description=__doc__.split("\n\n")[1].replace("\n", " ")),
]
