"""Secrets and their defaults: sealing with IOC_SECRETS_KEY and its rotation, the settings that
carry the keys, and the refusal of placeholder secrets (`change-me…`)."""

from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet

from ioc_core.errors import ConfigurationError
from ioc_core.sealing import SecretSealer, SecretUnreadable, new_key
from ioc_core.settings import load_settings
from ioc_core.storage.webhook_secrets import StoredSecrets
from ioc_core.webhooks import new_secret

OLD, CURRENT, OTHER = new_key(), new_key(), new_key()


def test_a_sealed_secret_reveals_nothing_and_opens_again() -> None:
    secret = new_secret()
    sealer = SecretSealer(CURRENT)
    sealed = sealer.seal(secret)
    assert sealed != secret and secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert sealer.seal(secret) != sealed, "a fresh IV every time: equal secrets do not look equal"
    assert sealer.open(sealed) == secret
    assert Fernet(CURRENT.encode()).decrypt(sealed.encode()).decode() == secret


def test_a_sealed_secret_cannot_be_altered_unnoticed() -> None:
    sealer = SecretSealer(CURRENT)
    sealed = sealer.seal(new_secret())
    flipped = sealed[:30] + ("A" if sealed[30] != "A" else "B") + sealed[31:]
    with pytest.raises(SecretUnreadable):
        sealer.open(flipped)


def test_rotation_opens_with_old_keys_and_seals_with_the_current_one() -> None:
    secret = new_secret()
    sealed_by_old = SecretSealer(OLD).seal(secret)
    rotating = SecretSealer(CURRENT, [OLD])
    assert rotating.open(sealed_by_old) == secret
    assert not rotating.is_current(sealed_by_old)
    resealed = rotating.reseal(sealed_by_old)
    assert rotating.is_current(resealed)
    assert SecretSealer(CURRENT).open(resealed) == secret
    with pytest.raises(SecretUnreadable, match="IOC_SECRETS_OLD_KEYS"):
        SecretSealer(CURRENT).open(sealed_by_old)
    assert rotating.is_current(rotating.seal(secret))


def test_a_key_that_is_not_one_is_refused_without_being_repeated() -> None:
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_KEY is not a key") as refused:
        SecretSealer("correct horse battery staple")
    assert "horse" not in str(refused.value)
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_OLD_KEYS is not a key"):
        SecretSealer(CURRENT, ["short"])


def test_stored_secrets_never_store_plain_text_and_read_earlier_plain_ones() -> None:
    secret = new_secret()
    without_key = StoredSecrets(None)
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_KEY is not set"):
        without_key.seal(secret)
    # An earlier version's plain secret is used until `ioc migrate` seals it.
    assert without_key.open(secret) == secret
    stored = StoredSecrets(SecretSealer(CURRENT))
    assert without_key.open(stored.seal(secret)) is None
    assert StoredSecrets(SecretSealer(OTHER)).open(stored.seal(secret)) is None
    ids = [(f"wh_{n}", stored.seal(secret)) for n in range(7)]
    with pytest.raises(SecretUnreadable, match="wh_0, wh_1, wh_2, wh_3, wh_4 and 2 more"):
        StoredSecrets(SecretSealer(OTHER)).refuse_unreadable(ids)
    stored.refuse_unreadable([*ids, ("wh_plain", secret)])


def test_keys_come_from_the_environment_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_SECRETS_KEY", CURRENT)
    monkeypatch.setenv("IOC_SECRETS_OLD_KEYS", f" {OLD} ,{OTHER}")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.secrets_old_keys] == [OLD, OTHER]
    sealed = SecretSealer(OTHER).seal("whsec_x")
    assert settings.sealer().open(sealed) == "whsec_x"
    printed = json.dumps(settings.masked())
    for key in (CURRENT, OLD, OTHER):
        assert key not in printed and key not in repr(settings)


def test_a_bad_key_in_the_environment_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_SECRETS_KEY", "not-a-key")
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_KEY is not a key") as refused:
        load_settings().sealer()
    assert "\n" not in str(refused.value) and "not-a-key" not in str(refused.value)
    monkeypatch.setenv("IOC_SECRETS_KEY", "change-me")
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_KEY still holds a placeholder"):
        load_settings()


def test_without_a_key_there_is_no_sealer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOC_SECRETS_KEY", raising=False)
    settings = load_settings()
    assert settings.sealer_if_configured() is None
    with pytest.raises(ConfigurationError, match=r"IOC_SECRETS_KEY is not set.*ioc secrets-key"):
        settings.sealer()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOC_DATABASE_URL", "postgresql://postgres:change-me@timescaledb:5432/ioc"),
        ("IOC_DATABASE_URL", "postgresql://postgres@db/ioc?password=ChangeMe"),
        ("IOC_MQTT_URL", "mqtt://ioc-gateway:change-me-gateway@mosquitto:1883"),
        ("IOC_MQTT_ADMIN_URL", "mqtt://admin:CHANGE_ME-admin@mosquitto:1883"),
        ("IOC_ADMIN_API_KEY", "change-me-admin-key"),
    ],
)
def test_a_placeholder_secret_is_refused_in_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    message = str(refused.value)
    assert message.startswith(f"{variable} still holds a placeholder secret")
    assert "\n" not in message and value not in message


def test_every_placeholder_secret_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_DATABASE_URL", "postgresql://postgres:change-me@db/ioc")
    monkeypatch.setenv("IOC_ADMIN_API_KEY", "changeme")
    with pytest.raises(ConfigurationError, match=r"^IOC_DATABASE_URL, IOC_ADMIN_API_KEY still hold"):
        load_settings()


def test_placeholders_outside_secrets_and_real_secrets_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_GATEWAY_CLIENT_ID", "change-me")
    monkeypatch.setenv("IOC_DATABASE_URL", "postgresql://postgres:Xq7-changes-daily@db/ioc")
    monkeypatch.setenv("IOC_ADMIN_API_KEY", "ioc_9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    assert load_settings().gateway_client_id == "change-me"


def test_the_api_certificate_and_key_go_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_API_TLS_CERT_FILE", "/run/tls/api.crt")
    with pytest.raises(
        ConfigurationError, match="IOC_API_TLS_CERT_FILE and IOC_API_TLS_KEY_FILE go together"
    ):
        load_settings()
    monkeypatch.setenv("IOC_API_TLS_KEY_FILE", "/run/tls/api.key")
    assert load_settings().api_tls is not None
