"""Flood warning stations on rivers and low streets: water level and rainfall."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, Threshold, clamp

LEVEL = Metric("currentLevel", "m", -10, 100, "water level above the station's datum")
RAINFALL = Metric("rainfall", "mm/h", 0, 500, "rainfall intensity")


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Semi-diurnal tide (about 12.4 h) moves river levels near the coast; no rain in normal weather.
    hours = t.timestamp() / 3600
    tide = math.sin(2 * math.pi * (hours / 12.42 + phase))
    level = 1.2 + 0.4 * tide + rng.gauss(0, 0.01)
    rainfall = max(0.0, rng.gauss(0, 0.2))
    return {
        LEVEL.name: round(clamp(level, LEVEL), 3),
        RAINFALL.name: round(clamp(rainfall, RAINFALL), 2),
    }


DOMAIN = Domain(
    name="flood",
    title_en="Flood warning",
    title_vi="Cảnh báo ngập lụt",
    metrics=(LEVEL, RAINFALL),
    offline_after=timedelta(minutes=5),
    sampler=_sample,
    default_thresholds={
        LEVEL.name: Threshold(warn_above=3.0, crit_above=4.5),
        RAINFALL.name: Threshold(warn_above=50, crit_above=100),
    },
)
