"""Webhooks to agencies (contract §8): Standard Webhooks v1 signing, endpoint filters, and when a
failed delivery is tried again (which addresses a webhook may reach: `ioc_core.webhook_targets`).

Everything here is pure; the delivery worker (`delivery.worker`) does the I/O and the
storage layer (`ioc_core.storage.webhooks`) keeps endpoints, deliveries and attempts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from ioc_core.alarms import ALARM_ACKNOWLEDGED, ALARM_RAISED, ALARM_RESOLVED, ALARM_UPDATED
from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.audit import AUDIT_RECORDED
from ioc_core.errors import IocError
from ioc_core.events import DEVICE_OFFLINE, DEVICE_ONLINE, Event
from ioc_core.incidents import INCIDENT_EVENT_TYPES
from ioc_core.models import CityList, DomainList
from ioc_core.rules import SEVERITIES, Severity, severity_rank

WebhookEventType = Literal[
    "alarm.raised",
    "alarm.updated",
    "alarm.acknowledged",
    "alarm.resolved",
    "device.offline",
    "device.online",
    "audit.recorded",
    "incident.opened",
    "incident.updated",
    "incident.assigned",
    "incident.escalated",
    "incident.resolved",
    "incident.closed",
]
# What agencies can subscribe to; `state.changed` snapshots are for screens only.
WEBHOOK_EVENT_TYPES: tuple[str, ...] = (
    ALARM_RAISED,
    ALARM_UPDATED,
    ALARM_ACKNOWLEDGED,
    ALARM_RESOLVED,
    DEVICE_OFFLINE,
    DEVICE_ONLINE,
    AUDIT_RECORDED,
    *INCIDENT_EVENT_TYPES,
)
# Sent only to endpoints whose `types` name them: an endpoint registered for alarms must not start
# receiving who changed what (and from which address) because a new type of event was added.
# Incident events are opt-in too: endpoints made for alarms keep receiving just what they did; an
# agency's own endpoints hear of its assignments whatever their filter (ioc_core.storage.incidents).
OPT_IN_EVENT_TYPES: frozenset[str] = frozenset({AUDIT_RECORDED, *INCIDENT_EVENT_TYPES})
SeverityName = Severity

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32
# What is read of an agency's answer at most, and what of it the delivery log keeps.
RESPONSE_READ_MAX = 64 * 1024
RESPONSE_KEEP_MAX = 1024
# The longest `Retry-After` honoured: an endpoint cannot park a delivery for days.
RETRY_AFTER_MAX_S = 3600.0


class WebhookError(IocError):
    """A webhook URL or answer that cannot be used."""


# -- signing -------------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key: the base64 part after `whsec_`."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, message_id: str, body: bytes, *, now: datetime | None = None
) -> dict[str, str]:
    timestamp = int((now or datetime.now(UTC)).timestamp())
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
        "user-agent": "ioc-webhooks/1",
    }


def message_id(event_id: str) -> str:
    """The `webhook-id` of an event: the same for every attempt and every endpoint."""
    return "msg_" + event_id.replace("-", "")


def message_body(event: Event) -> str:
    """The Standard Webhooks payload: `{type, timestamp, data}`."""
    return json.dumps(
        {"type": event.type, "timestamp": event.time.isoformat(), "data": event.data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


# -- routing -------------------------------------------------------------------------------------


class WebhookFilter(BaseModel):
    """Which events an endpoint receives; every field left out matches everything."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"cities": ["ha-noi"], "domains": ["flood"], "min_severity": "high"}]
        },
    )

    cities: CityList = Field(default=None, min_length=1, max_length=100)
    domains: DomainList = Field(default=None, min_length=1, max_length=10)
    min_severity: SeverityName | None = Field(
        default=None,
        description="alarm events at least this severe; device events, which have no severity, then"
        " come only when `types` names them",
    )
    types: list[WebhookEventType] | None = Field(
        default=None,
        min_length=1,
        max_length=len(WEBHOOK_EVENT_TYPES),
        description="the event types to send; left out, every type but `audit.recorded` and `incident.*`,"
        " which are sent only where named",
    )
    escalated_only: bool = Field(
        default=False,
        description="only events of escalated alarms: the escalation (`alarm.updated` with"
        " `escalated: true`) and what happens to the alarm after it",
    )
    areas: list[Annotated[str, StringConstraints(pattern=f"^{AREA_ID_PATTERN.pattern}$")]] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="only the alarms and status changes of devices in one of these areas"
        " (`/v1/areas`): a ward office's endpoint; events that name no area (audit) then do not come",
    )

    @field_validator("types")
    @classmethod
    def _unique_types(cls, value: list[str] | None) -> list[str] | None:
        return sorted(set(value)) if value is not None else None


@dataclass(frozen=True, slots=True)
class RoutedEvent:
    """What an endpoint's filter looks at, and what is sent."""

    event_id: str
    message_id: str
    type: str
    city: str
    domain: str
    severity_rank: int | None
    escalated: bool
    body: str
    # Only for endpoints whose `types` name it (see OPT_IN_EVENT_TYPES).
    opt_in: bool = False
    # The areas the event's device lies in, for endpoints limited to areas.
    areas: tuple[str, ...] = ()
    # A device status event's device and time: not sent while the device is inside a maintenance
    # window then (a planned outage's silence is nobody's emergency). None for any other event.
    status_device: str | None = None
    at: datetime | None = None


def routed(events: Iterable[Event]) -> list[RoutedEvent]:
    """The events agencies can subscribe to, ready for routing."""
    out = []
    for event in events:
        if event.type not in WEBHOOK_EVENT_TYPES:
            continue
        if event.data.get("suppressed") is True:
            # An alarm raised inside a maintenance window: on the bus and the screens, not to agencies.
            continue
        status = event.type in (DEVICE_OFFLINE, DEVICE_ONLINE)
        severity = event.data.get("severity")
        out.append(
            RoutedEvent(
                event_id=event.id,
                message_id=message_id(event.id),
                type=event.type,
                city=str(event.data.get("city", "")),
                domain=str(event.data.get("domain", "")),
                severity_rank=severity_rank(severity) if severity in SEVERITIES else None,
                escalated=bool(event.data.get("escalated", False)),
                body=message_body(event),
                opt_in=event.type in OPT_IN_EVENT_TYPES,
                areas=_areas_of(event.data.get("areas")),
                status_device=str(event.data.get("device_id")) if status else None,
                at=event.time if status else None,
            )
        )
    return out


def _areas_of(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str) and AREA_ID_PATTERN.fullmatch(item))


# -- retries -------------------------------------------------------------------------------------


def backoff(attempt: int, *, initial_s: float, maximum_s: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempt` failed ones: doubling from `initial_s` up to
    `maximum_s`, with "equal jitter" (half fixed, half random) so that endpoints coming back after
    an outage are not hit by every delivery at the same instant."""
    ceiling = min(maximum_s, initial_s * 2.0 ** min(max(attempt - 1, 0), 40))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), RETRY_AFTER_MAX_S)


Outcome = Literal["delivered", "retry", "gone"]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One try: what the agency answered (or why there was no answer)."""

    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None = None
    retry_after_s: float | None = None

    @property
    def outcome(self) -> Outcome:
        if self.status_code is not None and 200 <= self.status_code < 300:
            return "delivered"
        if self.status_code == 410:
            return "gone"
        return "retry"


def next_attempt(
    result: AttemptResult,
    *,
    attempts: int,
    now: datetime,
    window_ends: datetime,
    initial_s: float,
    maximum_s: float,
) -> datetime | None:
    """When to try again after a failed attempt, or None when the retry window is over.
    Every failure is tried again: a 4xx is as likely a misdeployed endpoint as a lasting refusal,
    and a lost alarm costs more than a repeated request."""
    delay = backoff(attempts, initial_s=initial_s, maximum_s=maximum_s)
    if result.retry_after_s is not None and result.status_code in (429, 503):
        delay = result.retry_after_s
    at = now + timedelta(seconds=delay)
    return at if at <= window_ends else None
