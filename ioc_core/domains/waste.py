"""Waste bins with fill-level sensors (FIWARE WasteContainer)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ioc_core.domains.base import Domain, Metric, Threshold, clamp

FILLING = Metric("fillingLevel", "fraction", 0, 1, "how full the bin is")
TEMPERATURE = Metric("temperature", "°C", -40, 120, "temperature inside the bin (fire risk)")


def _sample(rng: random.Random, t: datetime, phase: float) -> dict[str, float]:
    # Bins fill through the day and are emptied by the night round at 22:00.
    hours_since_round = (t.hour + t.minute / 60 - 22) % 24
    filling = (0.05 + 0.04 * hours_since_round) * (0.7 + 0.6 * phase) + rng.gauss(0, 0.01)
    temperature = 28 + 4 * phase + rng.gauss(0, 0.5)
    return {
        FILLING.name: round(clamp(filling, FILLING), 3),
        TEMPERATURE.name: round(clamp(temperature, TEMPERATURE), 1),
    }


DOMAIN = Domain(
    name="waste",
    title_en="Waste collection",
    title_vi="Thu gom rác thải",
    metrics=(FILLING, TEMPERATURE),
    offline_after=timedelta(minutes=30),
    sampler=_sample,
    default_thresholds={
        FILLING.name: Threshold(warn_above=0.8, crit_above=0.95),
        TEMPERATURE.name: Threshold(warn_above=60, crit_above=80),
    },
)
