"""A recorded series replayed through the detectors exactly as the processor runs them (`ioc detect`):
for operators back-testing rules on a station's history, and for benchmarks such as NAB.

Each value is one reading of one device, judged as one batch, with the detector state round-tripped
through its stored JSON between readings as the processor's database would hold it, so what the
replay raises is what the processor would have raised.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import orjson

from ioc_core.domains import get_domain
from ioc_core.errors import ValidationError
from ioc_core.rules import MetricRules
from ioc_core.telemetry import Reading
from processors.detection import DeviceDetection, DeviceDetectorState, DeviceProfile
from processors.detection.outcomes import MetricScore

# A series replayed without a domain is one metric of this name, watched only by the statistical
# rule every domain uses by default: nothing is known of its limits or its rates.
GENERIC_METRIC = "value"
GENERIC_DOMAIN = "series"
GENERIC_RULES = MetricRules(zscore=6.0)

_REPLAY_DEVICE = "replay"
_REPLAY_CITY = "replay"


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One row of a series: its instant, its value, and both as the file wrote them."""

    ts: datetime
    value: float
    ts_text: str
    value_text: str


@dataclass(frozen=True, slots=True)
class ReplayedPoint:
    point: SeriesPoint
    # A new alarm raised on this reading (not a repeat of an open one).
    alarm: bool
    # The statistical anomaly score of the value, in [0, 1); 0 while the detectors warm up.
    score: float


def read_series(source: IO[str], *, name: str = "the series") -> list[SeriesPoint]:
    """A CSV with a header naming `timestamp` and `value` (NAB's layout); timestamps in ISO 8601,
    read as UTC when they carry no offset. A row that cannot be read is an error naming its line."""
    rows = csv.reader(source)
    header = next(rows, None)
    if header is None:
        raise ValidationError(f"{name} is empty; expected a header 'timestamp,value'")
    columns = [column.strip().lower() for column in header]
    if "timestamp" not in columns or "value" not in columns:
        raise ValidationError(f"{name}: the header must name 'timestamp' and 'value', not {header!r}")
    at, of = columns.index("timestamp"), columns.index("value")
    points = []
    for row in rows:
        line = rows.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(at, of):
            raise ValidationError(f"{name}, line {line}: expected {len(columns)} columns, found {len(row)}")
        points.append(_point(row[at].strip(), row[of].strip(), f"{name}, line {line}"))
    return points


def _point(ts_text: str, value_text: str, where: str) -> SeriesPoint:
    try:
        ts = datetime.fromisoformat(ts_text)
    except ValueError:
        raise ValidationError(f"{where}: {ts_text!r} is not an ISO 8601 timestamp") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    try:
        value = float(value_text)
    except ValueError:
        raise ValidationError(f"{where}: {value_text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValidationError(f"{where}: {value_text!r} is not a finite number")
    return SeriesPoint(ts=ts, value=value, ts_text=ts_text, value_text=value_text)


def replay_profile(domain: str | None = None, metric: str | None = None) -> tuple[DeviceProfile, str]:
    """The device a series is replayed as, and the metric its values are: a domain's metric with
    the domain's default rules, or without a domain the generic metric."""
    if domain is None and metric is None:
        return (
            DeviceProfile(
                id=_REPLAY_DEVICE,
                city=_REPLAY_CITY,
                domain=GENERIC_DOMAIN,
                name=None,
                district=None,
                rules={GENERIC_METRIC: GENERIC_RULES},
            ),
            GENERIC_METRIC,
        )
    if domain is None or metric is None:
        raise ValidationError("give both a domain and a metric, or neither")
    known = get_domain(domain)
    if known is None:
        raise ValidationError(f"unknown domain {domain!r}")
    if known.metric(metric) is None:
        names = ", ".join(m.name for m in known.metrics)
        raise ValidationError(f"the {domain} domain has no metric {metric!r}; it has {names}")
    profile = DeviceProfile.of(
        id=_REPLAY_DEVICE, city=_REPLAY_CITY, domain=domain, name=None, district=None, thresholds={}
    )
    return profile, metric


def replay(
    points: Iterable[SeriesPoint],
    profile: DeviceProfile,
    metric: str,
    detection: DeviceDetection | None = None,
) -> Iterator[ReplayedPoint]:
    """Each point judged as the device's only reading of a batch, in order."""
    detection = detection or DeviceDetection()
    stored = orjson.dumps(DeviceDetectorState().to_json())
    for seq, point in enumerate(points):
        state = DeviceDetectorState.from_json(orjson.loads(stored))
        open_before = state.open_alarm_keys
        reading = Reading(
            device_id=profile.id,
            city=profile.city,
            domain=profile.domain,
            ts=point.ts,
            seq=seq,
            metrics={metric: point.value},
            received_at=point.ts,
        )
        scores: list[MetricScore] = []
        findings = detection.evaluate(profile, [reading], state, scores=scores)
        stored = orjson.dumps(state.to_json())
        raised = any(finding.active and finding.key[1] not in open_before for finding in findings)
        score = max((s.score for s in scores if s.metric == metric), default=0.0)
        yield ReplayedPoint(point=point, alarm=raised, score=score)


def write_replayed(replayed: Iterable[ReplayedPoint], out: IO[str]) -> int:
    """The rows as CSV `timestamp,value,alarm,score`, timestamps and values as the input wrote
    them; the number of alarms raised."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["timestamp", "value", "alarm", "score"])
    alarms = 0
    for row in replayed:
        alarms += row.alarm
        writer.writerow([row.point.ts_text, row.point.value_text, int(row.alarm), f"{row.score:.6f}"])
    return alarms


def replay_file(
    source: Path, *, domain: str | None = None, metric: str | None = None
) -> tuple[int, Iterator[ReplayedPoint]]:
    """The series in `source`, read and checked whole before anything is judged, and its replay:
    (rows, the replayed rows as they are judged)."""
    profile, name = replay_profile(domain, metric)
    try:
        with source.open(encoding="utf-8", newline="") as text:
            points = read_series(text, name=str(source))
    except OSError as exc:
        raise ValidationError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValidationError(f"{source} is not UTF-8 text") from None
    return len(points), replay(points, profile, name)
