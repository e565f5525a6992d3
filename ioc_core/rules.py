"""Alarm rules: severities, the per-metric rule set a domain declares and a device overrides key by
key through its `thresholds`, and the parameters of district-wide flood correlation.

Pure and import-free within the kernel, so that the domain modules can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from ioc_core.domains.base import Domain

# The one place the severity order is written, mildest first: `SEVERITIES`, `severity_rank`, the
# alarm and webhook models and the SQL that compares severities are all derived from it.
Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[str, ...] = get_args(Severity)
_SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


def severity_rank(severity: str | None) -> int:
    """Position in `SEVERITIES`; -1 for no (or an unknown) severity, so any severity outranks none."""
    if severity is None:
        return -1
    return _SEVERITY_RANK.get(severity, -1)


def worst_severity(first: str | None, second: str | None) -> str | None:
    return second if severity_rank(second) > severity_rank(first) else first


# Keys a device may set per metric in its `thresholds`; a null value switches that part off.
LIMIT_KEYS = ("warn_above", "crit_above", "warn_below", "crit_below")
RULE_KEYS = (
    *LIMIT_KEYS,
    "hysteresis",
    "rise_above",
    "drop_above",
    "rate_window_s",
    "zscore",
    "zscore_floor",
    "flatline_s",
)
# Quantities that are sizes, durations or factors rather than limits on the value itself.
_POSITIVE_KEYS = frozenset({"rise_above", "drop_above", "rate_window_s", "zscore", "flatline_s"})
_NON_NEGATIVE_KEYS = frozenset({"hysteresis", "zscore_floor"})


def rule_value_problem(key: str, value: float | None) -> str | None:
    """Why `value` cannot be a device's setting for rule `key`, or None if it can."""
    if key not in RULE_KEYS:
        return f"unknown rule {key!r}; known: {', '.join(RULE_KEYS)}"
    if value is None:
        return None
    if not math.isfinite(value):
        return "must be finite"
    if key in _POSITIVE_KEYS and value <= 0:
        return "must be greater than 0"
    if key in _NON_NEGATIVE_KEYS and value < 0:
        return "must not be negative"
    return None


def accepted_settings(overrides: Mapping[str, object]) -> dict[str, float | None]:
    """The settings of one metric that take effect: known keys with a null or a valid number."""
    changes: dict[str, float | None] = {}
    for key, value in overrides.items():
        if value is None:
            if key in RULE_KEYS:
                changes[key] = None
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and rule_value_problem(key, float(value)) is None
        ):
            changes[key] = float(value)
    return changes


@dataclass(frozen=True, slots=True)
class MetricRules:
    """What counts as alarming for one metric of one device, in the metric's unit.

    `hysteresis`: a threshold alarm clears only once the value is back inside the limit by this much.
    `rise_above` / `drop_above`: largest change allowed within `rate_window_s` seconds.
    `zscore`: how many standard deviations from the device's own recent level is unusual;
    `zscore_floor` is the smallest standard deviation assumed, so a near-constant signal does not
    alarm on tiny changes. `flatline_s`: how long the exact same value may repeat before the
    sensor counts as stuck.
    """

    warn_above: float | None = None
    crit_above: float | None = None
    warn_below: float | None = None
    crit_below: float | None = None
    hysteresis: float | None = None
    rise_above: float | None = None
    drop_above: float | None = None
    rate_window_s: float | None = 600.0
    zscore: float | None = None
    zscore_floor: float | None = None
    flatline_s: float | None = None

    def overridden(self, overrides: Mapping[str, object]) -> MetricRules:
        """These rules with a device's settings for this metric applied. Keys this version does not
        know and values that are not numbers (stored long ago, say) are ignored rather than refused."""
        changes = accepted_settings(overrides)
        return replace(self, **changes) if changes else self

    @property
    def has_limits(self) -> bool:
        return any(getattr(self, key) is not None for key in LIMIT_KEYS)

    @property
    def has_rate(self) -> bool:
        return self.rate_window_s is not None and (self.rise_above is not None or self.drop_above is not None)

    @property
    def has_zscore(self) -> bool:
        return self.zscore is not None

    @property
    def has_flatline(self) -> bool:
        return self.flatline_s is not None

    @property
    def is_idle(self) -> bool:
        return not (self.has_limits or self.has_rate or self.has_zscore or self.has_flatline)

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class DistrictCorrelation:
    """When several stations of one district see rain and rising water at once, the district is at
    risk even while no single station has crossed a limit.

    A station qualifies when `rain_metric` is at least `rain_at_least` and `level_metric` has risen
    by at least `rise_at_least` within `window_s` seconds (or is above the station's warn level).
    The district alarms when `min_stations` qualify; a station's report counts for `fresh_s` seconds.
    """

    rain_metric: str
    level_metric: str
    rain_at_least: float
    rise_at_least: float
    window_s: float = 1800.0
    min_stations: int = 2
    fresh_s: float = 900.0


def rules_for(domain: Domain, thresholds: Mapping[str, Mapping[str, object]]) -> dict[str, MetricRules]:
    """Every metric of `domain` with its rules: the domain's defaults, overridden key by key by a
    device's `thresholds` (settings for metrics the domain does not have are ignored)."""
    merged: dict[str, MetricRules] = {}
    for metric in domain.metrics:
        rules = domain.default_rules.get(metric.name, MetricRules())
        overrides = thresholds.get(metric.name)
        if isinstance(overrides, Mapping):
            rules = rules.overridden(overrides)
        merged[metric.name] = rules
    return merged


# Rules at run time. A device's rules are its domain's defaults with layers of settings laid over
# them key by key, each layer a mapping {metric: {key: value or null}} like a device's
# `thresholds`; a later layer wins. In order: the city's override, the overrides of the areas the
# device lies in (the largest first, so the most local one wins; see storage.rules), the device's
# registered `thresholds`, and last its own override. The device's override wins over its
# thresholds: the thresholds are what it was registered (and calibrated) with, an override is a
# change made while it runs, versioned and audited, which removing returns to the thresholds.
DOMAIN_SOURCE = "domain"
CITY_SOURCE = "city"
THRESHOLDS_SOURCE = "thresholds"
DEVICE_SOURCE = "device"
AREA_SOURCE_PREFIX = "area:"


@dataclass(frozen=True, slots=True)
class RuleLayer:
    """Settings laid over a domain's defaults, and where they come from: `city`, `area:{id}`,
    `thresholds` (the device's registered ones) or `device` (its override)."""

    source: str
    settings: Mapping[str, Mapping[str, object]]

    @property
    def is_device_own(self) -> bool:
        return self.source in (THRESHOLDS_SOURCE, DEVICE_SOURCE)


def device_layers(
    overrides: Sequence[RuleLayer], thresholds: Mapping[str, Mapping[str, object]]
) -> list[RuleLayer]:
    """The layers of one device, in order: its overrides (city, areas, device, as stored) with its
    registered `thresholds` put in just below its own override."""
    layers = [layer for layer in overrides if layer.source != DEVICE_SOURCE]
    if thresholds:
        layers.append(RuleLayer(THRESHOLDS_SOURCE, thresholds))
    layers.extend(layer for layer in overrides if layer.source == DEVICE_SOURCE)
    return layers


def layered_rules(domain: Domain, layers: Sequence[RuleLayer]) -> dict[str, MetricRules]:
    """Every metric of `domain` with its rules: the defaults with `layers` laid over them in order."""
    merged = rules_for(domain, {})
    for layer in layers:
        for name, rules in merged.items():
            overrides = layer.settings.get(name)
            if isinstance(overrides, Mapping):
                merged[name] = rules.overridden(overrides)
    return merged


@dataclass(frozen=True, slots=True)
class SourcedValue:
    value: float | None
    source: str


def rule_sources(domain: Domain, layers: Sequence[RuleLayer]) -> dict[str, dict[str, SourcedValue]]:
    """Per metric and rule key, the value in force and the layer it comes from (`domain` for a
    default): what `layered_rules` computes, explained."""
    explained: dict[str, dict[str, SourcedValue]] = {}
    for metric in domain.metrics:
        defaults = domain.default_rules.get(metric.name, MetricRules()).as_dict()
        values = {key: SourcedValue(value, DOMAIN_SOURCE) for key, value in defaults.items()}
        for layer in layers:
            overrides = layer.settings.get(metric.name)
            if isinstance(overrides, Mapping):
                for key, value in accepted_settings(overrides).items():
                    values[key] = SourcedValue(value, layer.source)
        explained[metric.name] = values
    return explained


def settings_problems(
    domain: Domain, settings: Mapping[str, Mapping[str, float | None]], *, name: str = "thresholds"
) -> list[tuple[tuple[str, ...], str]]:
    """Why `settings` ({metric: {key: value}}) cannot be rules of `domain`, as (where, what) pairs;
    empty when they can. The checks a device's `thresholds` get, for overrides at any level."""
    problems: list[tuple[tuple[str, ...], str]] = []
    for metric_name, limits in settings.items():
        if domain.metric(metric_name) is None:
            problems.append(((metric_name,), f"{name} name {metric_name!r}, not a {domain.name} metric"))
            continue
        for key, value in limits.items():
            problem = rule_value_problem(key, value)
            if problem is not None:
                problems.append(((metric_name, key), f"{name}.{metric_name}.{key} {problem}"))
    return problems
