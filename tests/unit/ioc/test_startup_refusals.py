"""`ioc` refuses to start, in one line on stderr and with a non-zero exit, when a secret is still a
placeholder or the key that seals webhook secrets is missing, before it connects to anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from ioc.cli import _needs_secrets_key
from ioc_core.sealing import new_key
from ioc_core.settings import Settings
from tests.certificates import make_server_certificate

ROOT = Path(__file__).resolve().parents[3]
# Nothing listens here: a command that got as far as connecting would fail differently.
NOWHERE = {
    "IOC_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/ioc",
    "IOC_MQTT_URL": "mqtt://127.0.0.1:9",
    "IOC_KAFKA_BOOTSTRAP": "127.0.0.1:9",
}


def ioc(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
    env.update(NOWHERE, **settings)
    return subprocess.run(
        [sys.executable, "-m", "ioc.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["api", "gateway", "processor", "migrate", "webhooks", "up"])
def test_every_command_refuses_a_placeholder_password(command: str) -> None:
    result = ioc(
        command,
        IOC_DATABASE_URL="postgresql://postgres:change-me@127.0.0.1:9/ioc",
        IOC_SECRETS_KEY=new_key(),
    )
    assert result.returncode == 1
    assert one_line(result) == (
        f"ioc {command}: IOC_DATABASE_URL still holds a placeholder secret (change-me…):"
        " set a real one before starting"
    )
    assert result.stdout == ""


def test_the_compose_default_style_of_placeholders_is_refused_too() -> None:
    result = ioc(
        "gateway",
        IOC_MQTT_URL="mqtt://ioc-gateway:change-me-gateway@127.0.0.1:9",
        IOC_ADMIN_API_KEY="change-me",
    )
    assert result.returncode == 1
    assert "IOC_MQTT_URL, IOC_ADMIN_API_KEY still hold a placeholder" in one_line(result)
    assert "change-me-gateway" not in result.stderr


@pytest.mark.parametrize("command", ["api", "webhooks", "processor"])
def test_the_components_that_keep_webhook_secrets_refuse_to_start_without_the_key(command: str) -> None:
    result = ioc(command)
    assert result.returncode == 1
    assert one_line(result).startswith(f"ioc {command}: IOC_SECRETS_KEY is not set")


def test_only_the_components_that_keep_webhook_secrets_need_the_key() -> None:
    with_worker, without_worker = Settings(webhook_worker=True), Settings(webhook_worker=False)
    assert _needs_secrets_key("processor", with_worker)
    assert not _needs_secrets_key("processor", without_worker)
    for command in ("gateway", "migrate", "simulate", "devices", "up"):
        assert not _needs_secrets_key(command, with_worker), command


def test_secrets_key_prints_a_new_key() -> None:
    first, second = ioc("secrets-key"), ioc("secrets-key")
    assert first.returncode == 0 and first.stderr == ""
    key = first.stdout.strip()
    Fernet(key.encode())
    assert key != second.stdout.strip()


def test_an_api_certificate_that_does_not_load_is_refused_in_one_line(tmp_path: Path) -> None:
    made = make_server_certificate(tmp_path / "one")
    other = make_server_certificate(tmp_path / "other")
    result = ioc(
        "api",
        IOC_SECRETS_KEY=new_key(),
        IOC_API_TLS_CERT_FILE=str(made.cert_file),
        IOC_API_TLS_KEY_FILE=str(other.key_file),
    )
    assert result.returncode == 1
    assert "do not load as a certificate and its unencrypted key" in one_line(result)
    result = ioc(
        "api",
        IOC_SECRETS_KEY=new_key(),
        IOC_API_TLS_CERT_FILE=str(tmp_path / "missing.crt"),
        IOC_API_TLS_KEY_FILE=str(made.key_file),
    )
    assert result.returncode == 1 and "missing.crt" in one_line(result)
