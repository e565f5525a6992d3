"""The scenario every other builds on: `normal`, where every device behaves as its domain's sampler
says, and what a scenario tells the runner (`Send`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime

from ioc_core.domains.base import smoothstep
from simulators.fleet import SimulatedDevice
from simulators.truth import Incident

# Time the pipeline may take from a reading's arrival to its alarm or dead letter, on top of the
# reporting interval of the device (a crossing is seen with the reading that crosses).
PIPELINE_ALLOWANCE_S = 10.0
# Fewest readings each device must send during a scenario for its timeline to show.
MIN_READINGS = 15


@dataclass(frozen=True)
class Send:
    """One message on the wire. `via`: the device whose connection carries it (default: the sender)."""

    topic: str
    payload: bytes
    retain: bool = False
    via: str | None = None


def ramp(progress: float, start: float, end: float) -> float:
    """0 before `start`, 1 after `end`, smooth in between."""
    return smoothstep((progress - start) / (end - start))


class Scenario:
    """`normal`: every device as its domain's sampler says. The base of the others."""

    name = "normal"

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.started_at: datetime | None = None
        self._incidents: list[Incident] = []

    def check(self, duration_s: float | None) -> None:
        """Raise ValueError (with what to change) when the fleet or run cannot show the scenario."""
        if self.name == "normal":
            return
        if duration_s is None:
            raise ValueError(f"scenario {self.name} needs a --duration")
        if duration_s / self.interval_s < MIN_READINGS:
            rate = MIN_READINGS * len(self.fleet) / duration_s
            raise ValueError(
                f"scenario {self.name} needs every device to report at least {MIN_READINGS} times:"
                f" raise --rate to {math.ceil(rate)} or more, or lengthen --duration"
            )

    def begin(self, at: datetime) -> None:
        self.started_at = at

    def power(self, progress: float) -> tuple[list[SimulatedDevice], list[SimulatedDevice]]:
        """Devices to power off and on now."""
        return [], []

    def powered(self, devices: list[SimulatedDevice], *, on: bool, at: datetime) -> None:
        """Told once the devices from `power` have lost or regained power."""

    def readings(self, device: SimulatedDevice, at: datetime, progress: float) -> list[Send]:
        """What the device sends when its reading is due."""
        metrics = self.overlay(device, device.sample(at), at, progress)
        return [Send(device.topic, device.payload(at, metrics))]

    def overlay(
        self, device: SimulatedDevice, metrics: dict[str, float], at: datetime, progress: float
    ) -> dict[str, float]:
        return metrics

    def finish(self, at: datetime) -> None:
        """The run is over at `at`."""

    def incidents(self) -> list[Incident]:
        return list(self._incidents)

    def detect_within(self, readings: float = 2) -> float:
        return round(readings * self.interval_s + PIPELINE_ALLOWANCE_S, 1)
