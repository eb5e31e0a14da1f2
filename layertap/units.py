"""Sizes and durations written for people (plans, reports, progress lines); a base module every stage may use."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes as a short decimal string (kB, MB, GB, TB).

    Args:
        n: a number of bytes.

    Returns:
        E.g. ``"512 B"``, ``"1.5 MB"``.

    Example:
        >>> human_bytes(1_500_000)
        '1.5 MB'
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop always returns
