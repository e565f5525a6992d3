"""Electric distribution grid: voltage, frequency and load at feeders and substations."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, clamp, daily_cycle
from ioc_core.kpis import Kpi, average, count, past_limit
from ioc_core.rules import MetricRules

VOLTAGE = Metric("voltage", "V", 0, 1000, "phase voltage", label_en="Voltage", label_vi="Điện áp", decimals=1)
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
)


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Evening peak (air conditioning, cooking) pulls voltage down a little, staying well inside the
    # regulated band as a healthy feeder does.
    load = 0.35 + 0.65 * daily_cycle(t, (11.5, 19.5), width_h=3)
    return {
        VOLTAGE.name: round(clamp(230 - 6 * load + rng.gauss(0, 1.0), VOLTAGE), 1),
        FREQUENCY.name: round(clamp(50 + rng.gauss(0, 0.02), FREQUENCY), 3),
        ACTIVE_POWER.name: round(clamp((200 + 800 * phase) * load + rng.gauss(0, 10), ACTIVE_POWER), 1),
    }


DOMAIN = Domain(
    name="grid",
    title_en="Electric grid",
    title_vi="Lưới điện",
    metrics=(VOLTAGE, FREQUENCY, ACTIVE_POWER),
    offline_after=timedelta(minutes=5),
    escalate_after=timedelta(minutes=10),
    sampler=_sample,
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
