"""Load mode of the simulator: N devices spread over a city's districts and the five domains,
publishing at a steady total rate over one MQTT connection with QoS 1 and a per-device `seq`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import ConflictError, ServiceUnavailableError
from ioc_core.models import DeviceIn, Location
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import utcnow
from simulators.cities import CITIES

log = logging.getLogger(__name__)


@dataclass
class SimulatedDevice:
    id: str
    city: str
    domain: Domain
    district: str
    lat: float
    lon: float
    phase: float
    seq: int = 0
    rng: random.Random = field(default_factory=random.Random)

    @property
    def topic(self) -> str:
        return f"ioc/v1/{self.city}/{self.domain.name}/{self.id}/telemetry"

    def next_payload(self) -> bytes:
        self.seq += 1
        now = utcnow()
        body: dict[str, Any] = {"ts": now.isoformat(), "seq": self.seq}
        body.update(self.domain.sampler(self.rng, now, self.phase))
        return json.dumps(body, separators=(",", ":")).encode()

    def registration(self) -> DeviceIn:
        return DeviceIn(
            id=self.id,
            city=self.city,
            domain=self.domain.name,
            name=f"{self.domain.title_vi} {self.district} #{self.id.rsplit('-', 1)[-1]}",
            district=self.district,
            location=Location(lat=self.lat, lon=self.lon),
        )


def build_fleet(city: str, count: int, *, seed: int = 7) -> list[SimulatedDevice]:
    districts = CITIES.get(city)
    if districts is None:
        raise ValueError(f"unknown city {city!r}; known: {', '.join(CITIES)}")
    rng = random.Random(seed)
    domains = list(DOMAINS.values())
    fleet = []
    for index in range(count):
        domain = domains[index % len(domains)]
        district = districts[index % len(districts)]
        fleet.append(
            SimulatedDevice(
                id=f"sim-{city}-{domain.name}-{index:05d}",
                city=city,
                domain=domain,
                district=district.name,
                # Spread around the district centre, about 2 km either way.
                lat=round(district.lat + rng.uniform(-0.018, 0.018), 6),
                lon=round(district.lon + rng.uniform(-0.018, 0.018), 6),
                phase=rng.random(),
                rng=random.Random(rng.random()),
            )
        )
    return fleet


async def register_fleet(settings: Settings, fleet: list[SimulatedDevice]) -> int:
    """Register every device not yet known; returns how many were new."""
    created = 0
    async with Database(settings.database_url.get_secret_value(), max_size=2) as database:
        for device in fleet:
            try:
                await database.insert_device(device.registration())
                created += 1
            except ConflictError:
                continue
    return created


@dataclass
class PublishSummary:
    sent: int
    acknowledged: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
        }


def publish(
    settings: Settings, fleet: list[SimulatedDevice], *, rate: float, duration: float
) -> PublishSummary:
    """Publish round-robin over the fleet at `rate` messages/s for `duration` seconds (blocking)."""
    endpoint = settings.mqtt
    acknowledged = 0
    lock = threading.Lock()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        nonlocal acknowledged
        with lock:
            acknowledged += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ioc-sim-{random.getrandbits(32):08x}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    if endpoint.username:
        client.username_pw_set(
            endpoint.username, endpoint.password.get_secret_value() if endpoint.password else None
        )
    if endpoint.tls:
        client.tls_set()
    client.on_publish = on_publish
    try:
        client.connect(endpoint.host, endpoint.port, 30)
    except OSError as exc:
        raise ServiceUnavailableError(
            f"MQTT broker at {endpoint.host}:{endpoint.port} is unreachable: {exc}"
        ) from exc
    client.loop_start()
    sent = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < duration:
            due = int((time.monotonic() - started) * rate) + 1
            while sent < due:
                device = fleet[sent % len(fleet)]
                client.publish(device.topic, device.next_payload(), qos=1)
                sent += 1
            time.sleep(min(0.01, 1 / rate))
        deadline = time.monotonic() + 30
        while acknowledged < sent and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    return PublishSummary(sent=sent, acknowledged=acknowledged, seconds=time.monotonic() - started)


async def simulate(
    settings: Settings, *, city: str, devices: int, rate: float, duration: float, register: bool
) -> PublishSummary:
    fleet = build_fleet(city, devices)
    if register:
        created = await register_fleet(settings, fleet)
        log.info("registered %d new devices of %d", created, len(fleet))
    return await asyncio.to_thread(publish, settings, fleet, rate=rate, duration=duration)
