"""The domain registry matches the contract's metrics table exactly."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from ioc_core.domains import DOMAINS
from ioc_core.domains.base import LOCAL_TIME

# (domain, metric, unit, min, max) as in the contract's §4 table; batteryLevel belongs to every domain.
CONTRACT = [
    ("traffic", "intensity", "vehicles/min", 0, 1000),
    ("traffic", "occupancy", "fraction", 0, 1),
    ("traffic", "averageVehicleSpeed", "km/h", 0, 250),
    ("waste", "fillingLevel", "fraction", 0, 1),
    ("waste", "temperature", "°C", -40, 120),
    ("water", "pressure", "bar", 0, 25),
    ("water", "flow", "m³/h", 0, 100000),
    ("water", "turbidity", "NTU", 0, 1000),
    ("water", "pH", "", 0, 14),
    ("grid", "voltage", "V", 0, 1000),
    ("grid", "frequency", "Hz", 40, 70),
    ("grid", "activePower", "kW", -100000, 100000),
    ("flood", "currentLevel", "m", -10, 100),
    ("flood", "rainfall", "mm/h", 0, 500),
]


def test_the_five_domains_exist() -> None:
    assert set(DOMAINS) == {"traffic", "waste", "water", "grid", "flood"}


def test_metrics_units_and_ranges_follow_the_contract() -> None:
    expected = {(d, m): (u, lo, hi) for d, m, u, lo, hi in CONTRACT}
    for name in DOMAINS:
        expected[(name, "batteryLevel")] = ("fraction", 0, 1)
    actual = {(d.name, m.name): (m.unit, m.minimum, m.maximum) for d in DOMAINS.values() for m in d.metrics}
    assert actual == expected


def test_columns_are_distinct_safe_identifiers() -> None:
    for domain in DOMAINS.values():
        columns = [m.column for m in domain.metrics]
        assert len(set(columns)) == len(columns)
        assert all(c.isidentifier() and c == c.lower() for c in columns)
    assert DOMAINS["water"].metric("pH") is not None
    assert DOMAINS["water"].metric("pH").column == "ph"  # type: ignore[union-attr]
    assert DOMAINS["traffic"].metric("averageVehicleSpeed").column == "average_vehicle_speed"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_simulated_values_stay_in_range_over_a_day(name: str) -> None:
    domain = DOMAINS[name]
    rng = random.Random(1)
    start = datetime(2026, 7, 1, tzinfo=UTC)
    for minute in range(0, 24 * 60, 7):
        sample = domain.sampler(rng, start + timedelta(minutes=minute), minute / 1440)
        assert sample, "a sampler must produce metrics"
        for metric_name, value in sample.items():
            metric = domain.metric(metric_name)
            assert metric is not None, metric_name
            assert metric.accepts(value), (metric_name, value)


def test_no_domain_jumps_at_midnight() -> None:
    # Every day's rhythm is continuous through 00:00 local time: across it, a 10-second step moves
    # no noiseless quantity by more than a hundredth of its daily range.
    midnight = datetime(2026, 7, 2, tzinfo=LOCAL_TIME)
    for domain in DOMAINS.values():
        day = [domain.sampler(_NoNoise(5), midnight - timedelta(minutes=10 * m), 0.9) for m in range(144)]
        before = domain.sampler(_NoNoise(5), midnight - timedelta(seconds=10), 0.9)
        after = domain.sampler(_NoNoise(5), midnight, 0.9)
        for name in after:
            values = [sample[name] for sample in day]
            spread = max(values) - min(values)
            assert abs(after[name] - before[name]) <= 0.01 * spread + 1e-9, (domain.name, name)


class _NoNoise(random.Random):
    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        return mu
