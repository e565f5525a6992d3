"""Headline figures of a domain, as an operations-center summary tile shows them.

A domain module lists its KPIs; each is a pure function over the latest state of the devices in
scope, so the same figures come out of the API, a test, or a report, with no SQL of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ioc_core.rules import MetricRules

Limit = Literal["warn_above", "crit_above", "warn_below", "crit_below"]


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device as a KPI sees it: its latest metrics, effective rules and open alarms."""

    device_id: str
    status: str
    metrics: Mapping[str, float]
    rules: Mapping[str, MetricRules]
    open_alarms: Sequence[tuple[str, str | None]] = ()  # (rule, metric)

    @property
    def reporting(self) -> bool:
        """An offline device's last values are history, not the present."""
        return self.status != "offline"


@dataclass(frozen=True, slots=True)
class Figure:
    value: float | None
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class Kpi:
    name: str
    label_en: str
    label_vi: str
    unit: str | None
    compute: Callable[[Sequence[DeviceSnapshot]], Figure]


def _values(devices: Sequence[DeviceSnapshot], metric: str) -> list[tuple[float, str]]:
    return [
        (float(d.metrics[metric]), d.device_id)
        for d in devices
        if d.reporting and isinstance(d.metrics.get(metric), int | float)
    ]


def average(metric: str, decimals: int = 2) -> Callable[[Sequence[DeviceSnapshot]], Figure]:
    def compute(devices: Sequence[DeviceSnapshot]) -> Figure:
        values = [v for v, _ in _values(devices, metric)]
        return Figure(round(sum(values) / len(values), decimals) if values else None)

    return compute


def lowest(metric: str) -> Callable[[Sequence[DeviceSnapshot]], Figure]:
    def compute(devices: Sequence[DeviceSnapshot]) -> Figure:
        values = _values(devices, metric)
        if not values:
            return Figure(None)
        value, device_id = min(values)
        return Figure(value, device_id)

    return compute


def highest(metric: str) -> Callable[[Sequence[DeviceSnapshot]], Figure]:
    def compute(devices: Sequence[DeviceSnapshot]) -> Figure:
        values = _values(devices, metric)
        if not values:
            return Figure(None)
        value, device_id = max(values)
        return Figure(value, device_id)

    return compute


def count(predicate: Callable[[DeviceSnapshot], bool]) -> Callable[[Sequence[DeviceSnapshot]], Figure]:
    def compute(devices: Sequence[DeviceSnapshot]) -> Figure:
        return Figure(float(sum(1 for d in devices if d.reporting and predicate(d))))

    return compute


def past_limit(metric: str, *limits: Limit) -> Callable[[DeviceSnapshot], bool]:
    """The device's latest value is beyond one of its own (effective) limits for `metric`;
    a limit switched off for the device does not count."""

    def check(device: DeviceSnapshot) -> bool:
        value = device.metrics.get(metric)
        rules = device.rules.get(metric)
        if value is None or rules is None:
            return False
        for name in limits:
            limit = getattr(rules, name)
            if limit is None:
                continue
            if name.endswith("_above") and value >= limit:
                return True
            if name.endswith("_below") and value <= limit:
                return True
        return False

    return check


def has_open_alarm(metrics: set[str], rule_prefixes: tuple[str, ...]) -> Callable[[DeviceSnapshot], bool]:
    def check(device: DeviceSnapshot) -> bool:
        return any(
            metric in metrics and rule.startswith(rule_prefixes) for rule, metric in device.open_alarms
        )

    return check
