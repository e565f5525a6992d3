"""Maintenance windows, the pure part: which requests are windows, how a rule expands into
occurrences and which rules are refused; and that suppressed alarms and windowed status events are
kept from webhook routing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError as RequestInvalid

from ioc_core.errors import ValidationError
from ioc_core.events import Event
from ioc_core.maintenance import MAX_OCCURRENCES, WindowIn, occurrences
from ioc_core.webhooks import routed

HANOI = timezone(timedelta(hours=7))
START = datetime(2026, 12, 12, 22, 0, 0, 250_000, tzinfo=HANOI)
END = START + timedelta(hours=6)


def test_a_one_off_window_is_one_occurrence() -> None:
    assert occurrences(START, END, None) == [(START, END)]


def test_a_weekly_rule_repeats_the_first_occurrence_with_its_length() -> None:
    got = occurrences(START, END, "RRULE:freq=weekly;byday=sa;count=3")
    assert [s for s, _ in got] == [START, START + timedelta(days=7), START + timedelta(days=14)]
    assert all(e - s == timedelta(hours=6) for s, e in got)


def test_start_counts_even_where_the_rule_does_not_match_it() -> None:
    # 22:00 is not 02:00 or 14:00: RFC 5545 counts DTSTART all the same.
    got = occurrences(START, START + timedelta(hours=1), "FREQ=DAILY;BYHOUR=2,14;COUNT=2")
    assert [s.hour for s, _ in got] == [22, 2, 14]


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("FREQ=DAILY", "must end"),
        ("FREQ=DAILY;INTERVAL=1", "must end"),
        (f"FREQ=DAILY;COUNT={MAX_OCCURRENCES + 1}", "more than"),
        ("FREQ=YEARLY;COUNT=10", "five years"),
        ("FREQ=HOURLY;COUNT=3", "FREQ must be"),
        ("FREQ=SECONDLY;UNTIL=20270101T000000Z", "FREQ must be"),
        ("FREQ=DAILY;UNTIL=20270101", "not a valid"),
        ("FREQ=DAILY;COUNT=two", "not a valid"),
        ("FREQ=DAILY;BOGUS=1;COUNT=2", "not a valid"),
        ("DTSTART=20261212T000000Z;FREQ=DAILY;COUNT=2", "DTSTART"),
        ("FREQ=DAILY;COUNT=2\nEXDATE:20261213T000000Z", "one RFC 5545 RRULE"),
        ("FREQ=DAILY;COUNT=1", "repeats nothing"),
        ("", "one RFC 5545 RRULE"),
    ],
)
def test_unbounded_absurd_or_invalid_rules_are_refused(rule: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        occurrences(START, END, rule)


def test_end_must_follow_start_and_a_window_must_not_last_for_ever() -> None:
    with pytest.raises(ValidationError, match="after"):
        occurrences(START, START, None)
    with pytest.raises(ValidationError, match="at most"):
        occurrences(START, START + timedelta(days=400), None)


@pytest.mark.parametrize(
    "start",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
        datetime(1969, 12, 31, tzinfo=UTC),
        datetime(9999, 12, 30, tzinfo=timezone(timedelta(hours=-12))),
    ],
)
def test_times_out_of_any_sane_calendar_are_refused(start: datetime) -> None:
    for rule in (None, "FREQ=DAILY;COUNT=3"):
        with pytest.raises(ValidationError):
            occurrences(start, start + timedelta(hours=1), rule)


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ({"device_id": "hp-grid-001"}, "device"),
        ({"area": "hp-feeder-07"}, "area"),
        ({"city": "hai-phong", "domain": "grid"}, "domain"),
        ({"city": "hai-phong"}, "city"),
    ],
)
def test_a_window_names_exactly_one_target(target: dict[str, str], kind: str) -> None:
    window = WindowIn.model_validate({**target, "start": START, "end": END, "reason": "bảo trì"})
    assert window.target == kind


@pytest.mark.parametrize(
    "target",
    [
        {},
        {"device_id": "d1", "city": "hai-phong"},
        {"area": "a1", "device_id": "d1"},
        {"domain": "grid"},
        {"city": "hai-phong", "domain": "sewage"},
        {"city": "Hải Phòng"},
        {"device_id": "bad id"},
    ],
)
def test_ambiguous_or_malformed_targets_are_refused(target: dict[str, str]) -> None:
    with pytest.raises(RequestInvalid):
        WindowIn.model_validate({**target, "start": START, "end": END, "reason": "bảo trì"})


def test_times_without_an_offset_are_refused() -> None:
    with pytest.raises(RequestInvalid):
        WindowIn.model_validate(
            {"city": "hai-phong", "start": "2026-12-12T22:00:00", "end": END, "reason": "x"}
        )


def _event(event_type: str, **data: object) -> Event:
    return Event(
        id="5b0f8c7e-4c1b-4b8a-9a57-0123456789ab",
        type=event_type,
        subject="d1",
        time=datetime.now(UTC),
        data={"device_id": "d1", "city": "hai-phong", "domain": "grid", **data},
    )


def test_suppressed_alarm_events_are_not_routed_to_webhooks() -> None:
    assert routed([_event("alarm.raised", severity="high", suppressed=True)]) == []
    [sent] = routed([_event("alarm.raised", severity="high", suppressed=False)])
    assert sent.status_device is None


def test_status_events_carry_their_device_and_time_for_the_window_check() -> None:
    event = _event("device.offline", status="offline")
    [status] = routed([event])
    assert status.status_device == "d1" and status.at == event.time
