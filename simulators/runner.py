"""Scenario mode: a fleet of up to a few hundred devices, each with its own MQTT connection,
living through a scenario and writing down its ground truth.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ioc_core.settings import Settings
from ioc_core.telemetry import utcnow
from simulators.fleet import SimulatedDevice
from simulators.links import DeviceLink, DeviceLinks, LinkState
from simulators.scenarios import Scenario
from simulators.truth import write_truth

log = logging.getLogger(__name__)

# Beyond this many devices a connection per device costs more than it shows: `ioc simulate` turns
# to load mode, and a `normal` run shares connections between devices (no wills nor statuses).
MAX_CONNECTED_DEVICES = 500
_DEVICES_PER_CARRIER = 250
_MOST_CARRIERS = 16
_PROGRESS_EVERY_S = 0.5
_LONGEST_NAP_S = 0.25
# At the end of a run, how long to wait for the broker to acknowledge what is still in flight: on
# a busy machine a reconnecting device's queued messages take a while.
_SETTLE_S = 20.0

# Told now and then how far a run is: messages sent, acknowledged by the broker, seconds elapsed.
ProgressCallback = Callable[[int, int, float], None]


@dataclass
class RunSummary:
    scenario: str
    city: str
    devices: int
    sent: int
    acknowledged: int
    dropped: int
    seconds: float
    incidents: int
    truth: str | None
    # Of `sent`, the devices' `online` statuses: the rate counts readings only.
    statuses: int = 0

    @property
    def rate(self) -> float:
        return (self.sent - self.statuses) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "city": self.city,
            "devices": self.devices,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "statuses": self.statuses,
            "dropped": self.dropped,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "incidents": self.incidents,
            "truth": self.truth,
        }


class ScenarioRun:
    """One scenario over one fleet: `open()` connects every device, `publish()` runs the timeline
    (for `duration` seconds, or until `stop` is set when there is no duration), `close()` stops the
    devices cleanly. Each device reports every `len(fleet) / rate` seconds, the fleet staggered."""

    def __init__(
        self,
        settings: Settings,
        fleet: list[SimulatedDevice],
        scenario: Scenario,
        *,
        rate: float,
        duration: float | None = None,
        truth_path: Path | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if not fleet:
            raise ValueError("a scenario needs at least one device")
        shared = len(fleet) > MAX_CONNECTED_DEVICES
        if shared and scenario.name != "normal":
            raise ValueError(
                f"scenario {scenario.name} needs a connection per device: at most {MAX_CONNECTED_DEVICES}"
            )
        self.fleet = fleet
        self.scenario = scenario
        self.rate = rate
        self.duration = duration
        self.truth_path = truth_path
        self.on_progress = on_progress
        # A run of its own: two simulators of the same city must not take each other's sessions.
        prefix = f"sim-{uuid.uuid4().hex[:6]}-"
        self.links = DeviceLinks(settings.mqtt, client_prefix=prefix)
        # The connection each device's messages go over.
        self.route: dict[str, DeviceLink] = {}
        if shared:
            count = min(_MOST_CARRIERS, math.ceil(len(fleet) / _DEVICES_PER_CARRIER))
            carriers = [self.links.add(f"{fleet[0].city}-carrier-{n}", None) for n in range(count)]
            for index, device in enumerate(fleet):
                self.route[device.id] = carriers[index % count]
        else:
            for device in fleet:
                self.route[device.id] = self.links.add(device.id, device.status_topic)
        self._opened = False

    @property
    def interval_s(self) -> float:
        return len(self.fleet) / self.rate

    async def open(self) -> None:
        await self.links.__aenter__()
        self._opened = True
        await self.links.connect_all()
        log.info("%d devices connected for scenario %s", len(self.fleet), self.scenario.name)

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.links.close()

    async def publish(self, stop: asyncio.Event | None = None) -> RunSummary:
        loop = asyncio.get_running_loop()
        fleet, scenario, links, duration = self.fleet, self.scenario, self.route, self.duration
        interval = self.interval_s
        started = loop.time()
        scenario.begin(utcnow())
        due = [(started + interval * index / len(fleet), index) for index in range(len(fleet))]
        heapq.heapify(due)
        next_progress = started
        while True:
            now = loop.time()
            elapsed = now - started
            if (duration is not None and elapsed >= duration) or (stop is not None and stop.is_set()):
                break
            progress = min(elapsed / duration, 1.0) if duration else 0.0
            self._switch_power(progress)
            while due and due[0][0] <= now:
                at_s, index = heapq.heappop(due)
                device = fleet[index]
                if links[device.id].state is not LinkState.OFF:
                    for send in scenario.readings(device, utcnow(), progress):
                        links[send.via or device.id].publish(send.topic, send.payload, retain=send.retain)
                else:
                    self.links.stats.dropped += 1
                heapq.heappush(due, (at_s + interval, index))
            if self.on_progress is not None and now >= next_progress:
                next_progress = now + _PROGRESS_EVERY_S
                self.on_progress(self.links.stats.sent, self.links.stats.acknowledged, elapsed)
            nap = min(max(due[0][0] - loop.time(), 0.0), _LONGEST_NAP_S)
            await asyncio.sleep(nap)
        seconds = loop.time() - started
        await self.links.settle(within_s=_SETTLE_S)
        scenario.finish(utcnow())
        incidents = scenario.incidents()
        if self.truth_path is not None:
            write_truth(self.truth_path, incidents)
        stats = self.links.stats
        if self.on_progress is not None:
            self.on_progress(stats.sent, stats.acknowledged, seconds)
        return RunSummary(
            scenario=scenario.name,
            city=fleet[0].city,
            devices=len(fleet),
            sent=stats.sent,
            acknowledged=stats.acknowledged,
            dropped=stats.dropped,
            statuses=stats.statuses,
            seconds=seconds,
            incidents=len(incidents),
            truth=str(self.truth_path) if self.truth_path is not None else None,
        )

    def _switch_power(self, progress: float) -> None:
        off, on = self.scenario.power(progress)
        for devices, powered in ((off, False), (on, True)):
            if not devices:
                continue
            for device in devices:
                link = self.route[device.id]
                if powered:
                    link.power_on()
                else:
                    link.power_off()
            self.scenario.powered(devices, on=powered, at=utcnow())
            log.info("%d devices powered %s", len(devices), "on" if powered else "off")


async def run_scenario(
    settings: Settings,
    fleet: list[SimulatedDevice],
    scenario: Scenario,
    *,
    rate: float,
    duration: float | None,
    truth_path: Path | None = None,
    stop: asyncio.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunSummary:
    run = ScenarioRun(
        settings,
        fleet,
        scenario,
        rate=rate,
        duration=duration,
        truth_path=truth_path,
        on_progress=on_progress,
    )
    try:
        await run.open()
        return await run.publish(stop)
    finally:
        await run.close()
