"""A simulated city inside another program's event loop: what `ioc up` runs beside the gateway,
processor and API, the `normal` scenario of one city for as long as the program runs."""

from __future__ import annotations

import asyncio
import logging

from ioc_core.component import Component
from ioc_core.settings import Settings
from simulators.fleet import build_fleet, register_fleet
from simulators.runner import RunSummary, ScenarioRun
from simulators.scenarios import Scenario

log = logging.getLogger(__name__)

# How often each device of the city reports.
CITY_INTERVAL_S = 10.0


class CitySimulator(Component):
    """The `normal` scenario of one city, running in the current event loop until stopped; what
    `ioc up` runs beside the gateway, processor and API:

        async with CitySimulator(settings, city="ha-noi", devices=100):
            await stopped.wait()

    `start()` builds the fleet (`build_fleet(city, devices, places=places, seed=seed)`), registers
    it in the database of `settings` when `register` is true (adding new devices, bringing the
    simulator's own up to date), connects one MQTT client per device to `settings.mqtt` (last will
    `offline` retained, `online` retained on connect, reconnecting by itself) and returns once all
    are connected; it raises `ServiceUnavailableError` when the broker or database cannot be
    reached. Each device then reports every `interval_s` seconds with real timestamps. `stop()`
    stops the devices cleanly. `wait()` returns (or raises) if publishing ends on its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        city: str,
        devices: int = 100,
        interval_s: float = CITY_INTERVAL_S,
        register: bool = True,
        places: str | None = None,
        seed: int = 7,
    ) -> None:
        if devices < 1 or interval_s <= 0:
            raise ValueError("a simulated city needs at least one device and a positive interval")
        self.settings = settings
        self.city = city
        self.register = register
        self.fleet = build_fleet(city, devices, places=places, seed=seed)
        self.interval_s = interval_s
        self._stop = asyncio.Event()
        self._run: ScenarioRun | None = None
        self._task: asyncio.Task[RunSummary] | None = None

    async def start(self) -> None:
        if self.register:
            await register_fleet(self.settings, self.fleet)
        scenario = Scenario(self.fleet, interval_s=self.interval_s)
        run = ScenarioRun(self.settings, self.fleet, scenario, rate=len(self.fleet) / self.interval_s)
        self._run = run
        try:
            await run.open()
        except BaseException:
            await run.close()
            raise
        self._task = asyncio.create_task(run.publish(self._stop), name=f"simulated-city-{self.city}")
        log.info(
            "simulated city %s: %d devices reporting every %gs", self.city, len(self.fleet), self.interval_s
        )

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.warning("simulated city %s had stopped: %s", self.city, task.exception())
        if self._run is not None:
            await self._run.close()
            self._run = None

    async def wait(self) -> None:
        if self._task is not None:
            # Shielded: whoever stops waiting must not cancel the publishing itself.
            await asyncio.shield(self._task)


async def run_city(
    settings: Settings,
    city: str,
    devices: int,
    *,
    register: bool = True,
    stop: asyncio.Event,
    interval_s: float = CITY_INTERVAL_S,
) -> None:
    """Run `CitySimulator(settings, city=city, devices=devices, ...)` until `stop` is set."""
    async with CitySimulator(
        settings, city=city, devices=devices, interval_s=interval_s, register=register
    ) as simulator:
        waiting = asyncio.ensure_future(stop.wait())
        publishing = asyncio.ensure_future(simulator.wait())
        try:
            await asyncio.wait([waiting, publishing], return_when=asyncio.FIRST_COMPLETED)
            if publishing.done():
                publishing.result()
        finally:
            waiting.cancel()
            publishing.cancel()
