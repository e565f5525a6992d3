"""The severity order in SQL, built at import time from `ioc_core.rules.SEVERITIES` so that the
database compares severities exactly as the detectors and webhook filters do."""

from __future__ import annotations

from ioc_core.rules import SEVERITIES


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# The severities mildest first, as an SQL array: `array_position` over it is a severity's rank
# counted from 1.
SEVERITY_ORDER_SQL = "ARRAY[" + ", ".join(map(_quoted, SEVERITIES)) + "]"


def severity_rank_sql(column: str) -> str:
    """An SQL expression ranking the severity in `column` from 1 (mildest) up; anything not in
    the order ranks as the mildest."""
    return f"coalesce(array_position({SEVERITY_ORDER_SQL}::text[], {column}), 1)"
