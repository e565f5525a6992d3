"""Helpers for the numbers and strings a stranger sends: finiteness, and bounded renderings for
a rejection's detail."""

from __future__ import annotations

import math


def finite_float(value: int | float) -> float | None:
    """`value` as a finite float, or None: an integer too large for a float (JSON allows any number
    of digits) is as unusable as an infinity, and `float()` would raise OverflowError on it."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def excerpt(value: object, limit: int = 40) -> str:
    """A bounded rendering of a stranger's value for a dead letter's detail (never the whole of a
    64 KiB string or a 4,000-digit number)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<integer of {len(str(abs(value)))} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
