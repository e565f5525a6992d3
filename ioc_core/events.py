"""Events on `ioc.events`, as CloudEvents 1.0 in structured JSON mode.

Every event has a stable `id` (a UUID chosen when the event is recorded), so consumers that see
an event twice (the outbox relay is at-least-once) can tell.

`state.changed` events are snapshots of the latest state of the devices of one city and domain
that changed lately; a later one supersedes an earlier one, so they are sent straight to Kafka
rather than through the outbox.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

import orjson

DEVICE_ONLINE = "device.online"
DEVICE_OFFLINE = "device.offline"
STATE_CHANGED = "state.changed"

# Why a device's status changed.
CAUSE_TELEMETRY = "telemetry"
CAUSE_STATUS_MESSAGE = "status_message"
CAUSE_INACTIVITY = "inactivity"

SOURCE = "urn:ioc:processor"


class ChangedDevice(TypedDict):
    """One device in a `state.changed` event: its status and its newest reading's metrics."""

    device_id: str
    status: str
    ts: str
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    subject: str
    time: datetime
    data: dict[str, Any]
    source: str = SOURCE

    @property
    def key(self) -> str:
        """Kafka key: the device or alarm the event is about, so its events stay in order."""
        return self.subject

    def to_cloudevent(self) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time.isoformat(),
            "datacontenttype": "application/json",
            "data": self.data,
        }

    def to_bytes(self) -> bytes:
        event = self.to_cloudevent()
        try:
            # orjson: the processor sends a state event per changed device, and the standard
            # library's encoder was a twentieth of its time with 100,000 devices.
            return orjson.dumps(event)
        except orjson.JSONEncodeError:
            # What orjson refuses and the standard library writes: an integer past 64 bits, a
            # key that is not a string.
            return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def device_status_event(
    *,
    device_id: str,
    city: str,
    domain: str,
    status: str,
    previous: str,
    cause: str,
    at: datetime,
    areas: list[str] | None = None,
) -> Event:
    return Event(
        id=str(uuid.uuid4()),
        type=DEVICE_ONLINE if status == "online" else DEVICE_OFFLINE,
        subject=device_id,
        time=at,
        data={
            "device_id": device_id,
            "city": city,
            "domain": domain,
            "status": status,
            "previous": previous,
            "cause": cause,
            "areas": areas or [],
        },
    )


def state_changed_event(*, city: str, domain: str, items: list[ChangedDevice], at: datetime) -> Event:
    """The latest state of some devices of one city and domain. Keyed by `{city}/{domain}`, so the
    snapshots of one place stay in order on the bus."""
    return Event(
        id=str(uuid.uuid4()),
        type=STATE_CHANGED,
        subject=f"{city}/{domain}",
        time=at,
        data={"city": city, "domain": domain, "items": items},
    )
