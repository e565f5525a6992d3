"""A simulated city fleet: devices of the five domains placed at real places of a city's wards,
each with its own behaviour (its domain's sampler and phase), per-station alarm limits, and the
feeder that powers it; and registering that fleet (database or API).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

from ioc_core.areas import parse_feature
from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import ConfigurationError, ConflictError, IocError, ServiceUnavailableError
from ioc_core.models import DeviceIn
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import TOPIC_ROOT
from simulators.cities import SUBSTATION, WATER_WORKS, Site, Ward, places_of, ward_shapes, zone_of_ward

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

log = logging.getLogger(__name__)

# How far a device stands from the point of its place (about 130 m either way), and from a
# ward's centre when the ward has no place of the device's kind (about 1.3 km).
_SITE_SPREAD_DEG = 0.0012
_CENTRE_SPREAD_DEG = 0.012
# A device stands at least this far inside its ward's generated polygon (about 2 m), so that it
# lies in that ward alone, rounding of its coordinates included; where a few draws land outside,
# it stands at the place itself.
_INSIDE_MARGIN_DEG = 2e-5
_PLACEMENT_TRIES = 20
# Devices of a domain come in pairs per ward, so that even a small fleet has two flood stations
# in a ward (what district flood correlation needs) and two of everything else beside them.
_PER_WARD_RUN = 2


@dataclass
class SimulatedDevice:
    id: str
    city: str
    domain: Domain
    # The ward it stands in (registered as its `district`).
    district: str
    site: str
    lat: float
    lon: float
    phase: float
    # The per-station limits it registers with (`DeviceIn.thresholds`); {} keeps the domain's.
    thresholds: dict[str, dict[str, float | None]]
    # The distribution feeder that powers it (grid meters and water works), or None.
    feeder: str | None = None
    # The area its flood correlation counts it in once the city's areas are stored
    # (`cities.zone_of_ward`): the catchment gathering its ward, else the ward.
    zone: str | None = None
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


def device_id(city: str, domain: str, index: int) -> str:
    return f"sim-{city}-{domain}-{index:05d}"


def build_fleet(city: str, count: int, *, places: str | None = None, seed: int = 7) -> list[SimulatedDevice]:
    """`count` devices spread evenly over the five domains and, in pairs, over the wards of
    `places` (a city with a map, by default `city` itself), published under `city`. Each stands
    inside its ward's generated polygon (`ward_shapes`). The same arguments give the same fleet,
    down to each device's random stream."""
    places = places or city
    wards = places_of(places)
    inside = _insides(places)
    rng = random.Random(seed)
    domains = [DOMAINS[name] for name in sorted(DOMAINS)]
    used: dict[tuple[str, str], int] = {}
    fleet = []
    for index in range(count):
        domain = domains[index % len(domains)]
        nth = index // len(domains)
        ward = wards[(nth // _PER_WARD_RUN) % len(wards)]
        candidates = [site for kind in domain.sites for site in ward.sites_of(kind)]
        turn = used.get((domain.name, ward.name), 0)
        used[(domain.name, ward.name)] = turn + 1
        site = candidates[turn % len(candidates)] if candidates else None
        if site is not None:
            lat, lon = _near(rng, site.lat, site.lon, _SITE_SPREAD_DEG, inside[ward.name])
            phase = _phase_at(site, rng)
        else:
            lat, lon = _near(rng, ward.lat, ward.lon, _CENTRE_SPREAD_DEG, inside[ward.name])
            phase = rng.random()
        thresholds = domain.station_thresholds(phase) if domain.station_thresholds else {}
        fleet.append(
            SimulatedDevice(
                id=device_id(city, domain.name, index),
                city=city,
                domain=domain,
                district=ward.name,
                site=site.name if site is not None else ward.name,
                lat=lat,
                lon=lon,
                phase=phase,
                thresholds=thresholds,
                feeder=_feeder(domain, ward, site),
                zone=zone_of_ward(city, ward.name, places=places),
                rng=random.Random(rng.random()),
            )
        )
    return fleet


@functools.cache
def _insides(places: str) -> dict[str, BaseGeometry]:
    """Each ward's generated polygon shrunk by the margin a device keeps from its border."""
    import shapely  # where used, so that the components `ioc` runs do not load it (19 MB)

    shrunk: dict[str, BaseGeometry] = {}
    for name, shape in ward_shapes(places).items():
        inner = shape.buffer(-_INSIDE_MARGIN_DEG)
        shapely.prepare(inner)
        shrunk[name] = inner
    return shrunk


def _near(
    rng: random.Random, lat: float, lon: float, spread: float, inside: BaseGeometry
) -> tuple[float, float]:
    """A point within `spread` of (lat, lon), rounded to six decimals (about 0.1 m), inside `inside`."""
    import shapely

    for _ in range(_PLACEMENT_TRIES):
        near_lat = round(lat + rng.uniform(-spread, spread), 6)
        near_lon = round(lon + rng.uniform(-spread, spread), 6)
        if shapely.contains_xy(inside, near_lon, near_lat):
            return near_lat, near_lon
    return round(lat, 6), round(lon, 6)


def _phase_at(site: Site, rng: random.Random) -> float:
    if site.phase is None:
        return rng.random()
    # Devices at one place behave alike, not identically.
    return min(max(site.phase + rng.uniform(-0.04, 0.04), 0.0), 0.999)


def _feeder(domain: Domain, ward: Ward, site: Site | None) -> str | None:
    """Devices at a substation measure its outgoing feeder; water works and their pumps hang on
    their ward's first feeder. Other devices have batteries or are not worth modelling."""
    if SUBSTATION in domain.sites:
        return f"{site.name if site is not None else ward.name} – lộ 471"
    if WATER_WORKS in domain.sites:
        substations = ward.sites_of(SUBSTATION)
        return f"{substations[0].name if substations else ward.name} – lộ 471"
    return None


@dataclass
class Registration:
    created: int = 0
    updated: int = 0
    areas: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"registered": self.created, "updated": self.updated, "areas": self.areas}


async def register_fleet(
    settings: Settings,
    fleet: Iterable[SimulatedDevice],
    *,
    api_url: str | None = None,
    areas: Sequence[dict[str, Any]] = (),
) -> Registration:
    """Register every device, or bring an already registered one's name, place and limits up to
    date (they are the simulator's own), after storing `areas` (GeoJSON Features, parents first, as
    `city_areas` gives them; one of the same id is replaced). Through the API at `api_url` with
    the admin key, else straight into the database."""
    devices = [device.registration() for device in fleet]
    if api_url:
        result = await _register_through_api(settings, devices, areas, api_url)
    else:
        result = await _register_in_database(settings, devices, areas)
    log.info(
        "fleet registered: %d new, %d updated; %d areas stored", result.created, result.updated, result.areas
    )
    return result


_CONCURRENT_REGISTRATIONS = 8
# How often, and how long at most each time, a registration waits out the API's rate limit.
_RATE_LIMITED_TRIES, _RATE_LIMIT_WAIT_MAX_S = 60, 10


async def _register_in_database(
    settings: Settings, devices: list[DeviceIn], features: Sequence[dict[str, Any]]
) -> Registration:
    result = Registration()
    areas = [parse_feature(feature, max_vertices=settings.area_max_vertices) for feature in features]
    async with Database(settings.database_url.get_secret_value(), max_size=4) as database:
        if areas:
            await database.areas.put_many(areas)
            result.areas = len(areas)
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


async def _register_through_api(
    settings: Settings, devices: list[DeviceIn], features: Sequence[dict[str, Any]], api_url: str
) -> Registration:
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
                    _check(response, f"device {device.id!r}")
                    result.updated += 1
                else:
                    _check(response, f"device {device.id!r}")
                    result.created += 1

        try:
            # One at a time, in order: a parent is stored before the areas that name it.
            for feature in features:
                area_id = str(feature["id"])
                response = await _within_rate_limit(client, "PUT", f"/v1/areas/{area_id}", feature)
                _check(response, f"area {area_id!r}")
                result.areas += 1
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


def _check(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail") or response.text
    except ValueError:
        detail = response.text
    raise IocError(f"the API refused {what}: {response.status_code} {str(detail)[:200]}")
