"""Electric distribution grid: voltage, frequency and load at feeders and substations."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

from ioc_core.domains.base import (
    ChecklistStep,
    Domain,
    IncidentProcedure,
    Metric,
    clamp,
    daily_cycle,
    daytime,
)
from ioc_core.kpis import Kpi, average, count, past_limit
from ioc_core.rules import MetricRules

VOLTAGE = Metric(
    "voltage",
    "V",
    0,
    1000,
    "phase voltage",
    label_en="Voltage",
    label_vi="Điện áp",
    decimals=1,
    daily_cycle=True,
)
FREQUENCY = Metric(
    "frequency",
    "Hz",
    40,
    70,
    "grid frequency",
    label_en="Grid frequency",
    label_vi="Tần số lưới điện",
    decimals=3,
)
ACTIVE_POWER = Metric(
    "activePower",
    "kW",
    -100_000,
    100_000,
    "active power through the feeder",
    label_en="Active power",
    label_vi="Công suất tác dụng",
    decimals=1,
    daily_cycle=True,
)


def _load(t: datetime) -> float:
    """A city feeder's load as a share of its evening peak: the trough before dawn, offices and air
    conditioning through the day with a bump at noon, and the evening peak (cooking, air conditioning
    at home) from 19:00 to 21:00."""
    day = 0.30 * daytime(t, 6.5, 22.5, ramp_h=2.0)
    noon = 0.10 * daily_cycle(t, (11.5,), width_h=2.0)
    return 0.45 + day + noon + 0.25 * daily_cycle(t, (20.0,), width_h=2.2)


_TROUGH, _PEAK = 0.45, 1.0


def _rating(phase: float) -> float:
    """A feeder's peak load in kW: 0.8 to 6 MW by its `phase`."""
    return 800 + 5200 * phase


def _station_thresholds(phase: float) -> dict[str, dict[str, float | None]]:
    # A feeder's load moves by a few per cent of its rating within minutes as large consumers
    # switch and the daily ramps begin; surprise is measured against that, not a fixed kilowatt.
    return {ACTIVE_POWER.name: {"zscore_floor": round(0.03 * _rating(phase), 1)}}


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # The voltage falls as the load rises (224 V at the evening peak, 232.5 V at night), well inside
    # the ±5 % band as on a healthy feeder; frequency is one for the whole grid, wandering a few
    # hundredths of a hertz as the dispatch centre balances it. `phase` sizes the feeder (0.8 to 6 MW).
    load = _load(t)
    share = (load - _TROUGH) / (_PEAK - _TROUGH)
    rating = _rating(phase)
    minutes = t.timestamp() / 60
    wander = 0.02 * math.sin(2 * math.pi * minutes / 17) + 0.01 * math.sin(2 * math.pi * minutes / 6.3)
    frequency = 50 + wander
    return {
        VOLTAGE.name: round(clamp(232.5 - 8.5 * share + rng.gauss(0, 0.8), VOLTAGE), 1),
        FREQUENCY.name: round(clamp(frequency + rng.gauss(0, 0.006), FREQUENCY), 3),
        ACTIVE_POWER.name: round(clamp(rating * load + rng.gauss(0, 0.008 * rating), ACTIVE_POWER), 1),
    }


DOMAIN = Domain(
    name="grid",
    title_en="Electric grid",
    title_vi="Lưới điện",
    metrics=(VOLTAGE, FREQUENCY, ACTIVE_POWER),
    offline_after=timedelta(minutes=5),
    escalate_after=timedelta(minutes=10),
    procedure=IncidentProcedure(
        kind="power",
        title_vi="Sự cố lưới điện",
        title_en="Power grid incident",
        escalate_after=timedelta(minutes=15),
        checklist=(
            ChecklistStep("isolate-feeder", "Cô lập xuất tuyến bị sự cố", "Isolate the faulty feeder"),
            ChecklistStep("dispatch-crew", "Điều động đội sửa chữa điện", "Dispatch the repair crew"),
            ChecklistStep(
                "notify-critical",
                "Báo bệnh viện và trạm bơm trong khu vực",
                "Notify hospitals and pumping stations in the area",
            ),
        ),
    ),
    sampler=_sample,
    station_thresholds=_station_thresholds,
    sites=("substation",),
    default_rules={
        # Vietnam's distribution band: 230 V ±5 % warns, ±10 % is critical. A live feeder's voltage
        # and frequency never hold the exact same reading for ten minutes.
        VOLTAGE.name: MetricRules(
            warn_below=218.5,
            crit_below=207,
            warn_above=241.5,
            crit_above=253,
            hysteresis=2,
            zscore=6.0,
            zscore_floor=3,
            flatline_s=600,
        ),
        FREQUENCY.name: MetricRules(
            warn_below=49.8,
            crit_below=49.5,
            warn_above=50.2,
            crit_above=50.5,
            hysteresis=0.05,
            zscore=6.0,
            zscore_floor=0.05,
            flatline_s=600,
        ),
        # Load follows the daily curve; only a jump far outside the feeder's own pattern is unusual.
        ACTIVE_POWER.name: MetricRules(zscore=6.0, zscore_floor=30),
    },
    kpis=(
        Kpi(
            "outside_voltage_band",
            "Sensors outside the voltage band",
            "Điểm điện áp ngoài dải",
            None,
            count(past_limit(VOLTAGE.name, "warn_below", "warn_above", "crit_below", "crit_above")),
        ),
        Kpi("average_voltage", "Average voltage", "Điện áp trung bình", "V", average(VOLTAGE.name, 1)),
    ),
)
