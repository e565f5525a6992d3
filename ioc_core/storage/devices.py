"""The device registry: registering, changing and removing devices, reading them with their
latest state, and what routing (ingest), detection (processors) and city lists need of them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ioc_core.errors import ConflictError, NotFoundError
from ioc_core.models import Device, DeviceIn, DeviceRoute, LatestReading, Location
from ioc_core.rules import RuleLayer
from ioc_core.storage import views
from ioc_core.storage.areas import EngineOf, place_devices
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list
from ioc_core.storage.rules import RULE_LAYERS_SQL
from ioc_core.storage.schema import FLOOD_ZONE_AREA_SQL

_DEVICE_COLUMNS = f"""
    d.id, d.city, d.domain, d.name, d.district, d.lat, d.lon, d.thresholds, d.created_at,
    coalesce(s.status, 'unknown') AS status, s.last_seen, s.ts, s.metrics, {views.DEVICE_AREAS}
"""


# What detection needs of devices $1, with each flood station's correlation zone and the rule
# overrides that apply to each device (see storage.rules).
_PROFILES_SQL = f"""
SELECT d.id, d.city, d.domain, d.name, d.district, d.thresholds,
       z.id AS zone_area, z.name_vi AS zone_name_vi, z.name_en AS zone_name_en,
       {RULE_LAYERS_SQL} AS rule_layers
FROM devices d
LEFT JOIN areas z ON d.domain = 'flood' AND z.id = {FLOOD_ZONE_AREA_SQL.format(device="d.id")}
WHERE d.id = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True)
class DeviceProfileRow:
    id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    thresholds: dict[str, dict[str, float | None]]
    # A flood station's correlation zone (see schema.FLOOD_ZONE_AREA_SQL), or None.
    zone_area: str | None = None
    zone_name_vi: str | None = None
    zone_name_en: str | None = None
    # The rule overrides that apply to the device, in the order they are laid over its domain's
    # defaults (city, areas, device; see storage.rules); its `thresholds` are not among them.
    rule_layers: tuple[RuleLayer, ...] = ()


def _rule_layers(stored: list[list[Any]]) -> tuple[RuleLayer, ...]:
    return tuple(RuleLayer(source, rules) for source, rules in stored)


def _device_of(row: asyncpg.Record) -> Device:
    return Device(
        id=row["id"],
        city=row["city"],
        domain=row["domain"],
        name=row["name"],
        district=row["district"],
        location=Location(lat=row["lat"], lon=row["lon"]),
        thresholds=row["thresholds"],
        status=row["status"],
        last_seen=row["last_seen"],
        latest=LatestReading(ts=row["ts"], metrics=row["metrics"]) if row["ts"] is not None else None,
        created_at=row["created_at"],
        areas=row["areas"],
    )


async def _read(connection: Connection, device_id: str) -> Device:
    row = await connection.fetchrow(
        f"SELECT {_DEVICE_COLUMNS} FROM devices d LEFT JOIN device_state s ON s.device_id = d.id"
        " WHERE d.id = $1",
        device_id,
    )
    if row is None:
        raise NotFoundError(f"device {device_id!r} not found")
    return _device_of(row)


class DeviceStore:
    """Every query about the device registry, over a started pool."""

    def __init__(self, pool: Pool, spatial: EngineOf) -> None:
        self._pool = pool
        # Which engine places devices in areas (see storage.areas).
        self._spatial = spatial

    async def insert(self, device: DeviceIn, *, within: Transaction | None = None) -> Device:
        """Register a device; in `within` when given (see `Pool.joined`)."""
        async with self._pool.joined(within) as transaction:
            try:
                await transaction.connection.execute(
                    "INSERT INTO devices (id, city, domain, name, district, lat, lon, thresholds)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    device.id,
                    device.city,
                    device.domain,
                    device.name,
                    device.district,
                    device.location.lat,
                    device.location.lon,
                    device.thresholds,
                )
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"device {device.id!r} already exists") from exc
            await place_devices(transaction.connection, await self._spatial(), [device.id])
            transaction.touch(device.city, device.domain)
            return await _read(transaction.connection, device.id)

    async def insert_many(self, devices: Sequence[DeviceIn]) -> int:
        """Register many devices in one transaction (a fleet of 100,000 in seconds, where one
        request each takes minutes); those already registered are left as they are. Returns how
        many were new."""
        spatial = await self._spatial()
        async with self._pool.transaction() as transaction:
            new = await transaction.connection.fetchval(
                "WITH added AS ("
                " INSERT INTO devices (id, city, domain, name, district, lat, lon, thresholds)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
                " $6::float8[], $7::float8[], $8::jsonb[])"
                " ON CONFLICT (id) DO NOTHING RETURNING id)"
                " SELECT array_agg(id) FROM added",
                [d.id for d in devices],
                [d.city for d in devices],
                [d.domain for d in devices],
                [d.name for d in devices],
                [d.district for d in devices],
                [d.location.lat for d in devices],
                [d.location.lon for d in devices],
                [d.thresholds for d in devices],
            )
            new = new or []
            if new:
                await place_devices(transaction.connection, spatial, new)
            for city, domain in {(d.city, d.domain) for d in devices}:
                transaction.touch(city, domain)
            return len(new)

    async def get(self, device_id: str) -> Device:
        async with self._pool.guard(), self._pool.pool.acquire() as connection:
            return await _read(connection, device_id)

    async def update(self, device: DeviceIn, *, within: Transaction | None = None) -> Device:
        """Store a device's name, district, location and thresholds; its id, city and domain stay."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                "UPDATE devices SET name = $2, district = $3, lat = $4, lon = $5, thresholds = $6,"
                " updated_at = now() WHERE id = $1 RETURNING city, domain",
                device.id,
                device.name,
                device.district,
                device.location.lat,
                device.location.lon,
                device.thresholds,
            )
            if row is None:
                raise NotFoundError(f"device {device.id!r} not found")
            await place_devices(transaction.connection, await self._spatial(), [device.id])
            transaction.touch(row["city"], row["domain"])
            return await _read(transaction.connection, device.id)

    async def delete(self, device_id: str, *, within: Transaction | None = None) -> None:
        """Remove a device from the registry (its state goes with it; stored readings stay)."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                "DELETE FROM devices WHERE id = $1 RETURNING city, domain", device_id
            )
            if row is None:
                raise NotFoundError(f"device {device_id!r} not found")
            transaction.touch(row["city"], row["domain"])

    async def page(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        *,
        status: str | None,
        bbox: tuple[float, float, float, float] | None,
        after: str | None,
        limit: int,
        areas: Sequence[str] | None = None,
    ) -> list[Device]:
        rows = await self._pool.fetch(
            views.DEVICE_PAGE_SQL,
            text_list(cities),
            text_list(domains),
            status,
            list(bbox) if bbox else None,
            after,
            limit,
            text_list(areas),
        )
        return [_device_of(row) for row in rows]

    async def routes_after(self, after: str, limit: int) -> list[DeviceRoute]:
        """Up to `limit` routes of the devices whose ids sort after `after`, in id order: the
        registry reads page by page, so that a big fleet never holds up its reader for long."""
        rows = await self._pool.fetch(
            "SELECT id, city, domain FROM devices WHERE id > $1 ORDER BY id LIMIT $2", after, limit
        )
        return [
            DeviceRoute(id=r["id"], city=sys.intern(r["city"]), domain=sys.intern(r["domain"])) for r in rows
        ]

    async def route(self, device_id: str) -> DeviceRoute | None:
        row = await self._pool.fetchrow("SELECT id, city, domain FROM devices WHERE id = $1", device_id)
        return None if row is None else DeviceRoute(id=row["id"], city=row["city"], domain=row["domain"])

    async def detection_version(self) -> tuple[int, int]:
        """The rules version and the device profiles version, read together: while neither has
        moved, every device profile a processor holds is still what `profiles` would read."""
        row = await self._pool.fetchrow(
            "SELECT (SELECT version FROM rules_version) AS rules,"
            " (SELECT version FROM device_profiles_version) AS profiles"
        )
        assert row is not None  # one row, whatever the tables hold
        return int(row["rules"] or 0), int(row["profiles"] or 0)

    async def profiles(self, device_ids: Sequence[str]) -> list[DeviceProfileRow]:
        """What detection needs of each registered device among `device_ids`."""
        rows = await self._pool.fetch(_PROFILES_SQL, list(device_ids))
        return [
            DeviceProfileRow(
                r["id"],
                r["city"],
                r["domain"],
                r["name"],
                r["district"],
                r["thresholds"],
                zone_area=r["zone_area"],
                zone_name_vi=r["zone_name_vi"],
                zone_name_en=r["zone_name_en"],
                rule_layers=_rule_layers(r["rule_layers"]),
            )
            for r in rows
        ]

    async def cities(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, areas: Sequence[str] | None = None
    ) -> list[views.CityRow]:
        rows = await self._pool.fetch(
            views.CITIES_SQL, text_list(cities), text_list(domains), text_list(areas)
        )
        return [
            views.CityRow(
                city=r["city"],
                devices=r["devices"],
                lat=r["lat"],
                lon=r["lon"],
                bbox=(r["min_lon"], r["min_lat"], r["max_lon"], r["max_lat"]),
            )
            for r in rows
        ]
