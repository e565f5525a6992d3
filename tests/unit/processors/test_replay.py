"""`ioc detect`: a recorded series replayed through the processor's detectors, state round-tripped as
the processor stores it, with an alarm column for new alarms and the statistical score."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ioc.cli import main
from ioc_core.errors import ValidationError
from ioc_core.telemetry import Reading
from processors.detection import DeviceDetection, DeviceDetectorState
from processors.replay import SeriesPoint, read_series, replay, replay_profile

START = datetime(2015, 9, 1, 11, 25, tzinfo=UTC)


def series(values: list[float]) -> list[SeriesPoint]:
    return [
        SeriesPoint(
            ts=START + timedelta(minutes=5 * i),
            value=value,
            ts_text=(START + timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S"),
            value_text=repr(value),
        )
        for i, value in enumerate(values)
    ]


def noisy(count: int, *, seed: int = 3) -> list[float]:
    rng = random.Random(seed)
    return [50 + rng.gauss(0, 2) for _ in range(count)]


def test_a_nab_file_is_read_as_utc_with_its_text_kept() -> None:
    text = "timestamp,value\n2015-09-01 11:25:00,58\n\n2015-09-01 11:30:00,60.5\n"
    points = read_series(io.StringIO(text))
    assert [(p.ts, p.value, p.ts_text, p.value_text) for p in points] == [
        (START, 58.0, "2015-09-01 11:25:00", "58"),
        (START + timedelta(minutes=5), 60.5, "2015-09-01 11:30:00", "60.5"),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ("time,reading\n", "must name 'timestamp' and 'value'"),
        ("timestamp,value\n2015-09-01 11:25:00,58\nyesterday,3\n", "line 3: 'yesterday' is not an ISO 8601"),
        ("timestamp,value\n2015-09-01 11:25:00,nan\n", "line 2: 'nan' is not a finite number"),
        ("timestamp,value\n2015-09-01 11:25:00\n", "line 2: expected 2 columns, found 1"),
    ],
)
def test_a_row_that_cannot_be_read_is_an_error_naming_its_line(text: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        read_series(io.StringIO(text), name="f.csv")


def test_a_jump_raises_one_alarm_on_its_row_and_scores_above_one_half() -> None:
    values = [*noisy(200), 90.0, 91.0, 89.0, *noisy(50, seed=4)]
    profile, metric = replay_profile()
    rows = list(replay(series(values), profile, metric))
    assert [i for i, row in enumerate(rows) if row.alarm] == [200]
    assert rows[200].score > 0.5
    # While the alarm is open its excursion is known: the next values score nothing.
    assert rows[201].score == rows[202].score == 0
    assert all(row.score == 0 for row in rows[:30])  # warming up
    assert max(row.score for row in rows[30:200]) < 0.5


def test_the_replay_raises_what_one_long_lived_state_would() -> None:
    # The state is stored and read back between readings, as the processor's database holds it; it
    # must behave as if it had stayed in memory.
    values = [*noisy(150), 80.0, 82.0, *noisy(40, seed=5), 20.0, *noisy(60, seed=6)]
    profile, metric = replay_profile()
    replayed = [row.alarm for row in replay(series(values), profile, metric)]
    detection, state = DeviceDetection(), DeviceDetectorState()
    in_memory = []
    for point in series(values):
        before = state.open_alarms
        reading = Reading(
            device_id=profile.id,
            city=profile.city,
            domain=profile.domain,
            ts=point.ts,
            seq=None,
            metrics={metric: point.value},
            received_at=point.ts,
        )
        findings = detection.evaluate(profile, [reading], state)
        in_memory.append(any(f.active and f.rule not in before for f in findings))
    assert replayed == in_memory
    assert sum(replayed) == 2


def test_a_domain_metric_is_judged_by_its_domain_rules() -> None:
    profile, metric = replay_profile("flood", "currentLevel")
    rows = list(replay(series([1.2, 1.3, 5.0, 5.1]), profile, metric))
    assert [row.alarm for row in rows] == [False, False, True, False]


@pytest.mark.parametrize(
    ("domain", "metric", "problem"),
    [
        ("flood", None, "both a domain and a metric"),
        ("weather", "rain", "unknown domain 'weather'"),
        ("flood", "speed", "has no metric 'speed'"),
    ],
)
def test_a_domain_and_metric_must_name_a_known_pair(domain: str, metric: str | None, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        replay_profile(domain, metric)


def test_ioc_detect_writes_the_rows_in_order_with_alarm_and_score(tmp_path: Path) -> None:
    source, out = tmp_path / "speed.csv", tmp_path / "result.csv"
    values = [*noisy(100), 95.0, *noisy(20, seed=8)]
    with source.open("w") as file:
        file.write("timestamp,value\n")
        file.writelines(f"{p.ts_text},{p.value_text}\n" for p in series(values))
    assert main(["detect", str(source), "--out", str(out)]) == 0
    with out.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["timestamp"] for row in rows] == [p.ts_text for p in series(values)]
    assert [row["value"] for row in rows] == [p.value_text for p in series(values)]
    assert [i for i, row in enumerate(rows) if row["alarm"] == "1"] == [100]
    assert all(0 <= float(row["score"]) < 1 for row in rows)
    assert not list(tmp_path.glob(".*partial"))


def test_ioc_detect_refuses_a_bad_file_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "bad.csv", tmp_path / "result.csv"
    source.write_text("timestamp,value\n2015-09-01 11:25:00,abc\n")
    assert main(["detect", str(source), "--out", str(out)]) == 2
    expected = f"ioc detect: {source}, line 2: 'abc' is not a number"
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not out.exists()
