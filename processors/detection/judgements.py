"""How one value is judged against a metric's limits and its recent history, before any tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ioc_core.rules import MetricRules

THRESHOLD: Final = "threshold"
RATE: Final = "rate"
ZSCORE: Final = "zscore"
FLATLINE: Final = "flatline"
DETECTOR_KINDS: Final = (THRESHOLD, RATE, ZSCORE, FLATLINE)

WARN_SEVERITY: Final = "medium"
CRIT_SEVERITY: Final = "critical"
RATE_SEVERITY: Final = "high"
ZSCORE_SEVERITY: Final = "low"
FLATLINE_SEVERITY: Final = "low"


@dataclass(frozen=True, slots=True)
class Violation:
    severity: str
    value: float  # what the finding reports: the reading, or for a rate the change
    threshold: float | None
    reading: float
    # Threshold: above (or below) the limit; rate: a rise (or a drop); zscore: above (or below) the mean.
    upward: bool = True
    # Rate: the window in seconds; zscore: the mean; flatline: seconds the value has held.
    reference: float = 0.0
    deviations: float = 0.0


class Hold:
    """Not a violation, but not back in band either: an open alarm stays open."""


class Clear:
    """Back in band."""


HOLD: Final = Hold()
CLEAR: Final = Clear()
# None: nothing to judge by (no history yet, warming up).
Observation = Violation | Hold | Clear | None


def by_limits(rules: MetricRules, value: float, is_open: bool) -> Observation:
    crit_above, crit_below = rules.crit_above, rules.crit_below
    warn_above, warn_below = rules.warn_above, rules.warn_below
    if crit_above is not None and value > crit_above:
        return Violation(CRIT_SEVERITY, value, crit_above, value, upward=True)
    if crit_below is not None and value < crit_below:
        return Violation(CRIT_SEVERITY, value, crit_below, value, upward=False)
    if warn_above is not None and value > warn_above:
        return Violation(WARN_SEVERITY, value, warn_above, value, upward=True)
    if warn_below is not None and value < warn_below:
        return Violation(WARN_SEVERITY, value, warn_below, value, upward=False)
    if not is_open:
        return CLEAR
    hysteresis = rules.hysteresis or 0.0
    above = [limit for limit in (warn_above, crit_above) if limit is not None]
    if above and value > min(above) - hysteresis:
        return HOLD
    below = [limit for limit in (warn_below, crit_below) if limit is not None]
    if below and value < max(below) + hysteresis:
        return HOLD
    return CLEAR


def by_rate(
    rules: MetricRules, rate_ms: int, history: list[tuple[int, float]], value: float, at_ms: int
) -> Observation:
    """The change against the lowest (for a rise) or highest (for a drop) value of the window."""
    since = at_ms - rate_ms
    lowest = highest = None
    for sample_ms, sample in history:
        if sample_ms < since:
            continue
        if lowest is None or sample < lowest:
            lowest = sample
        if highest is None or sample > highest:
            highest = sample
    if lowest is None or highest is None:
        return None
    window_s = rate_ms / 1000
    if rules.rise_above is not None and value - lowest > rules.rise_above:
        return Violation(
            RATE_SEVERITY, value - lowest, rules.rise_above, value, upward=True, reference=window_s
        )
    if rules.drop_above is not None and highest - value > rules.drop_above:
        return Violation(
            RATE_SEVERITY, highest - value, rules.drop_above, value, upward=False, reference=window_s
        )
    return CLEAR


def remember(
    history: list[tuple[int, float]], at_ms: int, value: float, *, reach_ms: int, spacing_ms: int, most: int
) -> None:
    """Keep the value if the newest kept sample is at least one spacing older, and forget samples
    older than the reach: a few dozen samples per metric whatever the reporting rate."""
    if not history or at_ms - history[-1][0] >= spacing_ms:
        history.append((at_ms, value))
    oldest = at_ms - reach_ms
    stale = 0
    while stale < len(history) and history[stale][0] < oldest:
        stale += 1
    excess = len(history) - most
    if stale or excess > 0:
        del history[: max(stale, excess)]
