"""The severity order is written once (`ioc_core.rules.Severity`); everything else derives from it."""

from __future__ import annotations

import re
from typing import get_args

from ioc_core import alarms, webhooks
from ioc_core.rules import SEVERITIES, Severity, severity_rank
from ioc_core.storage import views
from ioc_core.storage.severity import SEVERITY_ORDER_SQL, severity_rank_sql


def test_severities_are_the_literal_in_its_order() -> None:
    assert SEVERITIES == get_args(Severity) == ("low", "medium", "high", "critical")
    assert [severity_rank(s) for s in SEVERITIES] == list(range(len(SEVERITIES)))


def test_models_use_the_one_severity_type() -> None:
    assert alarms.Severity is Severity
    assert get_args(webhooks.SeverityName) == SEVERITIES
    assert get_args(alarms.Alarm.model_fields["severity"].annotation) == SEVERITIES


def test_sql_order_lists_the_severities_mildest_first() -> None:
    assert SEVERITY_ORDER_SQL == "ARRAY['low', 'medium', 'high', 'critical']"
    assert re.findall(r"'(\w+)'", SEVERITY_ORDER_SQL) == list(SEVERITIES)


def test_sql_rank_counts_from_one_and_ranks_the_unknown_as_mildest() -> None:
    expression = severity_rank_sql("a.severity")
    assert expression == f"coalesce(array_position({SEVERITY_ORDER_SQL}::text[], a.severity), 1)"
    # The read-side views order alarms by that rank.
    assert expression in views.PUBLIC_ALARMS_SQL
