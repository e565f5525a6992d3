"""The one way in for a device message: from its topic, payload, receive time and the registry's
word on its device to the bus records it becomes, or the `RejectedMessage` that says why not.

The gateway calls `accept_message` once per message and makes a dead letter of a rejection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from ioc_core.domains import DOMAINS
from ioc_core.errors import RejectedMessage
from ioc_core.supervision import describe
from ioc_core.telemetry.payload import parse_payload, parse_status
from ioc_core.telemetry.reasons import (
    REASON_DEVICE_MISMATCH,
    REASON_RETAINED,
    REASON_UNKNOWN_DEVICE,
    REASON_UNPROCESSABLE,
)
from ioc_core.telemetry.records import BusTelemetry, Reading, StatusReport
from ioc_core.telemetry.topics import TopicAddress, parse_topic

if TYPE_CHECKING:
    # Only for annotations: the models import this package's patterns.
    from ioc_core.models import DeviceRoute

log = logging.getLogger(__name__)

# The registry's answer for a device id: its route, or None when it is not registered. Its
# failures are not the message's fault: they propagate, and the caller retries the message.
RouteLookup = Callable[[str], Awaitable["DeviceRoute | None"]]


class DeviceMessage(Protocol):
    """An MQTT message as validation sees it."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def mid(self) -> int: ...
    @property
    def qos(self) -> int: ...
    @property
    def received_at(self) -> datetime: ...
    @property
    def dup(self) -> bool: ...
    @property
    def retain(self) -> bool:
        """Whether it was published retained (seen when the subscription keeps the flag as
        published: the gateway's does)."""
        ...


@dataclass(frozen=True, slots=True)
class Accepted:
    """What an accepted message becomes on the bus: readings, a status report, or nothing (an
    empty retained status message only clears the broker's copy)."""

    records: list[BusTelemetry]


async def accept_message(message: DeviceMessage, lookup: RouteLookup) -> Accepted | RejectedMessage:
    """Validate one message; every way a stranger's message can fail is a `RejectedMessage`."""
    try:
        address = parse_topic(message.topic)
    except Exception as exc:
        return _rejection(exc, message)
    # Outside the guard: a registry that cannot answer is retried, not the message's fault.
    route = await lookup(address.device_id)
    try:
        return Accepted(validate(message, address, route))
    except Exception as exc:
        return _rejection(exc, message)


def validate(message: DeviceMessage, address: TopicAddress, route: DeviceRoute | None) -> list[BusTelemetry]:
    """Turn one message into bus records (readings, or a status report), given its parsed topic
    and the registry's view of its device; raises `RejectedMessage`."""
    if address.kind == "telemetry" and message.retain:
        # Kept by the broker, the reading would reach every later subscriber again as if new.
        raise RejectedMessage(REASON_RETAINED, "telemetry may not be retained; only status may")
    if route is None:
        raise RejectedMessage(REASON_UNKNOWN_DEVICE, f"device {address.device_id!r} is not registered")
    if (route.city, route.domain) != (address.city, address.domain):
        raise RejectedMessage(
            REASON_DEVICE_MISMATCH,
            f"device {address.device_id!r} is registered as {route.city}/{route.domain}, "
            f"topic says {address.city}/{address.domain}",
        )
    if address.kind == "status":
        if not message.payload:
            return []  # an empty retained message only clears the broker's copy
        status = parse_status(message.payload)
        return [StatusReport(address.device_id, address.city, address.domain, status, message.received_at)]
    measurements = parse_payload(message.payload, DOMAINS[address.domain], received_at=message.received_at)
    return [
        Reading(
            device_id=address.device_id,
            city=address.city,
            domain=address.domain,
            ts=m.ts,
            seq=m.seq,
            metrics=m.metrics,
            received_at=message.received_at,
            device_time=m.device_time,
            # What storage tells a redelivered copy by, when the reading's time is the receipt's.
            redelivered=message.dup,
            packet_id=message.mid if message.qos else None,
        )
        for m in measurements
    ]


def _rejection(exc: Exception, message: DeviceMessage) -> RejectedMessage:
    """The dead-letter reason for a message that validation refused or failed on."""
    if isinstance(exc, RejectedMessage):
        return exc
    # Validation met something it does not foresee: a defect to fix, but the message is the
    # stranger's, so it becomes a dead letter and the gateway goes on.
    log.error("validating a message on %s failed unexpectedly", message.topic[:200], exc_info=exc)
    return RejectedMessage(REASON_UNPROCESSABLE, describe(exc))
