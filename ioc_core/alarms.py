"""Alarms as the contract's §7 describes them: what detectors conclude (`Finding`), what is
stored and served (`Alarm`), and the lifecycle events that go to `ioc.events`.

A `Finding` is about one subject (a device, or a district for correlated alarms) and one rule.
The store keeps at most one open alarm per subject and rule; a repeat bumps it, recovery
resolves it.
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


def district_subject(city: str, district: str) -> str:
    return f"district:{city}:{district}"


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

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.rule)


def bilingual(message_vi: str, message_en: str) -> str:
    """The single `message` line of the contract: Vietnamese first, then English."""
    return f"{message_vi} / {message_en}"


class AlarmMessages(BaseModel):
    vi: str = Field(description="Vietnamese")
    en: str = Field(description="English")


class AuditEntry(BaseModel):
    action: Literal["acknowledged", "resolved"]
    actor: str | None = Field(description="name of the API key that acted")
    note: str | None
    at: datetime


class Alarm(BaseModel):
    """An alarm (§7). District-level alarms have no `device_id`; their `subject` names the district."""

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
                }
            ]
        }
    }

    id: int
    subject: str = Field(description="the device id, or district:{city}:{district} for district alarms")
    device_id: str | None
    city: str
    domain: str
    district: str | None
    rule: str = Field(description="e.g. threshold.currentLevel, rate.currentLevel, zscore.pressure, offline")
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
    escalated: bool = Field(
        default=False,
        description="true once a high or critical alarm went unacknowledged past its domain's limit",
    )
    escalated_at: datetime | None = None
    audit: list[AuditEntry] | None = Field(
        default=None, description="who acknowledged or resolved it, when and why (detail view only)"
    )


def alarm_event(event_type: str, alarm: Alarm, at: datetime) -> Event:
    data = alarm.model_dump(mode="json", exclude={"audit"})
    return Event(id=str(uuid.uuid4()), type=event_type, subject=alarm.subject, time=at, data=data)
