"""What one open alarm is about (`alarm_key`) and how a batch's alarm events fold into one per
change of an alarm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ioc_core.alarms import alarm_key, excursion_kind_rank
from ioc_core.events import Event
from ioc_core.storage.alarms import _one_per_change

AT = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rule", "metric", "key"),
    [
        ("threshold.currentLevel", "currentLevel", "excursion.currentLevel"),
        ("rate.currentLevel", "currentLevel", "excursion.currentLevel"),
        ("zscore.currentLevel", "currentLevel", "excursion.currentLevel"),
        ("threshold.rainfall", "rainfall", "excursion.rainfall"),
        # A stuck sensor is a maintenance matter; offline and district alarms have no metric.
        ("flatline.currentLevel", "currentLevel", "flatline.currentLevel"),
        ("offline", None, "offline"),
        ("flood.district", None, "flood.district"),
    ],
)
def test_the_rules_judging_a_metric_share_its_alarm(rule: str, metric: str | None, key: str) -> None:
    assert alarm_key(rule, metric) == key


def test_a_limit_explains_an_excursion_better_than_a_rate_or_a_statistic() -> None:
    ranks = [excursion_kind_rank(r) for r in ("threshold.x", "rate.x", "zscore.x", "flatline.x", "offline")]
    assert ranks == [3, 2, 1, 0, 0]


def event(kind: str, alarm_id: int, minute: int, severity: str) -> Event:
    return Event(
        id=f"{kind}-{alarm_id}-{minute}",
        type=f"alarm.{kind}",
        subject="d",
        time=AT + timedelta(minutes=minute),
        data={"id": alarm_id, "severity": severity},
    )


def test_a_batch_tells_each_change_of_an_alarm_once_with_its_final_form() -> None:
    events = [
        event("raised", 1, 0, "medium"),
        event("updated", 1, 0, "high"),  # the rate joined in the same batch
        event("updated", 2, 0, "critical"),
        event("updated", 2, 1, "critical"),
        event("resolved", 1, 2, "high"),
        event("raised", 1, 3, "low"),  # cannot happen to one id, but kept in its place
    ]
    folded = _one_per_change(events)
    assert [(e.type, e.data["id"], e.data["severity"], e.time.minute) for e in folded] == [
        ("alarm.raised", 1, "high", 0),
        ("alarm.updated", 2, "critical", 1),
        ("alarm.resolved", 1, "high", 2),
        ("alarm.raised", 1, "low", 3),
    ]
    assert folded[0].id == "raised-1-0"
