"""`ioc simulate`: one city's fleet, in scenario mode (a connection per device, a scenario, its
ground truth) or in load mode (many devices over a few connections at a set rate)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from ioc_core.settings import Settings
from simulators.cities import CITIES, city_areas
from simulators.fleet import build_fleet, register_fleet
from simulators.load import LoadSummary, run_load
from simulators.progress import Progress
from simulators.runner import MAX_CONNECTED_DEVICES, run_scenario
from simulators.scenarios import SCENARIOS, Scenario

log = logging.getLogger(__name__)

DEFAULT_TRUTH = Path("scenario-truth.jsonl")


async def simulate(
    settings: Settings,
    *,
    city: str,
    devices: int,
    rate: float,
    duration: float,
    scenario: str = "normal",
    register: bool = False,
    api_url: str | None = None,
    places: str | None = None,
    truth: Path | None = None,
    seed: int = 7,
    load: bool = False,
    processes: int | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Run the simulation and return its summary (what `ioc simulate` prints).

    Load mode runs when `load` is set or the fleet is larger than one connection per device can
    carry (`MAX_CONNECTED_DEVICES`); it knows only the `normal` scenario. The ground truth goes to
    `truth`, written for every scenario but `normal` (there, only when `truth` is given); raises
    ValueError for arguments that cannot work together, `IocError` when a service fails.
    """
    places = places or city
    load = load or devices > MAX_CONNECTED_DEVICES
    behaviour = _scenario_of(scenario, places=places, load=load)
    fleet = build_fleet(city, devices, places=places, seed=seed)
    story = behaviour(fleet, interval_s=devices / rate, seed=seed)
    if not load:
        story.check(duration)
    registered: dict[str, int] = {}
    if register:
        areas = city_areas(city, places=places)
        registered = (await register_fleet(settings, fleet, api_url=api_url, areas=areas)).as_dict()
    if load:
        summary = await _load(
            settings,
            city=city,
            devices=devices,
            rate=rate,
            duration=duration,
            places=places,
            processes=processes,
            seed=seed,
            progress=progress,
            stop=stop,
        )
        return {"mode": "load", "city": city, **registered, **summary.as_dict()}
    truth_path = truth if truth is not None else DEFAULT_TRUTH if scenario != "normal" else None
    result = await run_scenario(
        settings,
        fleet,
        story,
        rate=rate,
        duration=duration,
        truth_path=truth_path,
        stop=stop,
        on_progress=progress,
    )
    return {"mode": "scenario", **registered, **result.as_dict()}


async def _load(
    settings: Settings,
    *,
    city: str,
    devices: int,
    rate: float,
    duration: float,
    places: str,
    processes: int | None,
    seed: int,
    progress: Progress | None,
    stop: asyncio.Event | None,
) -> LoadSummary:
    """Run load mode in a thread; setting `stop` halts its publishing processes."""
    halt = threading.Event()
    waiting = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if waiting is not None:
        waiting.add_done_callback(lambda _: halt.set())
    try:
        return await asyncio.to_thread(
            run_load,
            settings.mqtt,
            city=city,
            devices=devices,
            rate=rate,
            duration=duration,
            places=places,
            processes=processes,
            seed=seed,
            on_progress=progress,
            stop=halt,
        )
    finally:
        if waiting is not None:
            waiting.cancel()


def _scenario_of(scenario: str, *, places: str, load: bool) -> type[Scenario]:
    """The scenario to run, or ValueError for arguments that cannot work together."""
    if places not in CITIES:
        raise ValueError(f"no map of {places!r}: pass --places with one of {', '.join(CITIES)}")
    behaviour = SCENARIOS.get(scenario)
    if behaviour is None:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if load and scenario != "normal":
        raise ValueError(
            f"scenario {scenario} needs a connection per device: at most {MAX_CONNECTED_DEVICES} devices,"
            " without --load"
        )
    return behaviour
