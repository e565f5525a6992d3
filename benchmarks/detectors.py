"""False alarms and throughput of the detection layer on normal data (pure; no services needed).

    .venv/bin/python -m benchmarks.detectors [--devices 500] [--hours 1] [--interval-s 10]

Simulates a fleet spread over the five domains and the cities' districts, each device reporting its
domain's normal behaviour (the simulator's `sampler`) every interval from a fixed start and seed,
and runs the readings through detection in processor-sized batches: per-device evaluation with the
state round-tripping through its JSON form between batches, as the processor stores it, and district
flood correlation. Every alarm raised on this data is a false alarm. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ioc_core.alarms import Finding
from ioc_core.domains import DOMAINS, Domain
from ioc_core.telemetry import Reading
from processors.detection import (
    DeviceDetection,
    DeviceDetectorState,
    DeviceProfile,
    DistrictFloodCorrelator,
    FloodZone,
    StationSignal,
)
from simulators.cities import CITIES

# Morning rush (Vietnam time, as the samplers' days run): traffic, water demand and grid load all
# move during the first hour.
DEFAULT_START = datetime(2026, 7, 1, 6, 30, tzinfo=timezone(timedelta(hours=7)))


@dataclass
class SimulatedDevice:
    profile: DeviceProfile
    domain: Domain
    phase: float
    offset: timedelta
    rng: random.Random
    state: dict[str, Any]
    seq: int = 0


def build_fleet(count: int, interval_s: float, seed: int) -> list[SimulatedDevice]:
    rng = random.Random(seed)
    domains = list(DOMAINS.values())
    places = [(city, district.name) for city, districts in CITIES.items() for district in districts]
    fleet = []
    for index in range(count):
        domain = domains[index % len(domains)]
        city, district = places[(index // len(domains)) % len(places)]
        device_id = f"bench-{domain.name}-{index:05d}"
        fleet.append(
            SimulatedDevice(
                profile=DeviceProfile.of(
                    id=device_id,
                    city=city,
                    domain=domain.name,
                    name=f"{domain.title_vi} {district} #{index:05d}",
                    district=district,
                    thresholds={},
                ),
                domain=domain,
                phase=rng.random(),
                offset=timedelta(seconds=rng.uniform(0, interval_s)),
                rng=random.Random(rng.random()),
                state=DeviceDetectorState().to_json(),
            )
        )
    return fleet


class Tally:
    """Alarms opened, repeated and resolved per rule, as the processor's alarm store would see them."""

    def __init__(self) -> None:
        self.open: set[tuple[str, str]] = set()
        self.raised: Counter[str] = Counter()
        self.repeated: Counter[str] = Counter()
        self.resolved: Counter[str] = Counter()

    def record(self, finding: Finding) -> None:
        key = (finding.subject, finding.rule)
        if finding.active:
            (self.repeated if key in self.open else self.raised)[finding.rule] += 1
            self.open.add(key)
        elif key in self.open:
            self.open.discard(key)
            self.resolved[finding.rule] += 1


def readings_for(
    fleet: list[SimulatedDevice], steps: range, start: datetime, interval_s: float
) -> list[tuple[SimulatedDevice, list[Reading]]]:
    batch: list[tuple[SimulatedDevice, list[Reading]]] = []
    for device in fleet:
        readings = []
        for step in steps:
            ts = start + timedelta(seconds=step * interval_s) + device.offset
            device.seq += 1
            readings.append(
                Reading(
                    device_id=device.profile.id,
                    city=device.profile.city,
                    domain=device.domain.name,
                    ts=ts,
                    seq=device.seq,
                    metrics=device.domain.sampler(device.rng, ts, device.phase),
                    received_at=ts,
                )
            )
        batch.append((device, readings))
    return batch


class Detection:
    """The processor's detection over one batch: per-device detectors, then the flood correlation
    of the zones the batch touched."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.devices = DeviceDetection()
        self.correlator = DistrictFloodCorrelator()
        self.signals: dict[str, dict[str, dict[str, Any]]] = {}

    def evaluate(self, batch: list[tuple[SimulatedDevice, list[Reading]]], now: datetime) -> int:
        touched: dict[str, tuple[str, FloodZone]] = {}
        evaluated = 0
        for device, readings in batch:
            state = DeviceDetectorState.from_json(device.state)
            for finding in self.devices.evaluate(device.profile, readings, state):
                self.tally.record(finding)
            device.state = state.to_json()
            signal = self.correlator.station_signal(device.profile, state)
            zone = device.profile.zone
            if signal is not None and zone is not None:
                self.signals.setdefault(zone.subject, {})[device.profile.id] = signal.to_json()
                touched[zone.subject] = (device.profile.city, zone)
            evaluated += len(readings)
        for subject, (city, zone) in sorted(touched.items()):
            zone_finding = self.correlator.evaluate(
                city=city,
                zone=zone,
                signals=[StationSignal.from_json(body) for body in self.signals[subject].values()],
                active=(subject, "flood.district") in self.tally.open,
                now=now,
            )
            if zone_finding is not None:
                self.tally.record(zone_finding)
        return evaluated


def run(
    devices: int, hours: float, interval_s: float, batch_s: float, start: datetime, seed: int
) -> dict[str, Any]:
    fleet = build_fleet(devices, interval_s, seed)
    tally = Tally()
    detection = Detection(tally)
    readings_evaluated = 0
    detection_s = 0.0
    steps_per_batch = max(1, round(batch_s / interval_s))
    total_steps = round(hours * 3600 / interval_s)
    for first_step in range(0, total_steps, steps_per_batch):
        steps = range(first_step, min(first_step + steps_per_batch, total_steps))
        batch = readings_for(fleet, steps, start, interval_s)
        newest = start + timedelta(seconds=steps[-1] * interval_s + interval_s)
        started = time.perf_counter()
        readings_evaluated += detection.evaluate(batch, newest)
        detection_s += time.perf_counter() - started

    sizes = sorted(len(json.dumps(device.state, separators=(",", ":"))) for device in fleet)
    return {
        "devices": devices,
        "hours": hours,
        "interval_s": interval_s,
        "batch_s": batch_s,
        "start": start.isoformat(),
        "seed": seed,
        "readings_evaluated": readings_evaluated,
        "raised_by_rule": dict(sorted(tally.raised.items())),
        "repeats_by_rule": dict(sorted(tally.repeated.items())),
        "resolved_by_rule": dict(sorted(tally.resolved.items())),
        "false_alarms": sum(tally.raised.values()),
        "readings_per_s": round(readings_evaluated / detection_s) if detection_s else None,
        "state_json_bytes": {"median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=500, help="devices, spread over the five domains")
    parser.add_argument("--hours", type=float, default=1.0, help="simulated time")
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds between a device's readings")
    parser.add_argument("--batch-s", type=float, default=30.0, help="simulated seconds per processor batch")
    parser.add_argument("--start", type=datetime.fromisoformat, default=DEFAULT_START, help="RFC 3339 start")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.hours <= 0 or args.interval_s <= 0 or args.batch_s <= 0:
        parser.error("--devices, --hours, --interval-s and --batch-s must be positive")
    if args.start.tzinfo is None:
        parser.error("--start needs a UTC offset")
    result = run(args.devices, args.hours, args.interval_s, args.batch_s, args.start, args.seed)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
