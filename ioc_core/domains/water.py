"""Water supply network: pressure, flow and quality (FIWARE WaterObserved / WaterQualityObserved)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, clamp, daily_cycle
from ioc_core.kpis import Kpi, count, has_open_alarm, lowest
from ioc_core.rules import MetricRules

PRESSURE = Metric(
    "pressure", "bar", 0, 25, "network pressure", label_en="Water pressure", label_vi="Áp lực nước"
)
FLOW = Metric(
    "flow",
    "m³/h",
    0,
    100_000,
    "flow through the pipe",
    label_en="Water flow",
    label_vi="Lưu lượng nước",
    decimals=1,
)
TURBIDITY = Metric(
    "turbidity", "NTU", 0, 1000, "turbidity of the water", label_en="Turbidity", label_vi="Độ đục"
)
PH = Metric("pH", "", 0, 14, "acidity of the water", label_en="pH", label_vi="Độ pH")


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
    escalate_after=timedelta(minutes=15),
    sampler=_sample,
    default_rules={
        # Demand moves pressure by about 0.1 bar in ten minutes; losing 1.5 bar that fast is a burst
        # main. Network pressure is never exactly constant for half an hour on a working sensor.
        PRESSURE.name: MetricRules(
            warn_below=1.5,
            crit_below=0.8,
            hysteresis=0.1,
            drop_above=1.5,
            zscore=6.0,
            zscore_floor=0.1,
            flatline_s=1800,
        ),
        # Flow follows demand through the day, from the night leak floor to the evening peak.
        FLOW.name: MetricRules(zscore=6.0, zscore_floor=20),
        TURBIDITY.name: MetricRules(
            warn_above=5, crit_above=10, hysteresis=0.5, zscore=6.0, zscore_floor=0.3
        ),
        PH.name: MetricRules(
            warn_below=6.5,
            crit_below=6.0,
            warn_above=8.5,
            crit_above=9.0,
            hysteresis=0.1,
            zscore=6.0,
            zscore_floor=0.15,
        ),
    },
    kpis=(
        Kpi("lowest_pressure", "Lowest pressure", "Áp lực thấp nhất", "bar", lowest(PRESSURE.name)),
        # A leak shows as pressure falling (too low, or dropping fast) or flow rising unexpectedly.
        Kpi(
            "suspected_leaks",
            "Suspected leaks",
            "Nghi rò rỉ",
            None,
            count(has_open_alarm({PRESSURE.name, FLOW.name}, ("threshold.", "rate.", "zscore."))),
        ),
    ),
)
