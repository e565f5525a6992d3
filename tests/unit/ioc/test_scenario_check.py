"""`ioc detect --scenario`: each scenario replayed in simulated time through the processor's
detectors and scored against its own ground truth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ioc.cli import main
from ioc.scenario_check import AlarmBook, replay_scenario
from ioc_core.alarms import Finding
from tests.storm_story import STORM_STORY

# Midnight in Vietnam: the samplers' day starts with its quiet night.
START = datetime(2026, 12, 1, 17, 0, tzinfo=UTC)


def test_every_storm_incident_is_detected_in_time_and_nothing_else_is_raised() -> None:
    result = replay_scenario("storm", city="hai-phong", devices=40, rate=40, duration_s=45, start=START)
    kinds = {r.incident.kind for r in result.results}
    assert kinds >= STORM_STORY
    assert result.recall == 1.0 and result.precision == 1.0, result.as_dict()
    assert result.unexplained == []
    # A limit is broken by the reading that crosses it; the district needs its stations' rise.
    by_kind = {r.incident.kind: r.time_to_detect_s for r in result.results}
    assert by_kind["water_level_danger"] == 0.0
    assert by_kind["district_flood"] is not None and by_kind["district_flood"] <= 13.0


def test_an_outage_is_one_offline_alarm_per_device_on_the_feeder() -> None:
    result = replay_scenario("outage", city="ha-noi", devices=20, rate=20, duration_s=40, start=START)
    assert result.results and {r.incident.expected_rules[0] for r in result.results} == {"offline"}
    assert result.recall == 1.0 and result.precision == 1.0
    assert all(alarm.closed_at is not None for alarm in result.alarms)


def test_bad_devices_are_ingestion_incidents_and_raise_nothing() -> None:
    result = replay_scenario(
        "bad-devices", city="quang-ninh", devices=25, rate=25, duration_s=40, start=START
    )
    assert result.rejected > 0
    assert result.not_detection > 0 and result.results == []
    assert result.alarms == []


def test_a_normal_run_raises_nothing() -> None:
    result = replay_scenario("normal", city="da-nang", devices=30, rate=30, duration_s=40, start=START)
    assert result.alarms == [] and result.precision is None and result.recall is None


def test_a_scenario_the_fleet_cannot_show_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 15 times"):
        replay_scenario("storm", city="hai-phong", devices=40, rate=1, duration_s=45)
    with pytest.raises(ValueError, match="unknown scenario"):
        replay_scenario("earthquake", city="hai-phong", devices=40, rate=40, duration_s=45)


def finding(rule: str, minute: int, *, active: bool = True, severity: str = "medium") -> Finding:
    return Finding(
        subject="d",
        device_id="d",
        city="ha-noi",
        domain="flood",
        district=None,
        rule=rule,
        metric=rule.partition(".")[2] or None,
        active=active,
        severity=severity if active else None,
        value=None,
        threshold=None,
        repeats=1,
        at=START + timedelta(minutes=minute),
        message_vi="",
        message_en="",
    )


def test_the_book_keeps_alarms_as_the_store_does() -> None:
    book = AlarmBook()
    book.apply([finding("threshold.currentLevel", 0), finding("rate.currentLevel", 0, severity="high")])
    book.apply([finding("rate.currentLevel", 1, active=False)])
    assert book.is_open("d", "excursion.currentLevel")
    book.apply([finding("flatline.currentLevel", 2, severity="low")])
    book.apply([finding("threshold.currentLevel", 3, active=False)])
    assert not book.is_open("d", "excursion.currentLevel")
    [excursion, flatline] = book.alarms
    assert excursion.reasons == {"threshold.currentLevel": "medium", "rate.currentLevel": "high"}
    assert excursion.closed_at == START + timedelta(minutes=3)
    assert flatline.closed_at is None


def test_ioc_detect_scenario_prints_each_incident_and_the_scores(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["detect", "--scenario", "storm", "--city", "hai-phong", "--devices", "40", "--rate", "40"]
    assert main([*argv, "--duration", "45", "--start", START.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "district_flood" in out and "water_level_danger" in out
    assert "recall 1 (13 of 13 incidents in time), precision 1 (11 of 11 alarms explained)" in out


SHORT_STORM = ["detect", "--scenario", "storm", "--city", "hai-phong", "--devices", "40"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["detect"], "a FILE or --scenario"),
        (["detect", "series.csv", "--scenario", "storm"], "a FILE or --scenario"),
        ([*SHORT_STORM, "--rate", "1", "--duration", "45"], "at least 15"),
    ],
)
def test_ioc_detect_refuses_what_cannot_work_with_one_line(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
