"""What a batch of readings did to each rule of a device, and the findings that says."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ioc_core.alarms import Finding
from ioc_core.rules import severity_rank
from processors.detection.findings import metric_of
from processors.detection.judgements import RATE, THRESHOLD, ZSCORE, Violation
from processors.detection.messages import (
    Texts,
    flatline_texts,
    rate_texts,
    recovered_texts,
    threshold_texts,
    zscore_texts,
)
from processors.detection.profile import DeviceProfile
from processors.detection.state import DeviceDetectorState


@dataclass(slots=True)
class _RuleOutcome:
    """One rule's violations and resolution within a batch."""

    repeats: int = 0
    worst: Violation | None = None
    last_at: datetime | None = None
    # Violations before the rule resolved in this batch: they belong to the alarm it resolved.
    earlier_repeats: int = 0
    earlier_worst: Violation | None = None
    earlier_last_at: datetime | None = None
    resolved_at: datetime | None = None
    resolved_value: float | None = None

    def violation(self, violation: Violation, at: datetime) -> None:
        self.repeats += 1
        self.worst = _worse(self.worst, violation)
        self.last_at = at

    def resolution(self, at: datetime, value: float | None) -> None:
        if self.repeats:
            self.earlier_worst = _worse(self.earlier_worst, self.worst)
            self.earlier_repeats += self.repeats
            self.earlier_last_at = self.last_at
            self.repeats, self.worst, self.last_at = 0, None, None
        self.resolved_at, self.resolved_value = at, value


def _worse(first: Violation | None, second: Violation | None) -> Violation | None:
    """The more severe of two violations; the later one (`second`) on a tie, as the more current."""
    if first is None:
        return second
    if second is None:
        return first
    return second if severity_rank(second.severity) >= severity_rank(first.severity) else first


@dataclass(frozen=True, slots=True)
class MetricScore:
    """How anomalous one value of a metric was, in [0, 1) (0.5 at the statistical alarm limit)."""

    metric: str
    at: datetime
    score: float


class BatchOutcome:
    """Collects violations and resolutions by (detector kind, metric) while a batch is evaluated,
    and the values' anomaly scores when asked to."""

    __slots__ = ("_rules", "_scores")

    def __init__(self, scores: list[MetricScore] | None = None) -> None:
        self._rules: dict[tuple[str, str], _RuleOutcome] = {}
        self._scores = scores

    def score(self, metric: str, at: datetime, score: float) -> None:
        if self._scores is not None:
            self._scores.append(MetricScore(metric, at, score))

    def violation(self, kind: str, metric: str, violation: Violation, at: datetime) -> None:
        outcome = self._rules.get((kind, metric))
        if outcome is None:
            outcome = self._rules[(kind, metric)] = _RuleOutcome()
        outcome.violation(violation, at)

    def resolution(self, kind: str, metric: str, at: datetime, value: float | None) -> None:
        self._rules.setdefault((kind, metric), _RuleOutcome()).resolution(at, value)

    def findings(self, profile: DeviceProfile, state: DeviceDetectorState) -> list[Finding]:
        """At most one active and one inactive finding per rule, the one matching the rule's state
        at the end of the batch last.

        The rules judging one metric's value share one alarm, so the order across rules matters
        too: first the recoveries of rules that broke again later in the batch (they close what was
        open before), then every violation, then the recoveries of rules that end the batch in
        band. An excursion that one rule keeps open while another recovers stays one alarm; one
        that every rule left by the batch's end resolves."""
        closing: list[Finding] = []
        raised: list[Finding] = []
        recovered: list[Finding] = []
        for (kind, name), outcome in self._rules.items():
            metric_state = state.metrics.get(name)
            if metric_state is not None and kind in metric_state.trackers:
                if outcome.resolved_at is not None:
                    closing.append(
                        _recovered(profile, kind, name, outcome.resolved_at, outcome.resolved_value)
                    )
                if outcome.worst is not None and outcome.last_at is not None:
                    raised.append(
                        _raised(profile, kind, name, outcome.worst, outcome.repeats, outcome.last_at)
                    )
                continue
            worst = _worse(outcome.earlier_worst, outcome.worst)
            last_at = outcome.last_at or outcome.earlier_last_at
            if worst is not None and last_at is not None:
                repeats = outcome.earlier_repeats + outcome.repeats
                raised.append(_raised(profile, kind, name, worst, repeats, last_at))
            if outcome.resolved_at is not None:
                recovered.append(_recovered(profile, kind, name, outcome.resolved_at, outcome.resolved_value))
        return closing + raised + recovered


def _raised(
    profile: DeviceProfile, kind: str, name: str, violation: Violation, repeats: int, at: datetime
) -> Finding:
    return _finding(
        profile,
        kind,
        name,
        active=True,
        severity=violation.severity,
        value=violation.value,
        threshold=violation.threshold,
        repeats=repeats,
        at=at,
        texts=_violation_texts(profile, kind, name, violation),
    )


def _recovered(profile: DeviceProfile, kind: str, name: str, at: datetime, value: float | None) -> Finding:
    return _finding(
        profile,
        kind,
        name,
        active=False,
        severity=None,
        value=value,
        threshold=None,
        repeats=0,
        at=at,
        texts=recovered_texts(profile.place, metric_of(profile, name), value, kind),
    )


def _finding(
    profile: DeviceProfile,
    kind: str,
    name: str,
    *,
    active: bool,
    severity: str | None,
    value: float | None,
    threshold: float | None,
    repeats: int,
    at: datetime,
    texts: Texts,
) -> Finding:
    return Finding(
        subject=profile.id,
        device_id=profile.id,
        city=profile.city,
        domain=profile.domain,
        district=profile.district,
        rule=f"{kind}.{name}",
        metric=name,
        active=active,
        severity=severity,
        value=value,
        threshold=threshold,
        repeats=repeats,
        at=at,
        message_vi=texts[0],
        message_en=texts[1],
    )


def _violation_texts(profile: DeviceProfile, kind: str, name: str, violation: Violation) -> Texts:
    metric = metric_of(profile, name)
    place = profile.place
    if kind == THRESHOLD and violation.threshold is not None:
        return threshold_texts(
            place,
            metric,
            violation.reading,
            violation.threshold,
            above=violation.upward,
            severity=violation.severity,
        )
    if kind == RATE and violation.threshold is not None:
        return rate_texts(
            place,
            metric,
            violation.value,
            violation.threshold,
            rise=violation.upward,
            now=violation.reading,
            window_s=violation.reference,
        )
    if kind == ZSCORE:
        return zscore_texts(place, metric, violation.reading, violation.reference, violation.deviations)
    return flatline_texts(place, metric, violation.reading, violation.reference)
