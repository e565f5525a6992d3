"""Flood warning stations on rivers and low streets: water level and rainfall."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

from ioc_core.alarms import DISTRICT_FLOOD_RULE
from ioc_core.domains.base import (
    BATTERY,
    ChecklistStep,
    Domain,
    IncidentProcedure,
    Metric,
    PublicWarning,
    clamp,
)
from ioc_core.kpis import Kpi, count, highest, past_limit
from ioc_core.rules import DistrictCorrelation, MetricRules

LEVEL = Metric(
    "currentLevel",
    "m",
    -10,
    100,
    "water level above the station's datum",
    label_en="Water level",
    label_vi="Mực nước",
)
RAINFALL = Metric(
    "rainfall",
    "mm/h",
    0,
    500,
    "rainfall intensity",
    label_en="Rainfall",
    label_vi="Lượng mưa",
    decimals=1,
)


# The Gulf of Tonkin's tide is diurnal, one high water a day (24.84 h), its range swelling and
# shrinking over the 13.66-day tropical half-month; it reaches up the Cấm, Lạch Tray, Tam Bạc and
# Bạch Đằng rivers but hardly up the Red River to Hà Nội.
_TIDE_PERIOD_H = 24.84
_TIDE_MODULATION_H = 13.66 * 24


def _mean_level(phase: float) -> float:
    return 0.5 + 1.2 * phase


def _tide_amplitude(phase: float) -> float:
    return 0.05 + 0.75 * phase


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # `phase` is how far the sea reaches the station: 0 on an inland canal (Tô Lịch, Kim Ngưu) with a
    # steady level, 1 at a river mouth where the tide moves the level by up to a metre and a half.
    # Normal weather is dry, with now and then a drizzle far below anything that floods a street.
    hours = t.timestamp() / 3600
    spring = 0.65 + 0.35 * math.cos(2 * math.pi * hours / _TIDE_MODULATION_H)
    tide = _tide_amplitude(phase) * spring * math.cos(2 * math.pi * (hours / _TIDE_PERIOD_H - 0.15 * phase))
    level = _mean_level(phase) + tide + rng.gauss(0, 0.008)
    rainfall = max(0.0, rng.gauss(-0.4, 0.5))
    return {
        LEVEL.name: round(clamp(level, LEVEL), 3),
        RAINFALL.name: round(clamp(rainfall, RAINFALL), 2),
        # Solar-charged: the battery stays well up.
        BATTERY.name: round(clamp(0.7 + 0.25 * phase + rng.gauss(0, 0.002), BATTERY), 3),
    }


def _station_thresholds(phase: float) -> dict[str, dict[str, float | None]]:
    # A station's alert level sits above the highest water it normally sees (the spring tide's high
    # water), its danger level further up, as each hydrological station has its own flood levels.
    normal_high = _mean_level(phase) + _tide_amplitude(phase) + 0.03
    alert = normal_high + 0.3 + 0.3 * phase
    danger = alert + 0.5 + 0.5 * phase
    return {LEVEL.name: {"warn_above": round(alert, 2), "crit_above": round(danger, 2)}}


DOMAIN = Domain(
    name="flood",
    title_en="Flood warning",
    title_vi="Cảnh báo ngập lụt",
    metrics=(LEVEL, RAINFALL),
    offline_after=timedelta(minutes=5),
    # A danger level left unhandled for ten minutes is already a flood in the streets.
    escalate_after=timedelta(minutes=10),
    procedure=IncidentProcedure(
        kind="flood",
        title_vi="Ngập lụt",
        title_en="Flooding",
        escalate_after=timedelta(minutes=15),
        checklist=(
            ChecklistStep("warn-residents", "Cảnh báo người dân trong khu vực", "Warn residents of the area"),
            ChecklistStep(
                "dispatch-pumps",
                "Điều động máy bơm và đội thoát nước",
                "Dispatch pumps and the drainage crew",
            ),
            ChecklistStep(
                "close-underpasses",
                "Đóng hầm chui và tuyến đường ngập",
                "Close underpasses and flooded roads",
            ),
            ChecklistStep(
                "notify-committee", "Báo cáo Ban Chỉ huy PCTT", "Report to the disaster prevention committee"
            ),
        ),
    ),
    sampler=_sample,
    sites=("river", "low_street"),
    station_thresholds=_station_thresholds,
    default_rules={
        # Tides move the level by about 0.2 m an hour at most; half a metre in ten minutes is a flash
        # flood. A level station's reading never repeats exactly for half an hour unless it is stuck.
        LEVEL.name: MetricRules(
            warn_above=3.0,
            crit_above=4.5,
            hysteresis=0.1,
            rise_above=0.5,
            zscore=6.0,
            zscore_floor=0.05,
            flatline_s=1800,
        ),
        # Rain comes in bursts and sits at zero for days, so neither statistics nor flatline apply.
        RAINFALL.name: MetricRules(warn_above=50, crit_above=100, hysteresis=5),
    },
    # Heavy rain (10 mm/h) with water rising 15 cm in half an hour, more than a tide alone lifts it,
    # at two stations of a district.
    correlation=DistrictCorrelation(
        rain_metric=RAINFALL.name,
        level_metric=LEVEL.name,
        rain_at_least=10.0,
        rise_at_least=0.15,
        window_s=1800,
        min_stations=2,
        fresh_s=900,
    ),
    kpis=(
        Kpi(
            "above_alert",
            "Stations above alert level",
            "Trạm vượt mức báo động",
            None,
            count(past_limit(LEVEL.name, "warn_above", "crit_above")),
        ),
        Kpi(
            "above_danger",
            "Stations above danger level",
            "Trạm vượt mức nguy hiểm",
            None,
            count(past_limit(LEVEL.name, "crit_above")),
        ),
        Kpi("highest_level", "Highest water level", "Mực nước cao nhất", "m", highest(LEVEL.name)),
    ),
    # Water past a station's limits, rising fast, or flooding a district is what people nearby must
    # hear; a station gone silent or with a flat battery is the city's own business, and the
    # statistical rules (z-score, flatline) speak of the sensor more than of the water.
    public_warning=PublicWarning(
        category="Met",
        event_vi="Ngập lụt",
        event_en="Flood",
        rules=frozenset(
            {
                *(f"{kind}.{metric.name}" for kind in ("threshold", "rate") for metric in (LEVEL, RAINFALL)),
                DISTRICT_FLOOD_RULE,
            }
        ),
    ),
)
