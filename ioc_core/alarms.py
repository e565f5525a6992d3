"""Alarms as the contract's §7 describes them: what detectors conclude (`Finding`), what is
stored and served (`Alarm`), and the lifecycle events that go to `ioc.events`.

A `Finding` is about one subject (a device, or a district for correlated alarms) and one rule.
The store keeps at most one open alarm per subject and *alarm key*: for the rules that watch a
metric's value (threshold, rate, statistical) the key is the metric, so one excursion is one
alarm whose `reasons` list every rule it broke; any other rule (offline, flatline, district flood)
is its own key. A repeat bumps the alarm, a new rule joins its reasons, and the alarm resolves
once every reason has recovered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from ioc_core.events import Event
from ioc_core.rules import Severity as Severity

AlarmState = Literal["active", "acknowledged", "resolved"]
ALARM_STATES: tuple[AlarmState, ...] = ("active", "acknowledged", "resolved")

ALARM_RAISED = "alarm.raised"
ALARM_UPDATED = "alarm.updated"
ALARM_ACKNOWLEDGED = "alarm.acknowledged"
ALARM_RESOLVED = "alarm.resolved"

OFFLINE_RULE = "offline"
DISTRICT_FLOOD_RULE = "flood.district"

# The rule kinds that judge a metric's value, in the order an alarm names them when two of its
# reasons are equally severe: a broken limit explains itself best, a statistical finding least.
# A flatline is left out on purpose: a stuck sensor is a maintenance matter, not an excursion of
# the value, and goes to a different team.
EXCURSION_KINDS: tuple[str, ...] = ("threshold", "rate", "zscore")
EXCURSION_KEY_PREFIX = "excursion."


def excursion_kind_rank(rule: str) -> int:
    """How well the rule's kind explains an excursion: a limit highest, anything else 0."""
    kind = rule.partition(".")[0]
    return len(EXCURSION_KINDS) - EXCURSION_KINDS.index(kind) if kind in EXCURSION_KINDS else 0


def alarm_key(rule: str, metric: str | None) -> str:
    """What one open alarm is about: `excursion.{metric}` for the rules judging a metric's value,
    else the rule itself."""
    if metric is not None and rule.partition(".")[0] in EXCURSION_KINDS:
        return EXCURSION_KEY_PREFIX + metric
    return rule


def district_subject(city: str, district: str) -> str:
    """The subject of a flood alarm correlated by a registered `district` (stations in no area)."""
    return f"district:{city}:{district}"


AREA_SUBJECT_PREFIX = "area:"


def area_subject(area_id: str) -> str:
    """The subject of an alarm about an area (a catchment or ward's flood alarm)."""
    return AREA_SUBJECT_PREFIX + area_id


def area_of_subject(subject: str) -> str | None:
    """The area an alarm is about, or None for a device's or a district's alarm."""
    return subject.removeprefix(AREA_SUBJECT_PREFIX) if subject.startswith(AREA_SUBJECT_PREFIX) else None


@dataclass(frozen=True)
class Finding:
    """A detector's conclusion about one (subject, rule) for one batch of readings."""

    subject: str
    device_id: str | None
    city: str
    domain: str
    district: str | None
    rule: str
    metric: str | None
    # True: the condition holds (raise an alarm, or repeat the open one); False: it recovered.
    active: bool
    severity: str | None
    value: float | None
    threshold: float | None
    repeats: int
    at: datetime
    message_vi: str
    message_en: str
    # An alarm with no device: the areas it concerns (its zone and the areas its stations lie in).
    areas: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """The open alarm this finding belongs to: (subject, alarm key)."""
        return (self.subject, alarm_key(self.rule, self.metric))


def bilingual(message_vi: str, message_en: str) -> str:
    """The single `message` line of the contract: Vietnamese first, then English."""
    return f"{message_vi} / {message_en}"


class AlarmMessages(BaseModel):
    vi: str = Field(description="Vietnamese")
    en: str = Field(description="English")


class AlarmReason(BaseModel):
    """One rule an alarm's subject broke while the alarm was open."""

    rule: str = Field(description="e.g. threshold.currentLevel")
    severity: Severity = Field(description="the worst this rule reached while the alarm was open")
    active: bool = Field(description="false once this rule recovered; the alarm resolves when none is active")
    value: float | None = Field(description="the rule's latest value (for a rate rule, the change)")
    threshold: float | None
    count: int = Field(description="readings in violation of this rule")
    first_seen_at: datetime
    last_seen_at: datetime
    cleared_at: datetime | None = None
    messages: AlarmMessages


class AuditEntry(BaseModel):
    action: Literal["acknowledged", "resolved"]
    actor: str | None = Field(description="name of the API key that acted")
    note: str | None
    at: datetime


class Alarm(BaseModel):
    """An alarm (§7). Area-wide alarms (a catchment's or ward's flood) have no `device_id`; their
    `subject` names the area (`area:{id}`), or for an alarm of older releases the district."""

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": 42,
                    "subject": "hn-flood-001",
                    "device_id": "hn-flood-001",
                    "city": "ha-noi",
                    "domain": "flood",
                    "district": "Ba Đình",
                    "rule": "threshold.currentLevel",
                    "metric": "currentLevel",
                    "severity": "critical",
                    "state": "active",
                    "started_at": "2026-11-20T08:00:00+07:00",
                    "last_seen_at": "2026-11-20T08:05:00+07:00",
                    "acknowledged_at": None,
                    "resolved_at": None,
                    "value": 4.7,
                    "threshold": 4.5,
                    "count": 6,
                    "message": "Mực nước tại Trạm Phan Đình Phùng (Ba Đình, Hà Nội) là 4,70 m, vượt ngưỡng"
                    " nguy hiểm 4,50 m / Water level at Trạm Phan Đình Phùng (Ba Đình, Hà Nội) is 4.70 m,"
                    " above the danger limit 4.50 m",
                    "messages": {"vi": "…", "en": "…"},
                    "reasons": [
                        {
                            "rule": "threshold.currentLevel",
                            "severity": "critical",
                            "active": True,
                            "value": 4.7,
                            "threshold": 4.5,
                            "count": 6,
                            "first_seen_at": "2026-11-20T08:00:00+07:00",
                            "last_seen_at": "2026-11-20T08:05:00+07:00",
                            "cleared_at": None,
                            "messages": {"vi": "…", "en": "…"},
                        },
                        {
                            "rule": "rate.currentLevel",
                            "severity": "high",
                            "active": False,
                            "value": 3.5,
                            "threshold": 0.5,
                            "count": 1,
                            "first_seen_at": "2026-11-20T08:00:00+07:00",
                            "last_seen_at": "2026-11-20T08:00:00+07:00",
                            "cleared_at": "2026-11-20T08:01:00+07:00",
                            "messages": {"vi": "…", "en": "…"},
                        },
                    ],
                }
            ]
        }
    }

    id: int
    subject: str = Field(
        description="the device id; area:{area_id} for an area-wide alarm (a catchment's or ward's flood);"
        " district:{city}:{district} for a district alarm raised before areas (or for stations in none)"
    )
    device_id: str | None
    city: str
    domain: str
    district: str | None = Field(
        description="deprecated, read for one more release: the device's registered district, or the"
        " name of an area-wide alarm's area; use `areas`"
    )
    rule: str = Field(
        description="the alarm's most severe reason, e.g. threshold.currentLevel, rate.currentLevel,"
        " zscore.pressure, offline (a limit before a rate before a statistical finding when equally severe)"
    )
    metric: str | None
    severity: Severity
    state: AlarmState
    started_at: datetime
    last_seen_at: datetime
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    value: float | None
    threshold: float | None
    count: int = Field(description="readings in violation since the alarm was raised")
    message: str = Field(description="Vietnamese, then English")
    messages: AlarmMessages
    reasons: list[AlarmReason] = Field(
        default_factory=list,
        description="every rule this excursion broke, the alarm's own rule first; a threshold, a rate"
        " and a statistical finding about one device's metric are one alarm",
    )
    escalated: bool = Field(
        default=False,
        description="true once a high or critical alarm went unacknowledged past its domain's limit",
    )
    escalated_at: datetime | None = None
    areas: list[str] = Field(
        default_factory=list,
        description="ids of the areas (`/v1/areas`) the alarm's device lies in; for an area-wide alarm its"
        " area and the areas of the stations that raised it",
    )
    suppressed: bool = Field(
        default=False,
        description="true for an alarm raised inside a maintenance window (`/v1/maintenance-windows`):"
        " recorded and listed, but sent to no webhook, never escalated and left out of the screens'"
        " open-alarm figures; cleared (and the alarm raised to agencies) if it is still open when the"
        " window ends",
    )
    audit: list[AuditEntry] | None = Field(
        default=None, description="who acknowledged or resolved it, when and why (detail view only)"
    )


def alarm_event(event_type: str, alarm: Alarm, at: datetime) -> Event:
    data = alarm.model_dump(mode="json", exclude={"audit"})
    return Event(id=str(uuid.uuid4()), type=event_type, subject=alarm.subject, time=at, data=data)
