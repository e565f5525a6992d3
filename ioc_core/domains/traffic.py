"""Traffic counters on arterial roads (FIWARE TrafficFlowObserved)."""

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
    local_time,
)
from ioc_core.kpis import DeviceSnapshot, Kpi, average, count
from ioc_core.rules import MetricRules

INTENSITY = Metric(
    "intensity",
    "vehicles/min",
    0,
    1000,
    "vehicles passing per minute",
    label_en="Traffic volume",
    label_vi="Lưu lượng xe",
    decimals=0,
    unit_vi="xe/phút",
    daily_cycle=True,
)
OCCUPANCY = Metric(
    "occupancy",
    "fraction",
    0,
    1,
    "fraction of time the detector is occupied",
    label_en="Lane occupancy",
    label_vi="Độ chiếm dụng làn đường",
    daily_cycle=True,
)
SPEED = Metric(
    "averageVehicleSpeed",
    "km/h",
    0,
    250,
    "average speed of passing vehicles",
    label_en="Average vehicle speed",
    label_vi="Tốc độ xe trung bình",
    decimals=1,
    daily_cycle=True,
)


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # An arterial road (Giải Phóng, Nguyễn Trãi, Lạch Tray): nearly empty after midnight, a busy
    # plateau through the day, and the morning (7:30) and evening (17:45) rush on top; weekends
    # lose most of the morning rush. `phase` sizes the road: 70 to 160 vehicles a minute at its peak,
    # mostly motorbikes.
    weekend = local_time(t).weekday() >= 5
    rush = max(
        daily_cycle(t, (7.5,), width_h=1.1) * (0.6 if weekend else 1.0),
        daily_cycle(t, (17.75,), width_h=1.3) * (0.85 if weekend else 1.0),
    )
    demand = max(0.06, 0.55 * daytime(t, 5.5, 21.0, ramp_h=2.5), rush)
    peak_flow = 70 + 90 * phase
    intensity = peak_flow * demand + rng.gauss(0, 2 + 0.04 * peak_flow * demand)
    # Occupancy climbs faster than the flow as the road fills, and speed falls from the free-flow
    # speed to a crawl of about 17 km/h at the height of the rush, never to a standstill.
    occupancy = 0.04 + 0.56 * demand**1.6 + rng.gauss(0, 0.015)
    free_flow = 45 + 10 * phase
    speed = free_flow * (1 - 0.65 * demand**1.5) + rng.gauss(0, 1.5)
    return {
        INTENSITY.name: round(clamp(intensity, INTENSITY), 1),
        OCCUPANCY.name: round(clamp(occupancy, OCCUPANCY), 3),
        SPEED.name: round(clamp(speed, SPEED), 1),
    }


# A road is congested well before it is at a standstill (the alarm limits): slower than 15 km/h
# or 70 % occupied is what a traffic operator calls congestion.
CONGESTED_SPEED_KMH = 15.0
CONGESTED_OCCUPANCY = 0.7


def _congested(device: DeviceSnapshot) -> bool:
    speed = device.metrics.get(SPEED.name)
    occupancy = device.metrics.get(OCCUPANCY.name)
    return (speed is not None and speed < CONGESTED_SPEED_KMH) or (
        occupancy is not None and occupancy > CONGESTED_OCCUPANCY
    )


DOMAIN = Domain(
    name="traffic",
    title_en="Traffic",
    title_vi="Giao thông",
    metrics=(INTENSITY, OCCUPANCY, SPEED),
    offline_after=timedelta(minutes=5),
    escalate_after=timedelta(minutes=15),
    procedure=IncidentProcedure(
        kind="traffic",
        title_vi="Ùn tắc giao thông",
        title_en="Traffic congestion",
        escalate_after=timedelta(minutes=20),
        checklist=(
            ChecklistStep("check-cameras", "Kiểm tra camera tại nút giao", "Check the junction cameras"),
            ChecklistStep("dispatch-police", "Điều động cảnh sát giao thông", "Dispatch traffic police"),
            ChecklistStep("retime-signals", "Điều chỉnh pha đèn tín hiệu", "Retime the traffic signals"),
            ChecklistStep("publish-detour", "Thông báo tuyến tránh", "Publish a detour"),
        ),
    ),
    sampler=_sample,
    sites=("road",),
    default_rules={
        # Rush hour is slow and dense by nature (about 18 km/h and 60 % occupancy on an arterial);
        # the limits mark a standstill, not a busy road.
        SPEED.name: MetricRules(warn_below=5, crit_below=2, hysteresis=3, zscore=6.0, zscore_floor=5),
        OCCUPANCY.name: MetricRules(
            warn_above=0.8, crit_above=0.9, hysteresis=0.05, zscore=6.0, zscore_floor=0.05
        ),
        INTENSITY.name: MetricRules(zscore=6.0, zscore_floor=6),
    },
    kpis=(
        Kpi("average_speed", "Average speed", "Tốc độ trung bình", "km/h", average(SPEED.name, 1)),
        Kpi("congested_sensors", "Congested sensors", "Điểm ùn tắc", None, count(_congested)),
    ),
)
