"""The audit log of admin and operator actions: what an entry says, the actions and object types
it names, its `audit.recorded` event, and the pure rules around it (which cities and domains an
entry concerns, and how a URL is written down without the secrets it may carry).

An entry says who (the API key's id and name), what (action, object type and id, a small detail
that never holds a secret), when, from which address, and whether the action was done or refused
because the object lies outside the key's scope. It is stored in the transaction of the change it
records (`ioc_core.storage.audit`) and its event goes out through the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from ioc_core.events import Event

AUDIT_RECORDED = "audit.recorded"
# The `source` of audit events: the API records them, not a processor.
AUDIT_SOURCE = "urn:ioc:api"

API_KEY, DEVICE, WEBHOOK, ALARM, AREA, REGION = "api_key", "device", "webhook", "alarm", "area", "region"
# The rule overrides of a city, an area or a device (rules at run time).
RULES = "rules"
# A maintenance window (ioc_core.maintenance).
MAINTENANCE_WINDOW = "maintenance_window"
# A rejected device message (ioc_core.storage.dead_letters); a bulk replay names its filter instead.
DEAD_LETTER = "dead_letter"
# Incidents, the agencies they are assigned to, and the cities' procedures (ioc_core.incidents).
INCIDENT, AGENCY, PROCEDURE = "incident", "agency", "procedure"
OBJECT_TYPES: tuple[str, ...] = (
    API_KEY,
    DEVICE,
    WEBHOOK,
    ALARM,
    AREA,
    REGION,
    RULES,
    MAINTENANCE_WINDOW,
    DEAD_LETTER,
    INCIDENT,
    AGENCY,
    PROCEDURE,
)

API_KEY_CREATE = "api_key.create"
API_KEY_REVOKE = "api_key.revoke"
DEVICE_CREATE = "device.create"
DEVICE_UPDATE = "device.update"
DEVICE_DELETE = "device.delete"
DEVICE_CREDENTIALS_ROTATE = "device.credentials.rotate"
DEVICE_CREDENTIALS_REVOKE = "device.credentials.revoke"
WEBHOOK_CREATE = "webhook.create"
WEBHOOK_UPDATE = "webhook.update"
WEBHOOK_DELETE = "webhook.delete"
WEBHOOK_DELIVERY_RETRY = "webhook.delivery.retry"
ALARM_ACKNOWLEDGE = "alarm.acknowledge"
ALARM_RESOLVE = "alarm.resolve"
AREA_CREATE = "area.create"
AREA_UPDATE = "area.update"
AREA_DELETE = "area.delete"
REGION_CREATE = "region.create"
REGION_UPDATE = "region.update"
REGION_DELETE = "region.delete"
RULES_UPDATE = "rules.update"
RULES_DELETE = "rules.delete"
MAINTENANCE_WINDOW_CREATE = "maintenance_window.create"
MAINTENANCE_WINDOW_UPDATE = "maintenance_window.update"
MAINTENANCE_WINDOW_DELETE = "maintenance_window.delete"
DEAD_LETTER_REPLAYED = "dead_letter.replayed"
INCIDENT_CREATE = "incident.create"
INCIDENT_UPDATE = "incident.update"
INCIDENT_CHECK = "incident.check"
AGENCY_CREATE = "agency.create"
AGENCY_UPDATE = "agency.update"
AGENCY_DELETE = "agency.delete"
PROCEDURE_UPDATE = "procedure.update"
INCIDENT_READ = "incident.read"
# Reads are recorded only when they are refused: a key asking for another scope's object.
MAINTENANCE_WINDOW_READ = "maintenance_window.read"
DEVICE_READ = "device.read"
WEBHOOK_READ = "webhook.read"
ALARM_READ = "alarm.read"
RULES_READ = "rules.read"

ACTIONS: tuple[str, ...] = (
    INCIDENT_CREATE,
    INCIDENT_UPDATE,
    INCIDENT_CHECK,
    AGENCY_CREATE,
    AGENCY_UPDATE,
    AGENCY_DELETE,
    PROCEDURE_UPDATE,
    INCIDENT_READ,
    API_KEY_CREATE,
    API_KEY_REVOKE,
    DEVICE_CREATE,
    DEVICE_UPDATE,
    DEVICE_DELETE,
    DEVICE_CREDENTIALS_ROTATE,
    DEVICE_CREDENTIALS_REVOKE,
    WEBHOOK_CREATE,
    WEBHOOK_UPDATE,
    WEBHOOK_DELETE,
    WEBHOOK_DELIVERY_RETRY,
    ALARM_ACKNOWLEDGE,
    ALARM_RESOLVE,
    AREA_CREATE,
    AREA_UPDATE,
    AREA_DELETE,
    REGION_CREATE,
    REGION_UPDATE,
    REGION_DELETE,
    RULES_UPDATE,
    RULES_DELETE,
    MAINTENANCE_WINDOW_CREATE,
    MAINTENANCE_WINDOW_UPDATE,
    MAINTENANCE_WINDOW_DELETE,
    DEAD_LETTER_REPLAYED,
    DEVICE_READ,
    WEBHOOK_READ,
    ALARM_READ,
    RULES_READ,
    MAINTENANCE_WINDOW_READ,
)

Outcome = Literal["done", "refused"]
OUTCOMES: tuple[Outcome, ...] = ("done", "refused")

# The admin key of the settings (IOC_ADMIN_API_KEY) has no id of its own; entries of its actions
# have a null key id, and the audit list finds them under this name.
SETTINGS_KEY = "IOC_ADMIN_API_KEY"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: an API key (its id; None for the settings' admin key) and its name, from where."""

    key_id: str | None
    name: str
    address: str | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry to record. `cities` and `domains` are those of the object (None: every one), so
    that admins limited to a scope see the entries about objects within it, and no others."""

    actor: Actor
    action: str
    object_type: str
    object_id: str
    cities: tuple[str, ...] | None
    domains: tuple[str, ...] | None
    outcome: Outcome = "done"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A recorded entry, as the audit list and the `audit.recorded` event show it."""

    id: int
    at: datetime
    event_id: str
    actor_key_id: str | None
    actor_name: str
    client_address: str | None
    action: str
    object_type: str
    object_id: str
    outcome: str
    cities: list[str] | None
    domains: list[str] | None
    detail: dict[str, Any]

    def as_data(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": {"key_id": self.actor_key_id, "name": self.actor_name, "address": self.client_address},
            "action": self.action,
            "object": {"type": self.object_type, "id": self.object_id},
            "outcome": self.outcome,
            "cities": self.cities,
            "domains": self.domains,
            "detail": self.detail,
            # The one place of the object, when it has one, as the webhook and stream filters of
            # place-bound events read it (see `place_of`).
            **dict(zip(("city", "domain"), place_of(self.cities, self.domains), strict=True)),
        }


def new_event_id() -> str:
    return str(uuid.uuid4())


def audit_event(entry: AuditEntry) -> Event:
    """The `audit.recorded` event of an entry; keyed by its object, so one object's entries stay
    in order on the bus."""
    return Event(
        id=entry.event_id,
        type=AUDIT_RECORDED,
        subject=f"{entry.object_type}/{entry.object_id}",
        time=entry.at,
        data=entry.as_data(),
        source=AUDIT_SOURCE,
    )


def place_of(cities: Iterable[str] | None, domains: Iterable[str] | None) -> tuple[str, str]:
    """The one city and the one domain an object belongs to, or "" where it spans several (or
    every one). Webhook filters of one city or domain match only entries wholly within it."""
    city_list = sorted(set(cities)) if cities is not None else []
    domain_list = sorted(set(domains)) if domains is not None else []
    return (
        city_list[0] if len(city_list) == 1 else "",
        domain_list[0] if len(domain_list) == 1 else "",
    )


def scope_of(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """A scope list as recorded: sorted and without repeats; None stays None (every one)."""
    return tuple(sorted(set(values))) if values is not None else None


def redacted_url(url: str) -> str:
    """A URL as the audit log keeps it: scheme, host, port and path; a query string (where
    agencies put tokens) and any credentials are left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
