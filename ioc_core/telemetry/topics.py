"""MQTT topic names of device telemetry: `ioc/v1/{city}/{domain}/{device}/{telemetry|status}`,
the patterns of their parts, and parsing a topic into its address."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ioc_core.domains import DOMAINS
from ioc_core.errors import RejectedMessage
from ioc_core.telemetry.reasons import REASON_BAD_TOPIC

TOPIC_ROOT = "ioc/v1"
# MQTT client ids of the system's own clients (gateways, the API's admin client, the simulator's
# devices) begin so. Where the broker binds device accounts to their device ids as client ids,
# device ids may not, so that no device can be given a system client's id.
SYSTEM_CLIENT_PREFIX = "ioc-"

CITY_PATTERN = re.compile(r"[a-z0-9-]{1,32}")
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class TopicAddress:
    city: str
    domain: str
    device_id: str
    kind: str  # "telemetry" or "status"


def parse_topic(topic: str) -> TopicAddress:
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != TOPIC_ROOT or parts[5] not in ("telemetry", "status"):
        raise RejectedMessage(REASON_BAD_TOPIC, f"expected {TOPIC_ROOT}/CITY/DOMAIN/DEVICE/telemetry")
    city, domain, device_id, kind = parts[2], parts[3], parts[4], parts[5]
    if not CITY_PATTERN.fullmatch(city):
        raise RejectedMessage(REASON_BAD_TOPIC, f"city {city!r} is not a slug [a-z0-9-]{{1,32}}")
    if domain not in DOMAINS:
        raise RejectedMessage(REASON_BAD_TOPIC, f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise RejectedMessage(REASON_BAD_TOPIC, f"device id {device_id!r} is not [A-Za-z0-9_.-]{{1,64}}")
    return TopicAddress(city=city, domain=domain, device_id=device_id, kind=kind)
