"""Incidents and agencies: what an operations centre does after an alarm (IBM IOC's event →
incident → standard operating procedure chain; OpenRemote's assignee and in-progress state).

An incident groups alarms that are one event: a storm's forty alarms over one catchment are one
incident. It has a kind (each domain declares its own with its procedure, see
`ioc_core.domains.base.IncidentProcedure`), a severity (the highest of its alarms), an area, a state
`open → acknowledged → in_progress → resolved → closed`, an assigned agency, the checklist of its
kind's procedure (as the incident's city edited it, when it did) and a timeline of every change.

Automatic grouping (`ioc_core.storage.incidents`, run by a processor job so the batch path stays
as it was): an open alarm no incident holds joins the open incident of its city, kind and *place*
whose last alarm came within `IOC_INCIDENT_WINDOW_S`, else opens one. The place of an alarm:
- an area-wide alarm (`subject` `area:{id}`, a catchment's or ward's flood alarm): that area;
- a device's alarm of a domain that correlates by zone (flood): the zone its area alarms use, the
  catchment that contains the device, else its ward (`schema.FLOOD_ZONE_AREA_SQL`), so a storm's
  station alarms join their catchment's alarm;
- any other device's alarm: the smallest ward that contains the device;
- a device in no such area: the city as a whole (no area).
A device's fault (offline, a flatlined sensor) is a maintenance matter and opens no incident; it
can still be put into one by hand.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.domains import DOMAINS
from ioc_core.domains.base import ChecklistStep, IncidentProcedure
from ioc_core.errors import ConflictError, ValidationError
from ioc_core.events import Event
from ioc_core.models import CityList, DomainList
from ioc_core.rules import Severity

IncidentState = Literal["open", "acknowledged", "in_progress", "resolved", "closed"]
INCIDENT_STATES: tuple[IncidentState, ...] = ("open", "acknowledged", "in_progress", "resolved", "closed")
# Incidents still being worked on: alarms join them, the page lists them.
OPEN_STATES: tuple[str, ...] = ("open", "acknowledged", "in_progress")

# Where each state may go. Forward steps may be skipped (a small incident is resolved without
# anyone marking it in progress); a resolved incident may be taken up again until it is closed;
# closed is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "open": frozenset({"acknowledged", "in_progress", "resolved"}),
    "acknowledged": frozenset({"in_progress", "resolved"}),
    "in_progress": frozenset({"resolved"}),
    "resolved": frozenset({"in_progress", "closed"}),
    "closed": frozenset(),
}

INCIDENT_OPENED = "incident.opened"
INCIDENT_UPDATED = "incident.updated"
INCIDENT_ASSIGNED = "incident.assigned"
INCIDENT_ESCALATED = "incident.escalated"
INCIDENT_RESOLVED = "incident.resolved"
INCIDENT_CLOSED = "incident.closed"
INCIDENT_EVENT_TYPES: tuple[str, ...] = (
    INCIDENT_OPENED,
    INCIDENT_UPDATED,
    INCIDENT_ASSIGNED,
    INCIDENT_ESCALATED,
    INCIDENT_RESOLVED,
    INCIDENT_CLOSED,
)
INCIDENT_SOURCE = "urn:ioc:incidents"


# Alarm rules that are a device's own fault, not an event in the city: they open no incident.
_FAULT_RULES = re.compile(r"^(offline|flatline(\..*)?)$")

STEP_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
AGENCY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
WEBHOOK_ID_PATTERN = re.compile(r"wh_[0-9a-f]{16}")


def groups(rule: str) -> bool:
    """Whether an alarm of this rule opens or joins an incident by itself."""
    return _FAULT_RULES.match(rule) is None


def procedures() -> dict[str, tuple[str, IncidentProcedure]]:
    """Every incident kind with its domain and default procedure, as the domain modules declare."""
    return {d.procedure.kind: (d.name, d.procedure) for d in DOMAINS.values() if d.procedure is not None}


KINDS: tuple[str, ...] = tuple(sorted(procedures()))


def kind_of_domain(domain: str) -> str | None:
    found = DOMAINS.get(domain)
    return found.procedure.kind if found is not None and found.procedure is not None else None


def domain_of_kind(kind: str) -> str:
    known = procedures().get(kind)
    if known is None:
        raise ValidationError(f"unknown incident kind {kind!r}; kinds are {', '.join(KINDS)}")
    return known[0]


# -- the wire ------------------------------------------------------------------------------------


def _without_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("text may not hold a NUL character")
    if isinstance(value, list):
        for item in value:
            _without_nul(item)
    return value


class TextInput(BaseModel):
    """A body a stranger writes: PostgreSQL text cannot hold NUL, so it is a 4xx here rather than
    an error of the database."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return _without_nul(value)


StepId = Annotated[str, StringConstraints(pattern=f"^{STEP_ID_PATTERN.pattern}$")]


class Step(TextInput):
    """One step of a procedure."""

    id: StepId = Field(description="stable id, e.g. `warn-residents`")
    vi: str = Field(min_length=1, max_length=300)
    en: str = Field(min_length=1, max_length=300)


class Procedure(BaseModel):
    """A kind's standard operating procedure as one city uses it."""

    city: str
    kind: str
    domain: str
    title_vi: str
    title_en: str
    escalate_after_s: float = Field(description="an assignment unacknowledged this long escalates")
    checklist: list[Step]
    source: Literal["default", "city"] = Field(description="the domain's own, or the city's edit")


class ProcedureIn(TextInput):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "escalate_after_s": 600,
                    "checklist": [
                        {"id": "warn-residents", "vi": "Cảnh báo người dân", "en": "Warn residents"},
                        {"id": "open-shelter", "vi": "Mở điểm sơ tán", "en": "Open the shelter"},
                    ],
                }
            ]
        },
    )

    title_vi: str | None = Field(default=None, min_length=1, max_length=200)
    title_en: str | None = Field(default=None, min_length=1, max_length=200)
    escalate_after_s: float | None = Field(default=None, ge=1, le=7 * 86400)
    checklist: list[Step] = Field(min_length=1, max_length=50)

    @field_validator("checklist")
    @classmethod
    def _unique_steps(cls, value: list[Step]) -> list[Step]:
        ids = [s.id for s in value]
        if len(set(ids)) != len(ids):
            raise ValueError("each step id may appear once")
        return value


def default_procedure(city: str, kind: str) -> Procedure:
    domain = domain_of_kind(kind)
    procedure = procedures()[kind][1]
    return Procedure(
        city=city,
        kind=kind,
        domain=domain,
        title_vi=procedure.title_vi,
        title_en=procedure.title_en,
        escalate_after_s=procedure.escalate_after.total_seconds(),
        checklist=[_step(s) for s in procedure.checklist],
        source="default",
    )


def _step(step: ChecklistStep) -> Step:
    return Step(id=step.id, vi=step.vi, en=step.en)


def checklist_of(procedure: Procedure) -> list[dict[str, Any]]:
    """An incident's checklist as it starts, from its procedure (stored as JSON)."""
    return [
        {"id": s.id, "vi": s.vi, "en": s.en, "done": False, "done_by": None, "done_at": None}
        for s in procedure.checklist
    ]


class ChecklistItem(BaseModel):
    id: str
    vi: str
    en: str
    done: bool
    done_by: str | None = None
    done_at: datetime | None = None


class TimelineEntry(BaseModel):
    at: datetime
    actor: str | None = Field(description="the API key's name, or `system` for grouping and escalation")
    action: str = Field(description="opened, alarm_joined, acknowledged, in_progress, resolved, closed, …")
    note: str | None
    detail: dict[str, Any] = Field(default_factory=dict)


class IncidentAlarm(BaseModel):
    """One of an incident's alarms, in brief (`/v1/alarms/{id}` has the rest)."""

    id: int
    device_id: str | None
    subject: str
    rule: str
    severity: Severity
    state: str
    started_at: datetime
    message: str


class Titles(BaseModel):
    vi: str
    en: str


class Incident(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "city": "hai-phong",
                    "kind": "flood",
                    "domain": "flood",
                    "area": "hp-catchment-cam",
                    "areas": ["hp-catchment-cam", "hp-ward-an-bien"],
                    "title": {"vi": "Ngập lụt — Lưu vực sông Cấm", "en": "Flooding — Cấm river catchment"},
                    "severity": "critical",
                    "state": "open",
                    "alarm_count": 5,
                }
            ]
        }
    )

    id: int
    city: str
    kind: str
    domain: str
    area: str | None = Field(description="the area its alarms were grouped by; null: the whole city")
    areas: list[str] = Field(description="every area its alarms concern")
    title: Titles
    severity: Severity = Field(description="the highest of its alarms")
    state: IncidentState
    automatic: bool = Field(description="opened by grouping rather than by an operator")
    agency_id: str | None
    assigned_at: datetime | None
    escalated_at: datetime | None
    escalate_after_s: float
    opened_at: datetime
    last_alarm_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None
    updated_at: datetime
    alarm_count: int
    checklist: list[ChecklistItem]
    alarms: list[IncidentAlarm] | None = Field(default=None, description="with one incident only")
    timeline: list[TimelineEntry] | None = Field(default=None, description="with one incident only")


def check_transition(incident_id: int, current: str, wanted: str) -> None:
    if wanted not in TRANSITIONS.get(current, frozenset()):
        raise ConflictError(f"incident {incident_id} is {current}; it cannot become {wanted}")


def incident_event(event_type: str, incident: Incident, at: datetime, **extra: Any) -> Event:
    """An `incident.*` event; its data carries what webhook filters look at (city, domain,
    severity, areas), keyed by the incident so its events stay in order."""
    data = incident.model_dump(mode="json", exclude={"alarms", "timeline", "checklist"})
    data.update(extra)
    return Event(
        id=str(uuid.uuid4()),
        type=event_type,
        subject=f"incident:{incident.id}",
        time=at,
        data=data,
        source=INCIDENT_SOURCE,
    )


def titles_for(procedure: Procedure, area_name_vi: str | None, area_name_en: str | None) -> Titles:
    """An automatic incident's title: its kind's, and the place."""
    if area_name_vi is None:
        return Titles(vi=procedure.title_vi, en=procedure.title_en)
    return Titles(
        vi=f"{procedure.title_vi} — {area_name_vi}",
        en=f"{procedure.title_en} — {area_name_en or area_name_vi}",
    )


# -- agencies ------------------------------------------------------------------------------------

AgencyId = Annotated[str, StringConstraints(pattern=f"^{AGENCY_ID_PATTERN.pattern}$")]
WebhookRef = Annotated[str, StringConstraints(pattern=f"^{WEBHOOK_ID_PATTERN.pattern}$")]
AreaRef = Annotated[str, StringConstraints(pattern=f"^{AREA_ID_PATTERN.pattern}$")]


class AgencyFields(TextInput):
    name_vi: str | None = Field(default=None, min_length=1, max_length=200)
    name_en: str | None = Field(default=None, max_length=200)
    domains: DomainList = Field(default=None, max_length=10, description="the domains it answers for")
    cities: CityList = Field(default=None, max_length=100)
    areas: list[AreaRef] | None = Field(default=None, max_length=100, description="the areas it covers")
    webhook_ids: list[WebhookRef] | None = Field(
        default=None, max_length=20, description="endpoints (`/v1/webhooks`) told of its assignments"
    )
    escalation_webhook_id: WebhookRef | None = Field(
        default=None, description="the endpoint told when an assignment is left unacknowledged"
    )
    escalation_contact: str | None = Field(
        default=None, max_length=500, description="who to call when an assignment escalates"
    )


class AgencyIn(AgencyFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "pctt-hai-phong",
                    "name_vi": "Ban Chỉ huy PCTT Hải Phòng",
                    "name_en": "Hai Phong disaster prevention committee",
                    "domains": ["flood"],
                    "cities": ["hai-phong"],
                    "webhook_ids": ["wh_0123456789abcdef"],
                    "escalation_contact": "Trực ban 0225 3 842 000",
                }
            ]
        },
    )

    id: AgencyId
    name_vi: str = Field(min_length=1, max_length=200)


class Agency(BaseModel):
    id: str
    name_vi: str
    name_en: str | None
    domains: list[str] | None
    cities: list[str] | None
    areas: list[str] | None
    webhook_ids: list[str]
    escalation_webhook_id: str | None
    escalation_contact: str | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime
