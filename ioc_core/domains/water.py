"""Water supply network: pressure, flow and quality (FIWARE WaterObserved / WaterQualityObserved)."""

from __future__ import annotations

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
from ioc_core.kpis import Kpi, count, has_open_alarm, lowest
from ioc_core.rules import MetricRules

PRESSURE = Metric(
    "pressure",
    "bar",
    0,
    25,
    "network pressure",
    label_en="Water pressure",
    label_vi="Áp lực nước",
    daily_cycle=True,
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
    daily_cycle=True,
)
TURBIDITY = Metric(
    "turbidity", "NTU", 0, 1000, "turbidity of the water", label_en="Turbidity", label_vi="Độ đục"
)
PH = Metric("pH", "", 0, 14, "acidity of the water", label_en="pH", label_vi="Độ pH")


def _demand(t: datetime) -> float:
    """Water demand as a share of the day's peak: the night minimum (leaks and a few users) from 1:00
    to 4:00, the morning peak at 6:30, the day's plateau, and the evening peak at 19:00."""
    base = 0.30 + 0.65 * daytime(t, 5.0, 22.5, ramp_h=1.5)
    return base + 0.5 * daily_cycle(t, (6.5,), width_h=1.3) + 0.4 * daily_cycle(t, (19.0,), width_h=1.8)


_NIGHT_DEMAND, _PEAK_DEMAND = 0.30, 1.45
# Share of the night pressure lost to friction in the mains at the day's peak demand.
_PEAK_PRESSURE_LOSS = 0.3


def _night_pressure(phase: float) -> float:
    """A station's pressure at the night minimum of demand, its highest: 3 to 4.5 bar."""
    return 3.0 + 1.5 * phase


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # A metering point on a distribution main: flow follows demand, from the night minimum (the
    # figure leak hunters watch) to the morning peak, and pressure sags as the flow rises. `phase`
    # sizes the main (150 to 2000 m³/h at the peak) and sets the pressure of its zone.
    demand = _demand(t)
    peak_flow = 150 + 1850 * phase
    flow = peak_flow * demand / _PEAK_DEMAND
    share = (demand - _NIGHT_DEMAND) / (_PEAK_DEMAND - _NIGHT_DEMAND)
    pressure = _night_pressure(phase) * (1 - _PEAK_PRESSURE_LOSS * share)
    return {
        PRESSURE.name: round(clamp(pressure + rng.gauss(0, 0.03), PRESSURE), 3),
        FLOW.name: round(clamp(flow + rng.gauss(0, 0.01 * flow + 1), FLOW), 1),
        TURBIDITY.name: round(clamp(0.3 + 0.4 * phase + rng.gauss(0, 0.05), TURBIDITY), 2),
        PH.name: round(clamp(7.0 + 0.4 * phase + rng.gauss(0, 0.03), PH), 2),
    }


def _station_thresholds(phase: float) -> dict[str, dict[str, float | None]]:
    # A zone's low-pressure limits follow its own pressure: what is normal on the high ground of one
    # zone is a burst main in another.
    lowest = _night_pressure(phase) * (1 - _PEAK_PRESSURE_LOSS)
    return {
        PRESSURE.name: {
            "warn_below": round(0.7 * lowest, 2),
            "crit_below": round(0.45 * lowest, 2),
        }
    }


DOMAIN = Domain(
    name="water",
    title_en="Water supply and drainage",
    title_vi="Cấp thoát nước",
    metrics=(PRESSURE, FLOW, TURBIDITY, PH),
    offline_after=timedelta(minutes=10),
    escalate_after=timedelta(minutes=15),
    procedure=IncidentProcedure(
        kind="water",
        title_vi="Sự cố cấp nước",
        title_en="Water supply incident",
        escalate_after=timedelta(minutes=20),
        checklist=(
            ChecklistStep("locate-fault", "Xác định vị trí rò rỉ hoặc sự cố", "Locate the leak or fault"),
            ChecklistStep(
                "isolate-section", "Khóa van cô lập đoạn ống", "Close valves to isolate the section"
            ),
            ChecklistStep("warn-customers", "Thông báo khách hàng bị ảnh hưởng", "Tell affected customers"),
            ChecklistStep("sample-quality", "Lấy mẫu kiểm tra chất lượng nước", "Sample the water quality"),
        ),
    ),
    sampler=_sample,
    sites=("water_works", "road"),
    station_thresholds=_station_thresholds,
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
