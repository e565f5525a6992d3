"""`outage`: one distribution feeder fails and every device on it goes silent at once; it comes
back later and the devices reconnect."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from ioc_core.alarms import OFFLINE_RULE
from simulators.fleet import SimulatedDevice
from simulators.scenarios.base import PIPELINE_ALLOWANCE_S, Scenario
from simulators.truth import Incident


class Outage(Scenario):
    name = "outage"

    FAILS_AT, RESTORED_AT = 0.3, 0.7

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        super().__init__(fleet, interval_s=interval_s, seed=seed)
        feeders: dict[str, list[SimulatedDevice]] = defaultdict(list)
        for device in fleet:
            if device.feeder is not None:
                feeders[device.feeder].append(device)
        # The feeder with the most on it, meters and pumps alike.
        ranked = sorted(feeders.items(), key=lambda item: -len(item[1]))
        self.feeder = ranked[0][0] if ranked else None
        self.victims = ranked[0][1] if ranked else []
        self._failed = self._restored = False
        self._failed_at: datetime | None = None
        self._restored_at: datetime | None = None

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if self.feeder is None:
            raise ValueError("scenario outage needs a grid meter or water works: use --devices 5 or more")

    def power(self, progress: float) -> tuple[list[SimulatedDevice], list[SimulatedDevice]]:
        if not self._failed and progress >= self.FAILS_AT:
            self._failed = True
            return list(self.victims), []
        if self._failed and not self._restored and progress >= self.RESTORED_AT:
            self._restored = True
            return [], list(self.victims)
        return [], []

    def powered(self, devices: list[SimulatedDevice], *, on: bool, at: datetime) -> None:
        if on:
            self._restored_at = at
        else:
            self._failed_at = at

    def incidents(self) -> list[Incident]:
        if self._failed_at is None:
            return []
        return [
            Incident(
                scenario=self.name,
                kind="feeder_outage",
                city=device.city,
                domain=device.domain.name,
                expected="alarm",
                started_at=self._failed_at,
                ended_at=self._restored_at,
                device_id=device.id,
                district=device.district,
                expected_rules=[OFFLINE_RULE],
                expected_severity="medium",
                # The broker publishes the last will at once: no waiting for silence.
                detect_within_s=PIPELINE_ALLOWANCE_S,
                detail=f"feeder {self.feeder} failed; the device lost power and its connection",
            )
            for device in self.victims
        ]
