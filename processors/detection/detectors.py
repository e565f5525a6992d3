"""The per-device detectors and the rule tracker they share.

For every reading and metric, each detector the metric's rules switch on judges the value:

- threshold: above or below the warn (severity medium) or crit (critical) limits; an open alarm
  holds while the value is within `hysteresis` of the limit on the inside;
- rate: risen or fallen by more than `rise_above` / `drop_above` within `rate_window_s` (high);
- zscore: further than `zscore` standard deviations from the device's own exponentially weighted
  mean (low); silent during warm-up, and silent while a limit or rate alarm of the same metric
  already tells the operator about the value;
- flatline: the exact same value for `flatline_s` and at least a few readings (low).

A tracker per (metric, detector) turns those judgements into alarms: the first violation raises,
later ones repeat (escalating the severity), and only `clear_after` in-band readings in a row
resolve it, so a value hovering around a limit is one alarm with repeats rather than one per crossing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from ioc_core.alarms import Finding
from ioc_core.domains import get_domain
from ioc_core.rules import MetricRules, worst_severity
from ioc_core.telemetry import Reading
from processors.detection.judgements import (
    CLEAR,
    FLATLINE,
    FLATLINE_SEVERITY,
    HOLD,
    RATE,
    THRESHOLD,
    ZSCORE,
    ZSCORE_SEVERITY,
    Observation,
    Violation,
    by_limits,
    by_rate,
    remember,
)
from processors.detection.outcomes import BatchOutcome, MetricScore
from processors.detection.profile import DeviceProfile
from processors.detection.state import DeviceDetectorState, MetricState, RuleTracker, epoch_ms

# Below this the spread of a signal is numerically zero (reached only when a device removes the floor).
_SMALLEST_SPREAD = 1e-9


@dataclass(frozen=True, slots=True)
class DetectionSettings:
    """Parameters shared by every device."""

    # In-band readings in a row that resolve an open alarm.
    clear_after: int = 3
    # Weight of the newest value in the exponentially weighted mean and variance (about the last
    # 1 / alpha readings count).
    ewma_alpha: float = 0.05
    # Readings a metric must have shown before its statistics may alarm.
    warmup: int = 30
    # Readings of the same value, besides `flatline_s`, before a sensor counts as stuck. A device that
    # reports every few minutes repeats a value now and then by chance; five in a row it does not.
    flatline_min_readings: int = 5
    # Most samples of history kept per metric (down-sampled evenly over the history's reach).
    history_samples: int = 32
    # Relative difference under which two readings are the same value.
    same_value_tolerance: float = 1e-9


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to do with one metric of one device, derived once from its rules."""

    rules: MetricRules
    kinds: tuple[str, ...]
    rate_ms: int | None
    # How far back the metric's history reaches (0: none kept), and the spacing of its samples.
    reach_ms: int
    spacing_ms: int
    flatline_ms: int | None


@lru_cache(maxsize=4096)
def _plan(domain_name: str, metric: str, rules: MetricRules, settings: DetectionSettings) -> _Plan | None:
    """None for a metric nothing watches."""
    switched_on = (
        (THRESHOLD, rules.has_limits),
        (RATE, rules.has_rate),
        (ZSCORE, rules.has_zscore),
        (FLATLINE, rules.has_flatline),
    )
    kinds = tuple(kind for kind, on in switched_on if on)
    rate_ms = round(rules.rate_window_s * 1000) if rules.has_rate and rules.rate_window_s else None
    reach_ms = rate_ms or 0
    correlated = False
    domain = get_domain(domain_name)
    if domain is not None and domain.correlation is not None:
        correlation = domain.correlation
        correlated = metric in (correlation.level_metric, correlation.rain_metric)
        if metric == correlation.level_metric:
            # District correlation reads the level's rise from the same history.
            reach_ms = max(reach_ms, round(correlation.window_s * 1000))
    if not kinds and not correlated:
        return None
    return _Plan(
        rules=rules,
        kinds=kinds,
        rate_ms=rate_ms,
        reach_ms=reach_ms,
        spacing_ms=reach_ms // max(settings.history_samples, 1),
        flatline_ms=round(rules.flatline_s * 1000) if rules.flatline_s is not None else None,
    )


class DeviceDetection:
    """Runs every per-device detector. Pure: no I/O; all memory is in the `DeviceDetectorState`."""

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        self.settings = settings or DetectionSettings()
        self._ewma_count_cap = max(self.settings.warmup, math.ceil(1 / self.settings.ewma_alpha))

    def evaluate(
        self,
        profile: DeviceProfile,
        readings: Sequence[Reading],
        state: DeviceDetectorState,
        *,
        scores: list[MetricScore] | None = None,
    ) -> list[Finding]:
        """Judge one batch of a device's readings (in any order), updating `state`.

        Readings at or before `state.last_ts` are skipped untouched: late, or replayed after a
        restart. Returns at most one active and one inactive finding per rule; when a rule both
        raised and resolved in the batch the active finding comes first, and when it resolved and
        raised again the inactive one does, so the last finding of a rule tells its state now.
        With `scores`, each statistically judged value's anomaly score is appended to it.
        """
        if not readings:
            return []
        plans = {
            name: _plan(profile.domain, name, rules, self.settings) for name, rules in profile.rules.items()
        }
        outcome = BatchOutcome(scores)
        last_ts = state.last_ts
        ordered = sorted(readings, key=_reading_ts) if len(readings) > 1 else readings
        for reading in ordered:
            at = reading.ts
            if last_ts is not None and at <= last_ts:
                continue
            last_ts = at
            at_ms = epoch_ms(at)
            for name, value in reading.metrics.items():
                plan = plans.get(name)
                if plan is not None:
                    self._observe(plan, name, state.metric(name), value, at, at_ms, outcome)
                elif (unwatched := state.metrics.get(name)) is not None and unwatched.trackers:
                    _resolve_switched_off(name, unwatched, (), value, at, outcome)
        state.last_ts = last_ts
        return outcome.findings(profile, state)

    def _observe(
        self,
        plan: _Plan,
        name: str,
        metric: MetricState,
        value: float,
        at: datetime,
        at_ms: int,
        outcome: BatchOutcome,
    ) -> None:
        rules, kinds, trackers = plan.rules, plan.kinds, metric.trackers
        previous = metric.last
        metric.last, metric.last_at_ms = value, at_ms
        limits_say: Observation = None
        rate_says: Observation = None
        if THRESHOLD in kinds:
            limits_say = by_limits(rules, value, THRESHOLD in trackers)
            self._track(THRESHOLD, name, metric, limits_say, at, value, outcome)
        if plan.reach_ms:
            if plan.rate_ms is not None:
                rate_says = by_rate(rules, plan.rate_ms, metric.history, value, at_ms)
                self._track(RATE, name, metric, rate_says, at, value, outcome)
            remember(
                metric.history,
                at_ms,
                value,
                reach_ms=plan.reach_ms,
                spacing_ms=plan.spacing_ms,
                most=self.settings.history_samples,
            )
        if ZSCORE in kinds:
            statistics_say, score = self._by_statistics(rules, metric, value)
            if score is not None:
                outcome.score(name, at, score)
            if isinstance(statistics_say, Violation) and (
                isinstance(limits_say, Violation)
                or isinstance(rate_says, Violation)
                or THRESHOLD in trackers
                or RATE in trackers
            ):
                # The limit or rate alarm already tells the operator about this value.
                statistics_say = HOLD
            self._track(ZSCORE, name, metric, statistics_say, at, value, outcome)
        if plan.flatline_ms is not None:
            flatline_says = self._by_flatline(plan.flatline_ms, metric, previous, value, at_ms)
            self._track(FLATLINE, name, metric, flatline_says, at, value, outcome)
        if trackers and any(kind not in kinds for kind in trackers):
            _resolve_switched_off(name, metric, kinds, value, at, outcome)

    def _track(
        self,
        kind: str,
        name: str,
        metric: MetricState,
        observation: Observation,
        at: datetime,
        value: float,
        outcome: BatchOutcome,
    ) -> None:
        if observation is None:
            return
        tracker = metric.trackers.get(kind)
        if isinstance(observation, Violation):
            if tracker is None:
                metric.trackers[kind] = RuleTracker(severity=observation.severity)
            else:
                tracker.clears = 0
                tracker.severity = worst_severity(tracker.severity, observation.severity) or tracker.severity
            outcome.violation(kind, name, observation, at)
        elif tracker is not None:
            if observation is HOLD:
                tracker.clears = 0
                return
            tracker.clears += 1
            if tracker.clears >= self.settings.clear_after:
                del metric.trackers[kind]
                outcome.resolution(kind, name, at, value)

    def _by_statistics(
        self, rules: MetricRules, metric: MetricState, value: float
    ) -> tuple[Observation, float | None]:
        """The judgement, and the value's anomaly score in [0, 1) once warmed up: |z| / (|z| +
        limit), so 0.5 is the alarm limit and the score grows with the deviation without bound."""
        limit = rules.zscore
        if limit is None:
            return None, None
        observation: Observation = None
        score: float | None = None
        learned = value
        if metric.count >= self.settings.warmup:
            mean = metric.mean
            spread = max(math.sqrt(metric.variance), rules.zscore_floor or 0.0, _SMALLEST_SPREAD)
            deviations = (value - mean) / spread
            score = abs(deviations) / (abs(deviations) + limit)
            edge = limit * spread
            if abs(deviations) > limit:
                upward = deviations > 0
                observation = Violation(
                    severity=ZSCORE_SEVERITY,
                    value=value,
                    threshold=mean + edge if upward else mean - edge,
                    reading=value,
                    upward=upward,
                    reference=mean,
                    deviations=abs(deviations),
                )
            else:
                observation = CLEAR
            # Learn from the value clipped to the band, so one spike does not blind the detector.
            learned = min(max(value, mean - edge), mean + edge)
        # Until the weight 1/n falls below alpha this is the plain mean and variance of the values.
        alpha = max(self.settings.ewma_alpha, 1 / (metric.count + 1))
        difference = learned - metric.mean
        increment = alpha * difference
        metric.mean += increment
        metric.variance = (1 - alpha) * (metric.variance + difference * increment)
        metric.count = min(metric.count + 1, self._ewma_count_cap)
        return observation, score

    def _by_flatline(
        self, flatline_ms: int, metric: MetricState, previous: float | None, value: float, at_ms: int
    ) -> Observation:
        tolerance = self.settings.same_value_tolerance * max(1.0, abs(value))
        if previous is not None and metric.flat_since_ms is not None and abs(value - previous) <= tolerance:
            metric.flat_count += 1
        else:
            metric.flat_since_ms, metric.flat_count = at_ms, 1
        held_ms = at_ms - metric.flat_since_ms
        if metric.flat_count >= self.settings.flatline_min_readings and held_ms >= flatline_ms:
            return Violation(
                severity=FLATLINE_SEVERITY,
                value=value,
                threshold=flatline_ms / 1000,
                reading=value,
                reference=held_ms / 1000,
            )
        return CLEAR


def _resolve_switched_off(
    name: str, metric: MetricState, kinds: tuple[str, ...], value: float, at: datetime, outcome: BatchOutcome
) -> None:
    """Resolve the open alarms of rules the device's settings have switched off since they raised."""
    for kind in [kind for kind in metric.trackers if kind not in kinds]:
        del metric.trackers[kind]
        outcome.resolution(kind, name, at, value)


def _reading_ts(reading: Reading) -> datetime:
    return reading.ts
