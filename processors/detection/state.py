"""Per-device detector state, and its JSON form.

The state outlives the process that built it: it is stored beside the readings it has seen and read
back by whichever processor owns the device next. Its JSON is therefore small (instants are whole
milliseconds, history instants are offsets from the newest), exact (floats round-trip through JSON
unchanged, so a reloaded state behaves exactly as the one that was saved), and forgiving: a part that
is missing or unreadable, from an older version say, starts fresh instead of failing the device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from ioc_core.alarms import alarm_key
from ioc_core.rules import SEVERITIES

STATE_VERSION = 2

# Hours of the day a daily profile has.
DAILY_BINS = 24
# A profile holds a day of hours for working days, then one for weekend days.
PROFILE_BINS = 2 * DAILY_BINS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


# A normal distribution's standard deviation over its mean absolute deviation.
SIGMA_PER_MEAN_ABSOLUTE_DEVIATION = math.sqrt(math.pi / 2)


def epoch_ms(ts: datetime) -> int:
    """Whole milliseconds since the epoch, computed exactly (no float rounding)."""
    return (ts - _EPOCH) // _MILLISECOND


@dataclass(slots=True)
class RuleTracker:
    """An open alarm of one rule: its worst severity so far and how many readings in a row have
    been back in band (it clears when that count reaches the detection's `clear_after`)."""

    severity: str
    clears: int = 0


@dataclass(slots=True)
class MetricState:
    """What the detectors remember about one metric of one device."""

    last: float | None = None
    last_at_ms: int | None = None
    # The statistical baseline: how many values it has learned from (capped), the level and the
    # slope it expects next, the exponentially weighted mean absolute deviation of the values from
    # it, how many values in a row fell outside its band on one side (positive: above), and how
    # far the deviations have persisted above and below it.
    count: int = 0
    level: float = 0.0
    slope: float = 0.0
    deviation: float = 0.0
    outside: int = 0
    # The two one-sided CUSUM sums of the deviations from the baseline, in standard deviations.
    cusum_up: float = 0.0
    cusum_down: float = 0.0
    # A running estimate of a high quantile of the absolute residuals (0: none yet).
    tail: float = 0.0
    # The daily profile, for metrics with a daily cycle: per hour of the day (UTC), the usual
    # value on a working day and then on a weekend day; since when it has been learned; how far
    # above it the values run today, and their mean absolute deviation from the two together.
    daily: list[float] = field(default_factory=list)
    daily_since_ms: int = 0
    daily_level: float = 0.0
    daily_deviation: float = 0.0
    # Since when (and for how many readings) the value has not changed.
    flat_since_ms: int | None = None
    flat_count: int = 0
    # Down-sampled recent values for rates of change: (epoch ms, value), oldest first.
    history: list[tuple[int, float]] = field(default_factory=list)
    # Open alarms by detector kind ("threshold", "rate", "zscore", "flatline").
    trackers: dict[str, RuleTracker] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.last is not None and self.last_at_ms is not None:
            body["last"] = self.last
            body["last_at"] = self.last_at_ms
        if self.count:
            body["baseline"] = [
                self.count,
                self.level,
                self.slope,
                self.deviation,
                self.outside,
                self.cusum_up,
                self.cusum_down,
                self.tail,
            ]
        if self.daily:
            body["daily"] = [self.daily, self.daily_since_ms, self.daily_level, self.daily_deviation]
        if self.flat_since_ms is not None:
            body["flat"] = [self.flat_since_ms, self.flat_count]
        if self.history:
            newest = self.history[-1][0]
            body["history"] = [[at_ms - newest, value] for at_ms, value in self.history]
            body["history_end"] = newest
        if self.trackers:
            body["alarms"] = {kind: [t.severity, t.clears] for kind, t in self.trackers.items()}
        return body

    @classmethod
    def from_own_json(cls, body: Mapping[str, Any]) -> MetricState:
        """What `to_json` wrote in this process, read back without `from_json`'s checks."""
        state = cls()
        if "last" in body:
            state.last, state.last_at_ms = body["last"], body["last_at"]
        baseline = body.get("baseline")
        if baseline is not None:
            (
                state.count,
                state.level,
                state.slope,
                state.deviation,
                state.outside,
                state.cusum_up,
                state.cusum_down,
                state.tail,
            ) = baseline
        daily = body.get("daily")
        if daily is not None:
            state.daily, state.daily_since_ms, state.daily_level, state.daily_deviation = daily
        flat = body.get("flat")
        if flat is not None:
            state.flat_since_ms, state.flat_count = flat
        history = body.get("history")
        if history is not None:
            end_ms = body["history_end"]
            state.history = [(end_ms + offset, value) for offset, value in history]
        alarms = body.get("alarms")
        if alarms is not None:
            state.trackers = {kind: RuleTracker(*tracker) for kind, tracker in alarms.items()}
        return state

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> MetricState:
        state = cls()
        last, last_at = body.get("last"), body.get("last_at")
        if _is_number(last) and _is_int(last_at):
            state.last, state.last_at_ms = float(last), last_at
        baseline = body.get("baseline")
        ewma = body.get("ewma")
        if (
            type(baseline) is list
            and len(baseline) in (5, 7, 8)
            and (numbers := _finite_numbers(baseline)) is not None
            and type(baseline[0]) is int
            and baseline[0] > 0
            and numbers[3] >= 0
            and type(baseline[4]) is int
            and min(numbers[5:], default=0.0) >= 0
        ):
            # The CUSUM sums were added later: a baseline written without them starts them at 0.
            state.count, state.outside = baseline[0], baseline[4]
            state.level, state.slope, state.deviation = numbers[1], numbers[2], numbers[3]
            if len(numbers) >= 7:
                state.cusum_up, state.cusum_down = numbers[5], numbers[6]
            if len(numbers) == 8:
                state.tail = numbers[7]
        elif (
            isinstance(ewma, list)
            and len(ewma) == 3
            and _is_int(ewma[0])
            and ewma[0] > 0
            and _is_number(ewma[1])
            and _is_number(ewma[2])
            and ewma[2] >= 0
        ):
            # Written by version 1 (mean and variance): the same baseline, its spread as a mean
            # absolute deviation, so a device keeps what it learned across the upgrade.
            state.count, state.level = int(ewma[0]), float(ewma[1])
            state.deviation = math.sqrt(float(ewma[2])) / SIGMA_PER_MEAN_ABSOLUTE_DEVIATION
        daily = body.get("daily")
        if (
            type(daily) is list
            and len(daily) == 4
            and type(daily[0]) is list
            and len(daily[0]) in (DAILY_BINS, PROFILE_BINS)
            and (usual := _finite_numbers(daily[0])) is not None
            and _is_int(daily[1])
            and _is_number(daily[2])
            and _is_number(daily[3])
            and daily[3] >= 0
        ):
            # One day of hours was written by the previous version, for every day of the week:
            # both kinds of day start from it.
            state.daily = usual if len(usual) == PROFILE_BINS else usual + usual
            state.daily_since_ms = int(daily[1])
            state.daily_level, state.daily_deviation = float(daily[2]), float(daily[3])
        flat = body.get("flat")
        if isinstance(flat, list) and len(flat) == 2 and _is_int(flat[0]) and _is_int(flat[1]):
            state.flat_since_ms, state.flat_count = int(flat[0]), int(flat[1])
        history, history_end = body.get("history"), body.get("history_end")
        if type(history) is list and type(history_end) is int:
            state.history = _history(history, history_end)
        alarms = body.get("alarms")
        if isinstance(alarms, dict):
            for kind, tracker in alarms.items():
                if (
                    isinstance(tracker, list)
                    and len(tracker) == 2
                    and tracker[0] in SEVERITIES
                    and _is_int(tracker[1])
                    and tracker[1] >= 0
                ):
                    state.trackers[str(kind)] = RuleTracker(severity=tracker[0], clears=int(tracker[1]))
        return state


@dataclass(slots=True)
class DeviceDetectorState:
    """Everything the detectors remember about one device. Mutated by `DeviceDetection.evaluate`."""

    # The newest reading instant evaluated; readings at or before it are late or replayed.
    last_ts: datetime | None = None
    metrics: dict[str, MetricState] = field(default_factory=dict)

    def metric(self, name: str) -> MetricState:
        state = self.metrics.get(name)
        if state is None:
            state = self.metrics[name] = MetricState()
        return state

    @property
    def open_alarms(self) -> dict[str, str]:
        """Severity of each rule with an open alarm, by rule name (e.g. `threshold.currentLevel`)."""
        return {
            f"{kind}.{metric}": tracker.severity
            for metric, state in self.metrics.items()
            for kind, tracker in state.trackers.items()
        }

    @property
    def open_alarm_keys(self) -> set[str]:
        """The alarms (`ioc_core.alarms.alarm_key`) some rule keeps open."""
        return {
            alarm_key(f"{kind}.{metric}", metric)
            for metric, state in self.metrics.items()
            for kind in state.trackers
        }

    def alarm_trackers(self) -> tuple[tuple[str, str, str, int], ...]:
        """Every open alarm's tracker as (metric, kind, severity, clears): what must reach the
        database with the batch that changed it, while the baselines may follow later."""
        return tuple(
            (metric, kind, tracker.severity, tracker.clears)
            for metric, state in self.metrics.items()
            if state.trackers
            for kind, tracker in state.trackers.items()
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for a jsonb column)."""
        body: dict[str, Any] = {"version": STATE_VERSION}
        if self.last_ts is not None:
            body["last_ts"] = self.last_ts.isoformat()
        metrics = {name: state.to_json() for name, state in self.metrics.items()}
        body["metrics"] = {name: part for name, part in metrics.items() if part}
        return body

    @classmethod
    def from_own_json(cls, body: Mapping[str, Any]) -> DeviceDetectorState:
        """The state `to_json` wrote in this process (the processor's held states), read back
        without the checks `from_json` makes of a stored one, which were half the time of
        reading a state: a processor with 100,000 devices reads one back for every reading."""
        state = cls()
        last_ts = body.get("last_ts")
        if last_ts is not None:
            state.last_ts = datetime.fromisoformat(last_ts)
        state.metrics = {name: MetricState.from_own_json(part) for name, part in body["metrics"].items()}
        return state

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> DeviceDetectorState:
        """The state `to_json` wrote; anything missing or unreadable starts fresh, never raises."""
        state = cls()
        if not isinstance(body, Mapping):
            return state
        last_ts = body.get("last_ts")
        if isinstance(last_ts, str):
            try:
                parsed = datetime.fromisoformat(last_ts)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                state.last_ts = parsed
        metrics = body.get("metrics")
        if isinstance(metrics, Mapping):
            for name, part in metrics.items():
                if isinstance(name, str) and isinstance(part, Mapping):
                    state.metrics[name] = MetricState.from_json(part)
        return state


def _is_number(value: object) -> TypeGuard[float]:
    # By exact type, not isinstance: a JSON number is an int or a float, never a subclass (a bool
    # is one, and is not a number here), and the exact test is several times faster.
    return type(value) in _NUMBER_TYPES and math.isfinite(value)  # type: ignore[arg-type]


def _history(samples: list[Any], end_ms: int) -> list[tuple[int, float]]:
    """History samples written as [offset from `end_ms`, value] pairs, oldest first; none if any
    is unreadable (checked with C-level loops: a history is read back for every device of every
    batch, and checking it sample by sample was a third of reading a state)."""
    if not samples:
        return []
    if not set(map(type, samples)) <= _LIST_TYPE or set(map(len, samples)) != _PAIR:
        return []
    offsets, values = zip(*samples, strict=True)
    if not set(map(type, offsets)) <= _INT_TYPE:
        return []
    floats = _finite_numbers(list(values))
    if floats is None or not all(map(operator.le, offsets, offsets[1:])):
        return []
    return list(zip(map(end_ms.__add__, offsets), floats, strict=True))


def _finite_numbers(values: list[Any]) -> list[float] | None:
    """The values as floats if they are all finite numbers (checked with C-level loops: a daily
    profile is read back for every device of every batch)."""
    if not set(map(type, values)) <= _NUMBER_TYPES:
        return None
    floats = list(map(float, values))
    return floats if all(map(math.isfinite, floats)) else None


_NUMBER_TYPES = frozenset({float, int})
_INT_TYPE = frozenset({int})
_LIST_TYPE = frozenset({list})
_PAIR = frozenset({2})


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int
