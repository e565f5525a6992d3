"""What the running components hold in memory: the libraries they load, and what each record the
gateway keeps until Kafka acknowledges it costs."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime

from ioc_core.telemetry import Reading


def test_the_command_loads_no_geometry_library_until_geometry_is_handled() -> None:
    # shapely with numpy is 19 MB of every process that loads it; the gateway and the processor
    # never handle a polygon (the API does: areas and CAP alerts).
    script = (
        "import sys, ioc.cli, ingest.gateway, processors.telemetry;"
        "print(sorted(m for m in ('shapely', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_a_geometry_is_still_checked_when_one_is_handled() -> None:
    from ioc_core.areas import covering, normalised_geometry, shape_of

    square = {"type": "Polygon", "coordinates": [[[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]]}
    geometry, bbox, vertices = normalised_geometry(square, "the square", 100)
    assert geometry["type"] == "MultiPolygon" and bbox == (0.0, 0.0, 1.0, 1.0) and vertices == 5
    assert covering([("a", shape_of(geometry))], 0.5, 0.5) == ["a"]


def test_a_bus_record_costs_its_length_not_its_encoders_buffer() -> None:
    reading = Reading(
        device_id="hn-traffic-00001",
        city="ha-noi",
        domain="traffic",
        ts=datetime(2026, 12, 7, 10, 0, tzinfo=UTC),
        seq=7,
        metrics={"intensity": 12.5, "occupancy": 0.31, "averageVehicleSpeed": 38.2},
        received_at=datetime(2026, 12, 7, 10, 0, 1, tzinfo=UTC),
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = [reading.to_bytes() for _ in range(1_000)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(records)
    finally:
        tracemalloc.stop()
    # orjson writes into a 4 KiB buffer that its bytes keep; the gateway holds up to its queue's
    # size of them (10,000) until Kafka acknowledges them.
    assert held < 2 * len(records[0]) + 100
