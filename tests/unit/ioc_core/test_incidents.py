"""Incidents' pure rules: each domain's procedure, which alarms group, the state machine, the
events and how webhooks route them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError as PydanticValidationError

from ioc_core.domains import DOMAINS
from ioc_core.errors import ConflictError, ValidationError
from ioc_core.incidents import (
    INCIDENT_ASSIGNED,
    INCIDENT_EVENT_TYPES,
    INCIDENT_STATES,
    KINDS,
    TRANSITIONS,
    AgencyIn,
    ChecklistItem,
    Incident,
    ProcedureIn,
    Titles,
    check_transition,
    checklist_of,
    default_procedure,
    domain_of_kind,
    groups,
    incident_event,
    kind_of_domain,
    titles_for,
)
from ioc_core.rules import severity_rank
from ioc_core.webhooks import OPT_IN_EVENT_TYPES, WEBHOOK_EVENT_TYPES, WebhookFilter, routed


def _incident(**changes: object) -> Incident:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    fields: dict[str, object] = {
        "id": 7,
        "city": "hai-phong",
        "kind": "flood",
        "domain": "flood",
        "area": "hp-cam",
        "areas": ["hp-cam", "hp-ward-1"],
        "title": Titles(vi="Ngập lụt — Cấm", en="Flooding — Cấm"),
        "severity": "high",
        "state": "open",
        "automatic": True,
        "agency_id": None,
        "assigned_at": None,
        "escalated_at": None,
        "escalate_after_s": 900.0,
        "opened_at": now,
        "last_alarm_at": now,
        "acknowledged_at": None,
        "resolved_at": None,
        "closed_at": None,
        "updated_at": now,
        "alarm_count": 3,
        "checklist": [ChecklistItem(id="warn-residents", vi="a", en="b", done=False)],
    }
    fields.update(changes)
    return Incident.model_validate(fields)


def test_every_domain_declares_a_procedure_with_unique_steps() -> None:
    for domain in DOMAINS.values():
        assert domain.procedure is not None, domain.name
        ids = [step.id for step in domain.procedure.checklist]
        assert ids and len(set(ids)) == len(ids)
        assert kind_of_domain(domain.name) == domain.procedure.kind
        assert domain_of_kind(domain.procedure.kind) == domain.name
    assert len(KINDS) == len(DOMAINS)
    flood = [step.id for step in default_procedure("hai-phong", "flood").checklist]
    assert flood[:3] == ["warn-residents", "dispatch-pumps", "close-underpasses"]


def test_unknown_kind_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        domain_of_kind("volcano")


def test_device_faults_open_no_incident() -> None:
    assert groups("threshold.currentLevel") and groups("flood.district") and groups("zscore.flow")
    assert not groups("offline") and not groups("flatline.voltage")


def test_state_machine() -> None:
    assert set(TRANSITIONS) == set(INCIDENT_STATES)
    check_transition(1, "open", "acknowledged")
    check_transition(1, "acknowledged", "in_progress")
    check_transition(1, "in_progress", "resolved")
    check_transition(1, "resolved", "closed")
    check_transition(1, "resolved", "in_progress")  # taken up again
    check_transition(1, "open", "resolved")  # a small incident, no steps in between
    for current, wanted in [
        ("closed", "open"),
        ("in_progress", "open"),
        ("acknowledged", "open"),
        ("open", "closed"),
    ]:
        with pytest.raises(ConflictError):
            check_transition(1, current, wanted)


def test_checklist_and_titles_come_from_the_procedure() -> None:
    procedure = default_procedure("hai-phong", "power")
    items = checklist_of(procedure)
    assert [i["id"] for i in items] == [s.id for s in procedure.checklist]
    assert all(i["done"] is False for i in items)
    titled = titles_for(procedure, "Phường An Biên", None)
    assert (
        titled.vi == "Sự cố lưới điện — Phường An Biên"
        and titled.en == "Power grid incident — Phường An Biên"
    )
    assert titles_for(procedure, None, None).en == "Power grid incident"


def test_procedure_edits_are_checked() -> None:
    with pytest.raises(PydanticValidationError):
        ProcedureIn.model_validate({"checklist": []})
    with pytest.raises(PydanticValidationError):
        ProcedureIn.model_validate(
            {"checklist": [{"id": "a", "vi": "x", "en": "x"}, {"id": "a", "vi": "y", "en": "y"}]}
        )
    with pytest.raises(PydanticValidationError):
        ProcedureIn.model_validate({"checklist": [{"id": "Not An Id", "vi": "x", "en": "x"}]})
    with pytest.raises(PydanticValidationError):
        AgencyIn.model_validate({"id": "a", "name_vi": "x", "domains": ["weather"]})


def test_incident_events_are_opt_in_webhook_types() -> None:
    assert set(INCIDENT_EVENT_TYPES) <= set(WEBHOOK_EVENT_TYPES)
    assert set(INCIDENT_EVENT_TYPES) <= OPT_IN_EVENT_TYPES
    assert WebhookFilter.model_validate({"types": ["incident.assigned"]}).types == ["incident.assigned"]
    event = incident_event(INCIDENT_ASSIGNED, _incident(agency_id="pctt"), datetime.now(UTC), by="op")
    assert event.subject == "incident:7" and event.data["agency_id"] == "pctt" and event.data["by"] == "op"
    assert "checklist" not in event.data
    [route] = routed([event])
    assert route.opt_in and route.city == "hai-phong" and route.domain == "flood"
    assert route.areas == ("hp-cam", "hp-ward-1") and route.severity_rank == severity_rank("high")
