"""Areas on the map measured against real servers, in two parts.

    .venv/bin/python -m benchmarks.areas [--devices 100000] [--areas 1000] [--vertices 200]
        [--screen-devices 10000] [--screen-areas 500] [--rate 1000] [--duration 30]

**Membership**, on each spatial engine (PostGIS on the community server; shapely on plain
PostgreSQL migrated without PostGIS), each in a database of its own: `--areas` generated ward
polygons (Voronoi cells of random centres over a city-sized box, each densified to about
`--vertices` vertices, as surveyed boundaries are) and `--devices` devices at random points of the
box. It times registering the fleet with no areas (the baseline) and with the areas stored (the
ratio is what placing costs), storing all the areas over the registered fleet (an import), and
the median of moving one device and of replacing one area.

**Screens while ingesting**: a city of `--screen-devices` devices (`ioc simulate --register`) with
`--screen-areas` generated wards, `ioc gateway`, `ioc processor` and `ioc api` running and
`ioc simulate` publishing `--rate` messages a second; then, one request at a time for
`--duration` seconds each, `GET /v1/areas?city&with=state&geometry=false` (what a choropleth
polls), the same with the geometry, and `GET /v1/summary?city` as the baseline (one city-wide
summary, the same figures once instead of per area). Prints p50/p99 of each and the ratios.

One JSON object per measurement on standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import shapely
from shapely.geometry import mapping

from benchmarks.api_state import ADMIN_KEY, bench_env, register_fleet, simulate_args, spawn, stop_all
from benchmarks.gateway import free_port
from ioc_core.areas import AreaIn, parse_feature
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, drop_database, ensure_database
from ioc_core.storage.areas import SpatialEngine

SERVERS = {
    SpatialEngine.POSTGIS: os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432"),
    SpatialEngine.SHAPELY: os.environ.get(
        "IOC_BENCH_PLAIN_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5433"
    ),
}
# Hải Phòng with the former Hải Dương: about 110 km by 70 km.
BOX = (105.9, 20.5, 107.0, 21.2)
CITY = "hai-phong"


def ward_features(
    count: int,
    vertices: int,
    *,
    box: tuple[float, float, float, float] = BOX,
    city: str = CITY,
    seed: int = 7,
) -> list[dict[str, Any]]:
    """`count` wards tiling `box`: Voronoi cells of random centres, each densified to about
    `vertices` vertices."""
    rng = np.random.default_rng(seed)
    min_lon, min_lat, max_lon, max_lat = box
    centres = shapely.multipoints(
        np.column_stack([rng.uniform(min_lon, max_lon, count), rng.uniform(min_lat, max_lat, count)])
    )
    frame = shapely.box(*box)
    cells = [
        cell.intersection(frame)
        for cell in shapely.get_parts(shapely.voronoi_polygons(centres, extend_to=frame))
    ]
    features = []
    for number, cell in enumerate(cells):
        step = cell.exterior.length / max(vertices, 4)
        dense = shapely.segmentize(cell, step)
        features.append(
            {
                "type": "Feature",
                "id": f"{city}.bench-ward.{number:04d}",
                "geometry": mapping(dense),
                "properties": {
                    "name_vi": f"Phường {number}",
                    "kind": "ward",
                    "city": city,
                    "approximate": True,
                },
            }
        )
    return features


def fleet(count: int, *, seed: int = 11) -> list[DeviceIn]:
    rng = random.Random(seed)
    min_lon, min_lat, max_lon, max_lat = BOX
    return [
        DeviceIn(
            id=f"bench-area-{n:06d}",
            city=CITY,
            domain="flood",
            location=Location(lat=rng.uniform(min_lat, max_lat), lon=rng.uniform(min_lon, max_lon)),
        )
        for n in range(count)
    ]


async def _timed(action: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def membership(engine: SpatialEngine, areas: list[AreaIn], devices: list[DeviceIn]) -> dict[str, Any]:
    server = SERVERS[engine]
    figures: dict[str, Any] = {"part": "membership", "engine": str(engine), "areas": len(areas)}
    figures["devices"] = len(devices)
    figures["vertices"] = sum(a.vertices for a in areas)
    for step in ("baseline", "measured"):
        url = f"{server}/ioc_bench_areas_{uuid.uuid4().hex[:8]}"
        await ensure_database(url)
        try:
            async with Database(url, max_size=4) as database:
                await database.migrate(postgis=engine is SpatialEngine.POSTGIS)
                assert database.spatial is engine, database.spatial
                if step == "baseline":
                    figures["register_without_areas_s"] = round(
                        await _timed(lambda: database.devices.insert_many(devices)), 2
                    )
                    figures["import_areas_over_fleet_s"] = round(
                        await _timed(lambda: database.areas.put_many(areas)), 2
                    )
                    placed = await database.pool.fetchval("SELECT count(*) FROM device_areas")
                    figures["placements"] = placed
                    continue
                await database.areas.put_many(areas)
                figures["register_with_areas_s"] = round(
                    await _timed(lambda: database.devices.insert_many(devices)), 2
                )
                assert await database.pool.fetchval("SELECT count(*) FROM device_areas") == placed
                moves = []
                rng = random.Random(3)
                for device in devices[:50]:
                    moved = device.model_copy(
                        update={
                            "location": Location(
                                lat=rng.uniform(BOX[1], BOX[3]), lon=rng.uniform(BOX[0], BOX[2])
                            )
                        }
                    )
                    moves.append(await _timed(lambda moved=moved: database.devices.update(moved)))  # type: ignore[misc]
                figures["move_device_p50_ms"] = round(statistics.median(moves) * 1000, 2)
                replaces = [
                    await _timed(lambda area=area: database.areas.put(area))  # type: ignore[misc]
                    for area in areas[:20]
                ]
                figures["replace_area_p50_ms"] = round(statistics.median(replaces) * 1000, 2)
        finally:
            await drop_database(url)
    figures["register_ratio_to_baseline"] = round(
        figures["register_with_areas_s"] / figures["register_without_areas_s"], 2
    )
    return figures


async def _latencies(client: httpx.AsyncClient, path: str, duration_s: float) -> dict[str, Any]:
    samples: list[float] = []
    deadline = time.monotonic() + duration_s
    tag = None
    changed = 0
    while time.monotonic() < deadline:
        headers = {"Accept-Encoding": "gzip", **({"If-None-Match": tag} if tag else {})}
        started = time.perf_counter()
        answer = await client.get(path, headers=headers)
        samples.append(time.perf_counter() - started)
        if answer.status_code == 200:
            changed += 1
            tag = answer.headers.get("etag")
        elif answer.status_code != 304:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
    samples.sort()
    return {
        "requests": len(samples),
        "answers_200": changed,
        "p50_ms": round(samples[len(samples) // 2] * 1000, 1),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000, 1),
    }


async def screens(args: argparse.Namespace) -> None:
    database_url = f"{SERVERS[SpatialEngine.POSTGIS]}/ioc_bench_area_screens_{int(time.time())}"
    await ensure_database(database_url)
    port = free_port()
    env = bench_env(database_url, port)
    ioc = [sys.executable, "-m", "ioc.cli"]
    logs = Path(tempfile.mkdtemp(prefix="ioc-bench-areas-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([*ioc, "migrate"], env=env, check=True, capture_output=True)
        register_fleet(ioc, env, args.screen_devices)
        async with Database(database_url, max_size=2) as database:
            # The simulated city's own areas give way to as many generated wards as asked.
            await database.pool.execute("DELETE FROM areas WHERE city = $1", CITY)
            box = await database.pool.fetchrow(
                "SELECT min(lon), min(lat), max(lon), max(lat) FROM devices WHERE city = $1", CITY
            )
            assert box is not None
            frame = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
            wards = [parse_feature(f) for f in ward_features(args.screen_areas, args.vertices, box=frame)]
            await database.areas.put_many(wards)
            placed = await database.pool.fetchval("SELECT count(DISTINCT device_id) FROM device_areas")
        print(json.dumps({"part": "screens", "areas": len(wards), "devices_placed": placed}))
        for name in ("gateway", "processor", "api"):
            processes.append(spawn([*ioc, name], env, logs / f"{name}.log"))
        total_s = args.duration * 3 + 120
        processes.append(
            spawn([*ioc, *simulate_args(args.screen_devices, args.rate, total_s)], env, logs / "simulate.log")
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ADMIN_KEY}, timeout=60
        ) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    state = await client.get("/v1/summary", params={"city": CITY})
                    online = (
                        state.json()["domains"]["flood"]["devices"]["online"]
                        if state.status_code == 200
                        else 0
                    )
                    if online > 0:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
            await asyncio.sleep(5)
            results = {}
            for name, path in (
                ("summary_city", f"/v1/summary?city={CITY}"),
                ("areas_state_no_geometry", f"/v1/areas?city={CITY}&with=state&geometry=false"),
                ("areas_state_with_geometry", f"/v1/areas?city={CITY}&with=state"),
            ):
                results[name] = await _latencies(client, path, args.duration)
                print(
                    json.dumps(
                        {"part": "screens", "view": name, "ingest_msgs_per_s": args.rate, **results[name]}
                    )
                )
        base = results["summary_city"]["p50_ms"]
        print(
            json.dumps(
                {
                    "part": "screens",
                    "p50_ratio_to_city_summary": {
                        k: round(v["p50_ms"] / base, 2) for k, v in results.items() if k != "summary_city"
                    },
                }
            )
        )
    finally:
        stop_all(processes)
        await drop_database(database_url)
        print(json.dumps({"logs": str(logs)}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--areas", type=int, default=1_000)
    parser.add_argument("--vertices", type=int, default=200, help="about this many vertices per ward")
    parser.add_argument("--engines", default="postgis,shapely")
    parser.add_argument("--screen-devices", type=int, default=10_000)
    parser.add_argument("--screen-areas", type=int, default=500)
    parser.add_argument("--rate", type=float, default=1_000.0, help="messages per second published")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of requests per view")
    parser.add_argument("--skip", default="", help="membership or screens, to leave one part out")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    if "membership" not in args.skip:
        areas = [parse_feature(f) for f in ward_features(args.areas, args.vertices)]
        devices = fleet(args.devices)
        for engine in args.engines.split(","):
            print(json.dumps(await membership(SpatialEngine(engine), areas, devices)), flush=True)
    if "screens" not in args.skip:
        await screens(args)


if __name__ == "__main__":
    asyncio.run(main())
