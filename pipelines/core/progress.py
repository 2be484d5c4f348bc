"""Progress bars: tqdm's, hidden where there is nothing to go through.

A bar over nothing ("diverse variants: 0unit [00:00, ?unit/s]", a report whose thumbnails
are all current) says work was done where none was; commands draw their bars through
`progress_bar` so that none is drawn empty.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, progress: bool, total: int | None = None, **options) -> tqdm:
    """`tqdm(iterable, total=...)`, disabled where `progress` is off or the work is known to be
    empty (`total`, else the iterable's length where it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, total=total, disable=not progress or total == 0, **options)
