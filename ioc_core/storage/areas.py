"""Areas on the map and which devices lie in each: storing, replacing, listing and removing areas
(see `ioc_core.areas`), and keeping `device_areas` current when a device or an area changes.

Two spatial engines give the same answers. Where PostGIS is enabled (`migrations.enable_postgis`)
the server tests points against polygons through GiST indexes; where it is not (the embedded
PostgreSQL of `ioc up`, a server without the package) the store does it with shapely, fetching
only the candidates whose bounding boxes match. Both use GEOS's `intersects`, so a device on a
shared border belongs to both areas either way. An area is its city's: only that city's devices
lie in it, whatever another city's areas draw.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from ioc_core.areas import Area, AreaIn, shape_of
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list


class SpatialEngine(enum.StrEnum):
    POSTGIS = "postgis"
    SHAPELY = "shapely"
    # A schema from before areas (until `ioc migrate`): devices are placed in none.
    NONE = "none"


EngineOf = Callable[[], Awaitable[SpatialEngine]]

# The areas of a city have a state version of their own, as a (city, domain) pair of this name
# whose version changes with any of its areas: what `GET /v1/areas`'s ETag is made of, with the
# devices' versions.
AREAS_VERSION = "@areas"

_AREA_COLUMNS = (
    "id, city, kind, name_vi, name_en, code, parent, geometry, min_lon, min_lat, max_lon, max_lat,"
    " extra, updated_at"
)

_UPSERT_SQL = """
INSERT INTO areas AS a (id, city, kind, name_vi, name_en, code, parent, geometry,
                        min_lon, min_lat, max_lon, max_lat, vertices, extra)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::jsonb[], $9::float8[], $10::float8[], $11::float8[], $12::float8[], $13::int[],
                     $14::jsonb[])
ON CONFLICT (id) DO UPDATE SET
    city = excluded.city, kind = excluded.kind, name_vi = excluded.name_vi, name_en = excluded.name_en,
    code = excluded.code, parent = excluded.parent, geometry = excluded.geometry,
    min_lon = excluded.min_lon, min_lat = excluded.min_lat, max_lon = excluded.max_lon,
    max_lat = excluded.max_lat, vertices = excluded.vertices, extra = excluded.extra, updated_at = now()
RETURNING id, (xmax = 0) AS created,
          (SELECT o.city FROM areas o WHERE o.id = a.id) AS old_city
"""

# The bounding-box test, written once for both engines' candidate queries.
_BOX_OVERLAPS = "max_lon >= $1 AND min_lon <= $3 AND max_lat >= $2 AND min_lat <= $4"

# PostGIS: a device's point, the expression its GiST index is built on.
DEVICE_POINT_SQL = "ST_SetSRID(ST_MakePoint(d.lon, d.lat), 4326)"
# Every device in every area of its city (`WHERE`s narrow it to some areas or devices).
PLACE_ALL_WITH_POSTGIS_SQL = (
    "INSERT INTO device_areas (device_id, area_id) SELECT d.id, a.id FROM areas a"
    f" JOIN devices d ON d.city = a.city AND ST_Intersects(a.geom, {DEVICE_POINT_SQL})"
)


def _area_of(row: asyncpg.Record) -> Area:
    return Area(
        id=row["id"],
        city=row["city"],
        kind=row["kind"],
        name_vi=row["name_vi"],
        name_en=row["name_en"],
        code=row["code"],
        parent=row["parent"],
        geometry=row["geometry"],
        bbox=(row["min_lon"], row["min_lat"], row["max_lon"], row["max_lat"]),
        extra=row["extra"],
        updated_at=row["updated_at"],
    )


async def detect_engine(connection: Connection | Pool) -> SpatialEngine:
    """PostGIS when migrations gave `areas` its geometry column, else shapely (none before the
    migration that made areas)."""
    row = await connection.fetchrow(
        "SELECT to_regclass('device_areas') IS NOT NULL AS has_areas, EXISTS (SELECT 1 FROM pg_attribute"
        " WHERE attrelid = to_regclass('areas') AND attname = 'geom' AND NOT attisdropped) AS has_geom"
    )
    if row is None or not row["has_areas"]:
        return SpatialEngine.NONE
    return SpatialEngine.POSTGIS if row["has_geom"] else SpatialEngine.SHAPELY


class AreaStore:
    """Every query about areas, over a started pool; `engine` says which spatial engine the
    database has (see `Database`)."""

    def __init__(self, pool: Pool, engine: EngineOf) -> None:
        self._pool = pool
        self._engine = engine

    async def put(self, area: AreaIn, *, within: Transaction | None = None) -> bool:
        """Store an area, replacing one of the same id; says whether it is new."""
        return (await self.put_many([area], within=within))[area.id]

    async def put_many(
        self, areas: Sequence[AreaIn], *, within: Transaction | None = None
    ) -> dict[str, bool]:
        """Store areas in one transaction (all or none), replacing those of the same ids, and
        place the devices in them. Says of each id whether it is new."""
        if not areas:
            return {}
        engine = await self._engine()
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            await _check_parents(connection, areas)
            rows = await connection.fetch(
                _UPSERT_SQL,
                [a.id for a in areas],
                [a.city for a in areas],
                [a.kind for a in areas],
                [a.name_vi for a in areas],
                [a.name_en for a in areas],
                [a.code for a in areas],
                [a.parent for a in areas],
                [a.geometry for a in areas],
                [a.bbox[0] for a in areas],
                [a.bbox[1] for a in areas],
                [a.bbox[2] for a in areas],
                [a.bbox[3] for a in areas],
                [a.vertices for a in areas],
                [a.extra for a in areas],
            )
            for city, domain in await place_areas(connection, engine, areas):
                transaction.touch(city, domain)
            for city in {a.city for a in areas} | {row["old_city"] for row in rows if row["old_city"]}:
                transaction.touch(city, AREAS_VERSION)
            return {row["id"]: row["created"] for row in rows}

    async def get(self, area_id: str) -> Area:
        row = await self._pool.fetchrow(f"SELECT {_AREA_COLUMNS} FROM areas WHERE id = $1", area_id)
        if row is None:
            raise NotFoundError(f"area {area_id!r} not found")
        return _area_of(row)

    async def delete(self, area_id: str, *, within: Transaction | None = None) -> Area:
        """Remove an area (its devices leave it; its children keep no parent). Returns it."""
        async with self._pool.joined(within) as transaction:
            touched = await _pairs_of_members(transaction.connection, [area_id])
            row = await transaction.connection.fetchrow(
                f"DELETE FROM areas WHERE id = $1 RETURNING {_AREA_COLUMNS}", area_id
            )
            if row is None:
                raise NotFoundError(f"area {area_id!r} not found")
            for city, domain in touched:
                transaction.touch(city, domain)
            transaction.touch(row["city"], AREAS_VERSION)
            return _area_of(row)

    async def find(
        self,
        cities: Sequence[str] | None,
        kinds: Sequence[str] | None,
        bbox: tuple[float, float, float, float] | None,
        *,
        ids: Sequence[str] | None = None,
    ) -> list[Area]:
        """Areas in `cities` of `kinds` (None: any), whose geometry meets `bbox`, in id order."""
        engine = await self._engine()
        scope = (
            "($1::text[] IS NULL OR city = ANY($1)) AND ($2::text[] IS NULL OR kind = ANY($2))"
            " AND ($3::text[] IS NULL OR id = ANY($3))"
        )
        if bbox is None:
            rows = await self._pool.fetch(
                f"SELECT {_AREA_COLUMNS} FROM areas WHERE {scope} ORDER BY id",
                text_list(cities),
                text_list(kinds),
                text_list(ids),
            )
            return [_area_of(row) for row in rows]
        if engine is SpatialEngine.POSTGIS:
            rows = await self._pool.fetch(
                f"SELECT {_AREA_COLUMNS} FROM areas WHERE {scope}"
                " AND ST_Intersects(geom, ST_MakeEnvelope($4, $5, $6, $7, 4326)) ORDER BY id",
                text_list(cities),
                text_list(kinds),
                text_list(ids),
                *bbox,
            )
            return [_area_of(row) for row in rows]
        rows = await self._pool.fetch(
            f"SELECT {_AREA_COLUMNS} FROM areas WHERE {scope}"
            " AND max_lon >= $4 AND min_lon <= $6 AND max_lat >= $5 AND min_lat <= $7 ORDER BY id",
            text_list(cities),
            text_list(kinds),
            text_list(ids),
            *bbox,
        )
        import shapely  # imported where used: see `ioc_core.areas`

        box = shapely.box(*bbox)
        return [_area_of(row) for row in rows if shapely.intersects(shape_of(row["geometry"]), box)]

    async def members(self, area_id: str) -> list[str]:
        """The ids of the devices in an area, in id order."""
        rows = await self._pool.fetch(
            "SELECT device_id FROM device_areas WHERE area_id = $1 ORDER BY device_id", area_id
        )
        return [row["device_id"] for row in rows]


async def _check_parents(connection: Connection, areas: Sequence[AreaIn]) -> None:
    """A parent must be stored already or come in the same batch: a 400 naming the area, where
    the deferred foreign key would only fail the commit."""
    ids = {a.id for a in areas}
    wanted = sorted({a.parent for a in areas if a.parent is not None and a.parent not in ids})
    if not wanted:
        return
    rows = await connection.fetch("SELECT id FROM areas WHERE id = ANY($1::text[])", wanted)
    missing = set(wanted) - {row["id"] for row in rows}
    for area in areas:
        if area.parent in missing:
            raise ValidationError(f"area {area.id!r}: its parent {area.parent!r} is not an area")


async def place_areas(
    connection: Connection, engine: SpatialEngine, areas: Sequence[AreaIn]
) -> set[tuple[str, str]]:
    """Recompute which devices lie in each of `areas` (just stored). Returns the (city, domain)
    pairs of the devices that were or are in them: their screens show the change."""
    ids = [a.id for a in areas]
    touched = await _pairs_of_members(connection, ids)
    await connection.execute("DELETE FROM device_areas WHERE area_id = ANY($1::text[])", ids)
    if engine is SpatialEngine.POSTGIS:
        await connection.execute(f"{PLACE_ALL_WITH_POSTGIS_SQL} WHERE a.id = ANY($1::text[])", ids)
    else:
        await _place_with_shapely(connection, [(a.id, a.city, a.shape()) for a in areas])
    return touched | await _pairs_of_members(connection, ids)


async def _pairs_of_members(connection: Connection, area_ids: Sequence[str]) -> set[tuple[str, str]]:
    rows = await connection.fetch(
        "SELECT DISTINCT d.city, d.domain FROM device_areas da JOIN devices d ON d.id = da.device_id"
        " WHERE da.area_id = ANY($1::text[])",
        list(area_ids),
    )
    return {(row["city"], row["domain"]) for row in rows}


async def _place_with_shapely(connection: Connection, areas: Sequence[tuple[str, str, Any]]) -> None:
    """Place the devices of each (id, city, geometry) area: its city's devices within its box,
    tested against the geometry at once."""
    import numpy as np
    import shapely

    pairs: list[tuple[str, str]] = []
    for area_id, city, geometry in areas:
        min_lon, min_lat, max_lon, max_lat = geometry.bounds
        rows = await connection.fetch(
            "SELECT id, lon, lat FROM devices"
            " WHERE lat BETWEEN $1 AND $2 AND lon BETWEEN $3 AND $4 AND city = $5",
            min_lat,
            max_lat,
            min_lon,
            max_lon,
            city,
        )
        if not rows:
            continue
        shapely.prepare(geometry)
        lons = np.fromiter((r["lon"] for r in rows), dtype=float, count=len(rows))
        lats = np.fromiter((r["lat"] for r in rows), dtype=float, count=len(rows))
        inside = shapely.intersects_xy(geometry, lons, lats)
        pairs.extend((rows[i]["id"], area_id) for i in np.flatnonzero(inside))
    await _insert_pairs(connection, pairs)


async def place_devices(connection: Connection, engine: SpatialEngine, device_ids: Sequence[str]) -> None:
    """Recompute the areas of `device_ids` (just registered or moved)."""
    if engine is SpatialEngine.NONE:
        return
    ids = list(device_ids)
    await connection.execute("DELETE FROM device_areas WHERE device_id = ANY($1::text[])", ids)
    if engine is SpatialEngine.POSTGIS:
        await connection.execute(f"{PLACE_ALL_WITH_POSTGIS_SQL} WHERE d.id = ANY($1::text[])", ids)
        return
    devices = await connection.fetch(
        "SELECT id, city, lon, lat FROM devices WHERE id = ANY($1::text[]) ORDER BY id", ids
    )
    if not devices:
        return
    import numpy as np
    import shapely

    lons = np.fromiter((r["lon"] for r in devices), dtype=float, count=len(devices))
    lats = np.fromiter((r["lat"] for r in devices), dtype=float, count=len(devices))
    candidates = await connection.fetch(
        f"SELECT id, city, geometry FROM areas WHERE {_BOX_OVERLAPS} AND city = ANY($5::text[])",
        float(lons.min()),
        float(lats.min()),
        float(lons.max()),
        float(lats.max()),
        sorted({r["city"] for r in devices}),
    )
    if not candidates:
        return
    geometries = [shape_of(row["geometry"]) for row in candidates]
    tree = shapely.STRtree(geometries)
    points = shapely.points(lons, lats)
    device_index, area_index = tree.query(points, predicate="intersects")
    await _insert_pairs(
        connection,
        [
            (devices[d]["id"], candidates[a]["id"])
            for d, a in zip(device_index, area_index, strict=True)
            # An area is its city's: a device of another city inside it is not in it.
            if devices[d]["city"] == candidates[a]["city"]
        ],
    )


async def _insert_pairs(connection: Connection, pairs: Sequence[tuple[str, str]]) -> None:
    if pairs:
        await connection.execute(
            "INSERT INTO device_areas (device_id, area_id)"
            " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
