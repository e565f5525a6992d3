"""The severity order in SQL, built at import time from `ioc_core.rules.SEVERITIES` so that the
database compares severities exactly as the detectors and webhook filters do."""

from __future__ import annotations

from ioc_core.alarms import EXCURSION_KINDS
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


def kind_rank_sql(rule: str) -> str:
    """An SQL expression ranking the rule in `rule` by how well its kind explains an excursion:
    a limit highest, then a rate, then a statistical finding, anything else 0."""
    whens = " ".join(
        f"WHEN {_quoted(kind)} THEN {len(EXCURSION_KINDS) - i}" for i, kind in enumerate(EXCURSION_KINDS)
    )
    return f"(CASE split_part({rule}, '.', 1) {whens} ELSE 0 END)"


def reason_rank_sql(severity: str, rule: str) -> str:
    """An SQL expression ordering an alarm's reasons: by severity, then by `kind_rank_sql`."""
    return f"({severity_rank_sql(severity)} * {len(EXCURSION_KINDS) + 1} + {kind_rank_sql(rule)})"
