"""Settings (masking, URL parsing) and the GeoJSON device file reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ioc.devices_file import DeviceFileError, read_devices
from ioc_core.errors import ConfigurationError
from ioc_core.settings import load_settings


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "IOC_MQTT_URL",
        "IOC_KAFKA_BOOTSTRAP",
        "IOC_DATABASE_URL",
        "IOC_API_PORT",
        "IOC_ADMIN_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.mqtt.host == "127.0.0.1" and settings.mqtt.port == 1883
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.database_url.get_secret_value() == "postgresql://postgres@127.0.0.1:5432/ioc"
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert settings.admin_api_key is None
    assert settings.webhook_allow_private is False and settings.webhook_allowed_networks == []


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_MQTT_URL", "mqtt://gw:s3cret@broker.local:1884")
    monkeypatch.setenv("IOC_DATABASE_URL", "postgresql://ioc:dbpass@db:5432/ioc")
    monkeypatch.setenv("IOC_ADMIN_API_KEY", "topsecretkey")
    settings = load_settings()
    assert settings.mqtt.username == "gw" and settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret" and settings.mqtt.port == 1884
    printed = json.dumps(settings.masked())
    for secret in ("s3cret", "dbpass", "topsecretkey"):
        assert secret not in printed
    assert "broker.local" in printed
    assert "s3cret" not in repr(settings)


def test_bad_settings_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_MQTT_URL", "http://nowhere")
    with pytest.raises(ConfigurationError, match="IOC_MQTT_URL"):
        load_settings()


def _feature(**properties: object) -> dict[str, object]:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [105.85, 21.03]},
        "properties": properties,
    }


def test_device_file_reads_valid_and_reports_invalid(tmp_path: Path) -> None:
    path = tmp_path / "devices.geojson"
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    _feature(
                        id="hn-fl-1",
                        city="ha-noi",
                        domain="flood",
                        name="Trạm 1",
                        district="Ba Đình",
                        thresholds={"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}},
                    ),
                    _feature(id="bad id", city="ha-noi", domain="flood"),
                    _feature(id="x2", city="ha-noi", domain="weather"),
                    _feature(
                        id="x3", city="ha-noi", domain="flood", thresholds={"voltage": {"warn_above": 1}}
                    ),
                    {
                        "type": "Feature",
                        "geometry": {"type": "LineString", "coordinates": []},
                        "properties": {},
                    },
                ],
            }
        )
    )
    devices, problems = read_devices(path)
    assert [d.id for d in devices] == ["hn-fl-1"]
    assert devices[0].location.lon == 105.85 and devices[0].location.lat == 21.03
    assert len(problems) == 4 and problems[0].startswith("feature 1")


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"type": "Feature"}', '{"type": "FeatureCollection"}']
)
def test_device_file_that_is_not_a_collection_fails_whole(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(DeviceFileError):
        read_devices(path)
