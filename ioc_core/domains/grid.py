"""Electric distribution grid: voltage, frequency and load at feeders and substations."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, Threshold, clamp, daily_cycle

VOLTAGE = Metric("voltage", "V", 0, 1000, "phase voltage")
FREQUENCY = Metric("frequency", "Hz", 40, 70, "grid frequency")
ACTIVE_POWER = Metric("activePower", "kW", -100_000, 100_000, "active power through the feeder")


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Evening peak (air conditioning, cooking) pulls voltage down a little.
    load = 0.35 + 0.65 * daily_cycle(t, (11.5, 19.5), width_h=3)
    return {
        VOLTAGE.name: round(clamp(230 - 8 * load + rng.gauss(0, 1.2), VOLTAGE), 1),
        FREQUENCY.name: round(clamp(50 + rng.gauss(0, 0.02), FREQUENCY), 3),
        ACTIVE_POWER.name: round(clamp((200 + 800 * phase) * load + rng.gauss(0, 10), ACTIVE_POWER), 1),
    }


DOMAIN = Domain(
    name="grid",
    title_en="Electric grid",
    title_vi="Lưới điện",
    metrics=(VOLTAGE, FREQUENCY, ACTIVE_POWER),
    offline_after=timedelta(minutes=5),
    sampler=_sample,
    default_thresholds={
        # Vietnam's distribution band: 230 V ±5 % warns, ±10 % is critical.
        VOLTAGE.name: Threshold(warn_below=218.5, crit_below=207, warn_above=241.5, crit_above=253),
        FREQUENCY.name: Threshold(warn_below=49.8, crit_below=49.5, warn_above=50.2, crit_above=50.5),
    },
)
