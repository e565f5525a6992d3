"""The audit log's pure parts: URLs written down without their secrets, the place and scope of an
entry, its `audit.recorded` event, and how webhooks treat that event."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ioc_core.audit import (
    ACTIONS,
    AUDIT_RECORDED,
    OBJECT_TYPES,
    AuditEntry,
    audit_event,
    place_of,
    redacted_url,
    scope_of,
)
from ioc_core.webhooks import WEBHOOK_EVENT_TYPES, WebhookFilter, routed


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://pctt.example.gov.vn/ioc", "https://pctt.example.gov.vn/ioc"),
        ("https://pctt.example.gov.vn/ioc?token=s3cret&x=1", "https://pctt.example.gov.vn/ioc?…"),
        ("http://user:pass@203.0.113.7:8443/h#frag", "http://203.0.113.7:8443/h"),
        ("https://[2001:db8::1]:8443/h?k=v", "https://[2001:db8::1]:8443/h?…"),
        ("https://host:99999/h", "https://host/h"),
    ],
)
def test_urls_are_kept_without_query_credentials_or_fragment(url: str, kept: str) -> None:
    assert redacted_url(url) == kept
    assert "s3cret" not in redacted_url(url) and "pass" not in redacted_url(url)


def test_an_entry_has_one_place_only_when_its_object_has() -> None:
    assert place_of(["ha-noi"], ["flood"]) == ("ha-noi", "flood")
    assert place_of(["ha-noi", "ha-noi"], None) == ("ha-noi", "")
    assert place_of(["ha-noi", "hai-phong"], ["flood", "water"]) == ("", "")
    assert place_of(None, None) == ("", "")
    assert scope_of(["b", "a", "b"]) == ("a", "b") and scope_of(None) is None


def entry(cities: list[str] | None) -> AuditEntry:
    return AuditEntry(
        id=42,
        at=datetime(2026, 11, 21, 8, 0, tzinfo=UTC),
        event_id="8f1c1e7a-2b9d-4c1e-9f57-0c1d2e3f4a5b",
        actor_key_id="key_0123456789abcdef",
        actor_name="PCTT Hải Phòng",
        client_address="10.1.2.3",
        action="device.update",
        object_type="device",
        object_id="hp-flood-001",
        outcome="done",
        cities=cities,
        domains=["flood"],
        detail={"changes": {"name": "Trạm Tam Bạc"}},
    )


def test_an_entry_becomes_an_audit_recorded_cloudevent() -> None:
    event = audit_event(entry(["hai-phong"])).to_cloudevent()
    assert event["type"] == AUDIT_RECORDED and event["source"] == "urn:ioc:api"
    assert event["id"] == "8f1c1e7a-2b9d-4c1e-9f57-0c1d2e3f4a5b"
    assert event["subject"] == "device/hp-flood-001" and event["time"] == "2026-11-21T08:00:00+00:00"
    assert event["data"] == {
        "id": 42,
        "at": "2026-11-21T08:00:00+00:00",
        "actor": {"key_id": "key_0123456789abcdef", "name": "PCTT Hải Phòng", "address": "10.1.2.3"},
        "action": "device.update",
        "object": {"type": "device", "id": "hp-flood-001"},
        "outcome": "done",
        "cities": ["hai-phong"],
        "domains": ["flood"],
        "detail": {"changes": {"name": "Trạm Tam Bạc"}},
        "city": "hai-phong",
        "domain": "flood",
    }


def test_webhooks_take_audit_entries_only_when_named() -> None:
    [routed_event] = routed([audit_event(entry(["hai-phong"]))])
    assert routed_event.opt_in and routed_event.type == AUDIT_RECORDED
    assert (routed_event.city, routed_event.domain, routed_event.severity_rank) == (
        "hai-phong",
        "flood",
        None,
    )
    assert AUDIT_RECORDED in WEBHOOK_EVENT_TYPES
    every_type = WebhookFilter.model_validate({"types": list(WEBHOOK_EVENT_TYPES)})
    assert every_type.types is not None and len(every_type.types) == len(WEBHOOK_EVENT_TYPES)


def test_actions_are_unique_and_named_by_object_type() -> None:
    assert len(set(ACTIONS)) == len(ACTIONS)
    assert all(action.split(".")[0] in OBJECT_TYPES for action in ACTIONS)
