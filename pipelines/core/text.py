"""Words in summary lines: counts with the right plural, rates with the right precision."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 image', '2 images', '0 images' (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def listed(items: list[str], shown: int = 4) -> str:
    """'a, b, c, d and 3 more': the first `shown` items and how many are left out."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def rate(count: int, seconds: float, unit: str = "img") -> str:
    """'140 img/s', '3.2 img/s', '0.05 img/s': three significant figures at most, never '0'."""
    if count == 0 or seconds <= 0:
        return f"- {unit}/s"
    per_second = count / seconds
    return f"{per_second:.0f} {unit}/s" if per_second >= 100 else f"{per_second:.3g} {unit}/s"
