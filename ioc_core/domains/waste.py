"""Waste bins with fill-level sensors (FIWARE WasteContainer)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, clamp
from ioc_core.kpis import DeviceSnapshot, Kpi, average, count
from ioc_core.rules import MetricRules

FILLING = Metric(
    "fillingLevel",
    "fraction",
    0,
    1,
    "how full the bin is",
    label_en="Bin fill level",
    label_vi="Mức đầy thùng rác",
)
TEMPERATURE = Metric(
    "temperature",
    "°C",
    -40,
    120,
    "temperature inside the bin (fire risk)",
    label_en="Temperature inside the bin",
    label_vi="Nhiệt độ trong thùng rác",
    decimals=1,
)


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Bins fill through the day and are emptied by the night round at 22:00, the fullest at about
    # three quarters: on a normal day the round comes before any bin needs an extra collection.
    hours_since_round = (t.hour + t.minute / 60 - 22) % 24
    filling = (0.05 + 0.021 * hours_since_round) * (0.7 + 0.6 * phase) + rng.gauss(0, 0.01)
    temperature = 28 + 4 * phase + rng.gauss(0, 0.5)
    return {
        FILLING.name: round(clamp(filling, FILLING), 3),
        TEMPERATURE.name: round(clamp(temperature, TEMPERATURE), 1),
    }


# Collection crews are sent to bins at 80 % and above.
FULL_AT = 0.8


def _full(device: DeviceSnapshot) -> bool:
    level = device.metrics.get(FILLING.name)
    return level is not None and level >= FULL_AT


DOMAIN = Domain(
    name="waste",
    title_en="Waste collection",
    title_vi="Thu gom rác thải",
    metrics=(FILLING, TEMPERATURE),
    offline_after=timedelta(minutes=30),
    # A full bin can wait for the next round; an hour without anyone looking is worth a call.
    escalate_after=timedelta(minutes=60),
    sampler=_sample,
    default_rules={
        # Emptying drops the level to near zero every night, so a jump in the level is normal.
        FILLING.name: MetricRules(warn_above=0.8, crit_above=0.95, hysteresis=0.05),
        # A fire shows as heat climbing fast, before the absolute limits are reached.
        TEMPERATURE.name: MetricRules(
            warn_above=60, crit_above=80, hysteresis=2, rise_above=15, zscore=6.0, zscore_floor=1.5
        ),
    },
    kpis=(
        Kpi("bins_full", "Bins at least 80 % full", "Thùng đầy từ 80 %", None, count(_full)),
        Kpi("average_filling", "Average filling", "Mức đầy trung bình", "fraction", average(FILLING.name)),
    ),
)
