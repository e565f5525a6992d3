"""Water supply network: pressure, flow and quality (FIWARE WaterObserved / WaterQualityObserved)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, Threshold, clamp, daily_cycle

PRESSURE = Metric("pressure", "bar", 0, 25, "network pressure")
FLOW = Metric("flow", "m³/h", 0, 100_000, "flow through the pipe")
TURBIDITY = Metric("turbidity", "NTU", 0, 1000, "turbidity of the water")
PH = Metric("pH", "", 0, 14, "acidity of the water")


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Demand peaks morning and evening; pressure sags as demand rises; night flow is the leak floor.
    demand = 0.25 + 0.75 * daily_cycle(t, (6.5, 19.0), width_h=2.5)
    flow = (80 + 400 * phase) * demand + rng.gauss(0, 5)
    pressure = 4.2 - 1.4 * demand + rng.gauss(0, 0.05)
    return {
        PRESSURE.name: round(clamp(pressure, PRESSURE), 3),
        FLOW.name: round(clamp(flow, FLOW), 1),
        TURBIDITY.name: round(clamp(0.6 + rng.gauss(0, 0.1), TURBIDITY), 2),
        PH.name: round(clamp(7.2 + rng.gauss(0, 0.05), PH), 2),
    }


DOMAIN = Domain(
    name="water",
    title_en="Water supply and drainage",
    title_vi="Cấp thoát nước",
    metrics=(PRESSURE, FLOW, TURBIDITY, PH),
    offline_after=timedelta(minutes=10),
    sampler=_sample,
    default_thresholds={
        PRESSURE.name: Threshold(warn_below=1.5, crit_below=0.8),
        TURBIDITY.name: Threshold(warn_above=5, crit_above=10),
        PH.name: Threshold(warn_below=6.5, crit_below=6.0, warn_above=8.5, crit_above=9.0),
    },
)
