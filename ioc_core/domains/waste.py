"""Waste bins with fill-level sensors (FIWARE WasteContainer)."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

from ioc_core.domains.base import (
    BATTERY,
    ChecklistStep,
    Domain,
    IncidentProcedure,
    Metric,
    clamp,
    daily_cycle,
    local_hour,
    smoothstep,
)
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


def _production(hour: float) -> float:
    """How fast a neighbourhood throws waste away at a local hour: little at night, most from the
    morning market to the evening meal."""
    day = smoothstep((hour - 5.0) / 1.5) * (1 - smoothstep((hour - 21.0) / 1.5))
    return 0.12 + 0.88 * day + 0.4 * math.exp(-(((hour - 18.5) / 1.2) ** 2))


# Cumulative production over a day in five-minute steps, to fill bins without integrating per sample.
_STEPS_PER_HOUR = 12
_CUMULATIVE = [0.0]
for _step in range(24 * _STEPS_PER_HOUR):
    _CUMULATIVE.append(_CUMULATIVE[-1] + _production((_step + 0.5) / _STEPS_PER_HOUR) / _STEPS_PER_HOUR)
_PER_DAY = _CUMULATIVE[-1]


def _produced_since(start_h: float, hour: float) -> float:
    """Share of a day's waste produced from local hour `start_h` up to `hour` (wrapping midnight)."""

    def upto(h: float) -> float:
        position = (h % 24) * _STEPS_PER_HOUR
        index = min(int(position), len(_CUMULATIVE) - 2)
        return _CUMULATIVE[index] + (position - index) * (_CUMULATIVE[index + 1] - _CUMULATIVE[index])

    produced = upto(hour) - upto(start_h)
    return (produced if produced >= 0 else produced + _PER_DAY) / _PER_DAY


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Bins fill through the day and are emptied by the evening collection round, which reaches each
    # bin at its own time between 19:00 and 23:00 (`phase`). A bin fills 40 to 65 % of its volume a
    # day, so the round always comes before it needs an extra collection.
    hour = local_hour(t)
    round_h = 19.0 + 4.0 * phase
    left_after_round = 0.02 + 0.03 * phase
    filling = left_after_round + (0.40 + 0.25 * phase) * _produced_since(round_h, hour) + rng.gauss(0, 0.008)
    # Inside a closed bin in the sun: the day's heat, plus a little from the rotting waste.
    temperature = 26 + 2 * phase + 6 * daily_cycle(t, (14.0,), width_h=4.0) + rng.gauss(0, 0.4)
    return {
        FILLING.name: round(clamp(filling, FILLING), 3),
        TEMPERATURE.name: round(clamp(temperature, TEMPERATURE), 1),
        # A sensor that wakes a few times an hour lasts years on its battery.
        BATTERY.name: round(clamp(0.55 + 0.4 * phase + rng.gauss(0, 0.002), BATTERY), 3),
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
    procedure=IncidentProcedure(
        kind="waste",
        title_vi="Sự cố thu gom rác",
        title_en="Waste collection incident",
        escalate_after=timedelta(minutes=120),
        checklist=(
            ChecklistStep(
                "reroute-truck", "Điều xe thu gom đến điểm đầy", "Route a collection truck to the full bins"
            ),
            ChecklistStep("check-site", "Kiểm tra hiện trường", "Inspect the site"),
        ),
    ),
    sampler=_sample,
    sites=("market", "road"),
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
