"""A simulated city fleet: devices of the five domains placed at real places of a city's districts,
each with its own behaviour (its domain's sampler and phase), per-station alarm limits, and the
feeder that powers it; and registering that fleet (database or API).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import ConfigurationError, ConflictError, IocError, ServiceUnavailableError
from ioc_core.models import DeviceIn
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import TOPIC_ROOT
from simulators.cities import CITIES, SUBSTATION, WATER_WORKS, District, Site

log = logging.getLogger(__name__)

# How far a device stands from the point of its place (about 130 m either way), and from a
# district's centre when the district has no place of the device's kind (about 1.3 km).
_SITE_SPREAD_DEG = 0.0012
_CENTRE_SPREAD_DEG = 0.012
# Devices of a domain come in pairs per district, so that even a small fleet has two flood stations
# in a district (what district flood correlation needs) and two of everything else beside them.
_PER_DISTRICT_RUN = 2


@dataclass
class SimulatedDevice:
    id: str
    city: str
    domain: Domain
    district: str
    site: str
    lat: float
    lon: float
    phase: float
    # The per-station limits it registers with (`DeviceIn.thresholds`); {} keeps the domain's.
    thresholds: dict[str, dict[str, float | None]]
    # The distribution feeder that powers it (grid meters and water works), or None.
    feeder: str | None = None
    seq: int = 0
    rng: random.Random = field(default_factory=random.Random)

    @property
    def topic(self) -> str:
        return f"{TOPIC_ROOT}/{self.city}/{self.domain.name}/{self.id}/telemetry"

    @property
    def status_topic(self) -> str:
        return f"{TOPIC_ROOT}/{self.city}/{self.domain.name}/{self.id}/status"

    @property
    def name(self) -> str:
        return f"{self.domain.title_vi}: {self.site} #{self.id.rsplit('-', 1)[-1]}"

    def sample(self, at: datetime) -> dict[str, float]:
        """What the device measures at `at` on a normal day."""
        return self.domain.sampler(self.rng, at, self.phase)

    def payload(self, at: datetime, metrics: dict[str, float]) -> bytes:
        """The device's next telemetry message: its clock, its next `seq`, the metrics."""
        self.seq += 1
        body: dict[str, Any] = {"ts": at.isoformat(), "seq": self.seq, **metrics}
        return json.dumps(body, separators=(",", ":")).encode()

    def next_payload(self, at: datetime) -> bytes:
        return self.payload(at, self.sample(at))

    def registration(self) -> DeviceIn:
        return DeviceIn.model_validate(
            {
                "id": self.id,
                "city": self.city,
                "domain": self.domain.name,
                "name": self.name,
                "district": self.district,
                "location": {"lat": self.lat, "lon": self.lon},
                "thresholds": self.thresholds,
            }
        )


def places_of(city: str) -> tuple[District, ...]:
    districts = CITIES.get(city)
    if districts is None:
        raise ValueError(f"no map of city {city!r}; known: {', '.join(CITIES)}")
    return districts


def device_id(city: str, domain: str, index: int) -> str:
    return f"sim-{city}-{domain}-{index:05d}"


def build_fleet(city: str, count: int, *, places: str | None = None, seed: int = 7) -> list[SimulatedDevice]:
    """`count` devices spread evenly over the five domains and, in pairs, over the districts of
    `places` (a city with a map, by default `city` itself), published under `city`. The same
    arguments give the same fleet, down to each device's random stream."""
    districts = places_of(places or city)
    rng = random.Random(seed)
    domains = [DOMAINS[name] for name in sorted(DOMAINS)]
    used: dict[tuple[str, str], int] = {}
    fleet = []
    for index in range(count):
        domain = domains[index % len(domains)]
        nth = index // len(domains)
        district = districts[(nth // _PER_DISTRICT_RUN) % len(districts)]
        candidates = [site for kind in domain.sites for site in district.sites_of(kind)]
        turn = used.get((domain.name, district.name), 0)
        used[(domain.name, district.name)] = turn + 1
        site = candidates[turn % len(candidates)] if candidates else None
        if site is not None:
            lat = site.lat + rng.uniform(-_SITE_SPREAD_DEG, _SITE_SPREAD_DEG)
            lon = site.lon + rng.uniform(-_SITE_SPREAD_DEG, _SITE_SPREAD_DEG)
            phase = _phase_at(site, rng)
        else:
            lat = district.lat + rng.uniform(-_CENTRE_SPREAD_DEG, _CENTRE_SPREAD_DEG)
            lon = district.lon + rng.uniform(-_CENTRE_SPREAD_DEG, _CENTRE_SPREAD_DEG)
            phase = rng.random()
        thresholds = domain.station_thresholds(phase) if domain.station_thresholds else {}
        fleet.append(
            SimulatedDevice(
                id=device_id(city, domain.name, index),
                city=city,
                domain=domain,
                district=district.name,
                site=site.name if site is not None else district.name,
                lat=round(lat, 6),
                lon=round(lon, 6),
                phase=phase,
                thresholds=thresholds,
                feeder=_feeder(domain, district, site),
                rng=random.Random(rng.random()),
            )
        )
    return fleet


def _phase_at(site: Site, rng: random.Random) -> float:
    if site.phase is None:
        return rng.random()
    # Devices at one place behave alike, not identically.
    return min(max(site.phase + rng.uniform(-0.04, 0.04), 0.0), 0.999)


def _feeder(domain: Domain, district: District, site: Site | None) -> str | None:
    """Devices at a substation measure its outgoing feeder; water works and their pumps hang on
    their district's first feeder. Other devices have batteries or are not worth modelling."""
    if SUBSTATION in domain.sites:
        return f"{site.name if site is not None else district.name} – lộ 471"
    if WATER_WORKS in domain.sites:
        substations = district.sites_of(SUBSTATION)
        return f"{substations[0].name if substations else district.name} – lộ 471"
    return None


@dataclass
class Registration:
    created: int = 0
    updated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"registered": self.created, "updated": self.updated}


async def register_fleet(
    settings: Settings, fleet: Iterable[SimulatedDevice], *, api_url: str | None = None
) -> Registration:
    """Register every device, or bring an already registered one's name, place and limits up to
    date (they are the simulator's own). Through the API at `api_url` with the admin key, else
    straight into the database."""
    devices = [device.registration() for device in fleet]
    if api_url:
        result = await _register_through_api(settings, devices, api_url)
    else:
        result = await _register_in_database(settings, devices)
    log.info("fleet registered: %d new, %d updated", result.created, result.updated)
    return result


_CONCURRENT_REGISTRATIONS = 8
# How often, and how long at most each time, a registration waits out the API's rate limit.
_RATE_LIMITED_TRIES, _RATE_LIMIT_WAIT_MAX_S = 60, 10


async def _register_in_database(settings: Settings, devices: list[DeviceIn]) -> Registration:
    result = Registration()
    async with Database(settings.database_url.get_secret_value(), max_size=4) as database:
        gate = asyncio.Semaphore(4)

        async def one(device: DeviceIn) -> None:
            async with gate:
                try:
                    await database.devices.insert(device)
                    result.created += 1
                except ConflictError:
                    await database.devices.update(device)
                    result.updated += 1

        await asyncio.gather(*(one(device) for device in devices))
    return result


async def _register_through_api(settings: Settings, devices: list[DeviceIn], api_url: str) -> Registration:
    if settings.admin_api_key is None:
        raise ConfigurationError("registering through the API needs an admin key in IOC_ADMIN_API_KEY")
    result = Registration()
    headers = {"Authorization": f"Bearer {settings.admin_api_key.get_secret_value()}"}
    gate = asyncio.Semaphore(_CONCURRENT_REGISTRATIONS)
    async with httpx.AsyncClient(base_url=api_url.rstrip("/"), headers=headers, timeout=30) as client:

        async def one(device: DeviceIn) -> None:
            async with gate:
                body = device.model_dump(mode="json")
                response = await _within_rate_limit(client, "POST", "/v1/devices", body)
                if response.status_code == 409:
                    change = {k: body[k] for k in ("name", "district", "location", "thresholds")}
                    response = await _within_rate_limit(client, "PATCH", f"/v1/devices/{device.id}", change)
                    _check(response, device.id)
                    result.updated += 1
                else:
                    _check(response, device.id)
                    result.created += 1

        try:
            await asyncio.gather(*(one(device) for device in devices))
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"the API at {api_url} is unreachable: {exc}") from exc
    return result


async def _within_rate_limit(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> httpx.Response:
    """One request, waiting as the API asks (429 with `Retry-After`) while a large fleet registers
    faster than the admin key's rate limit allows."""
    response = await client.request(method, path, json=body)
    for _ in range(_RATE_LIMITED_TRIES):
        if response.status_code != 429:
            break
        retry_after = response.headers.get("Retry-After", "1")
        await asyncio.sleep(min(int(retry_after) if retry_after.isdigit() else 1, _RATE_LIMIT_WAIT_MAX_S))
        response = await client.request(method, path, json=body)
    return response


def _check(response: httpx.Response, device: str) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail") or response.text
    except ValueError:
        detail = response.text
    raise IocError(f"the API refused device {device!r}: {response.status_code} {str(detail)[:200]}")
