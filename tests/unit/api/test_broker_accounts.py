"""The pure parts of device credentials: the grants, the admin setting, the change model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.broker_grants import (
    GATEWAY_ACLS,
    check_device_id_free,
    device_acls,
    device_role,
    device_topics,
    narrowed_grants,
)
from api.device_accounts import BrokerCommandError, DeviceAccounts, _error_of
from ioc_core.errors import ConfigurationError, ConflictError, IocError
from ioc_core.models import DevicePatch, RegisteredDevice
from ioc_core.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]


def test_a_device_may_publish_to_its_telemetry_and_status_only() -> None:
    topics = ["ioc/v1/ha-noi/flood/hn-flood-001/telemetry", "ioc/v1/ha-noi/flood/hn-flood-001/status"]
    assert device_topics("hn-flood-001", "ha-noi", "flood") == topics
    assert device_acls("hn-flood-001", "ha-noi", "flood") == [
        {"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": True} for topic in topics
    ]
    assert device_role("hn-flood-001") == "ioc-device-hn-flood-001"


def test_ids_of_the_systems_own_clients_are_reserved() -> None:
    for taken in ("ioc-gateway", "ioc-gateway-2", "ioc-accounts-1f2e", "ioc-sim-hn-flood-001"):
        with pytest.raises(ConflictError, match="reserved"):
            check_device_id_free(taken)
    for free in ("hn-flood-001", "IOC-flood-1", "gw-ioc-1", "iocflood"):
        check_device_id_free(free)


def test_grants_of_an_earlier_release_are_narrowed() -> None:
    def role(name: str, *topics: str, acltype: str = "publishClientSend") -> dict[str, object]:
        return {
            "rolename": name,
            "acls": [{"acltype": acltype, "topic": t, "priority": 0, "allow": True} for t in topics],
        }

    old = role("ioc-device-hn-1", "ioc/v1/ha-noi/flood/hn-1/#")
    assert narrowed_grants(old) == device_acls("hn-1", "ha-noi", "flood")
    for left in (
        role("ioc-device-hn-1", *device_topics("hn-1", "ha-noi", "flood")),  # narrowed already
        role("ioc-gateway", "ioc/v1/#"),
        role("ioc-device-hn-1", "ioc/v1/ha-noi/flood/hn-2/#"),  # someone else's topics: not ours
        role("ioc-device-hn-1", "ioc/v1/ha-noi/weather/hn-1/#"),
        role("ioc-device-hn-1", "ioc/v1/ha-noi/flood/hn-1/#", acltype="subscribePattern"),
        {"rolename": "ioc-device-hn-1"},
        {"acls": []},
    ):
        assert narrowed_grants(left) is None, left


@pytest.mark.parametrize(
    ("device_id", "city", "domain"),
    [
        ("#", "ha-noi", "flood"),
        ("a/b", "ha-noi", "flood"),
        ("dev+", "ha-noi", "flood"),
        ("dev", "+", "flood"),
        ("dev", "ha-noi/#", "flood"),
        ("dev", "ha-noi", "#"),
        ("dev", "ha-noi", "weather"),
    ],
)
def test_names_cannot_widen_a_grant(device_id: str, city: str, domain: str) -> None:
    with pytest.raises(IocError):
        device_acls(device_id, city, domain)


def test_the_gateway_reads_and_never_publishes() -> None:
    allowed = {(a["acltype"], a["topic"]) for a in GATEWAY_ACLS if a["allow"]}
    denied = {(a["acltype"], a["topic"]) for a in GATEWAY_ACLS if not a["allow"]}
    assert allowed == {
        ("subscribePattern", "ioc/v1/#"),
        ("subscribePattern", "$share/+/ioc/v1/#"),
        ("publishClientReceive", "ioc/v1/#"),
    }
    assert denied == {("publishClientSend", "#")}


def test_the_compose_broker_gives_the_gateway_the_same_role() -> None:
    script = (ROOT / "deploy" / "mosquitto" / "entrypoint.sh").read_text()
    block = re.search(r'"rolename": "ioc-gateway", "acls": (\[.*?\])\}', script, re.S)
    assert block is not None
    acls = json.loads(block.group(1).replace("\\$", "$"))
    assert acls == list(GATEWAY_ACLS)


def test_broker_errors_are_raised_unless_tolerated() -> None:
    assert _error_of({"command": "createClient"}) is None
    exists = {"command": "createClient", "error": "Client already exists"}
    assert _error_of(exists, tolerated=("Client already exists",)) == "Client already exists"
    with pytest.raises(BrokerCommandError, match="createRole: Role already exists") as raised:
        _error_of({"command": "createRole", "error": "Role already exists"})
    assert raised.value.error == "Role already exists" and not raised.value.retriable


def test_admin_url_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOC_MQTT_ADMIN_URL", raising=False)
    assert load_settings().mqtt_admin_url is None
    monkeypatch.setenv("IOC_MQTT_ADMIN_URL", "mqtt://admin:adm%40pw@broker:1885")
    settings = load_settings()
    assert settings.mqtt_admin_url is not None
    printed = json.dumps(settings.masked())
    assert "adm%40pw" not in printed and "broker:1885" in printed
    monkeypatch.setenv("IOC_MQTT_ADMIN_URL", "mqtt://broker:1883")
    with pytest.raises(ConfigurationError, match="IOC_MQTT_ADMIN_URL"):
        load_settings()


def test_accounts_need_the_admin_password() -> None:
    with pytest.raises(ConfigurationError, match="IOC_MQTT_ADMIN_URL"):
        DeviceAccounts("mqtt://admin@127.0.0.1:1883")


def test_device_changes() -> None:
    patch = DevicePatch.model_validate({"name": None, "location": {"lat": 21.0, "lon": 105.8}})
    assert patch.model_dump(exclude_unset=True) == {"name": None, "location": {"lat": 21.0, "lon": 105.8}}
    for bad in ({"location": None}, {"thresholds": None}, {"city": "da-nang"}, {"id": "other"}):
        with pytest.raises(ValidationError):
            DevicePatch.model_validate(bad)


def test_credentials_are_optional_in_the_registration_answer() -> None:
    schema = RegisteredDevice.model_json_schema()
    assert "credentials" in schema["properties"] and "credentials" not in schema.get("required", [])
