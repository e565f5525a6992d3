"""Secrets kept at rest that the system must be able to use again (webhook signing secrets, which
sign every delivery), sealed with a key from the settings (`IOC_SECRETS_KEY`).

Fernet (from `cryptography`): AES-128-CBC with an HMAC-SHA256 over it, a fresh IV per value, so a
sealed value can neither be read nor altered without the key, and the same secret sealed twice
differs. Rotation: the new key becomes `IOC_SECRETS_KEY` and the old ones go to
`IOC_SECRETS_OLD_KEYS`; values sealed with any of them open, new ones are sealed with the new
key, and `ioc migrate` re-seals what was sealed with an old one, after which the old keys can go.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ioc_core.errors import ConfigurationError


class SecretUnreadable(ConfigurationError):
    """A sealed value that none of the configured keys opens: it was sealed with another key."""


def new_key() -> str:
    """A fresh key for `IOC_SECRETS_KEY`: 32 random bytes, URL-safe base64."""
    return Fernet.generate_key().decode()


def check_key(key: str, setting: str) -> Fernet:
    """The key as a cipher, or a configuration error naming `setting` (never the key itself)."""
    try:
        return Fernet(key.strip().encode())
    except (ValueError, binascii.Error) as exc:
        raise ConfigurationError(
            f"{setting} is not a key: it must be 32 random bytes in URL-safe base64 (44 characters);"
            " `ioc secrets-key` makes one"
        ) from exc


class SecretSealer:
    """Seals with the current key; opens what any of the current and old keys sealed."""

    def __init__(self, key: str, old_keys: Sequence[str] = ()) -> None:
        self._current = check_key(key, "IOC_SECRETS_KEY")
        old = [check_key(k, "IOC_SECRETS_OLD_KEYS") for k in old_keys]
        self._any = MultiFernet([self._current, *old])

    def seal(self, secret: str) -> str:
        return self._any.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._any.decrypt(sealed.encode()).decode()
        except InvalidToken as exc:
            raise SecretUnreadable(
                "a stored secret cannot be opened with IOC_SECRETS_KEY nor any of IOC_SECRETS_OLD_KEYS"
                " (it was sealed with another key; give that key in IOC_SECRETS_OLD_KEYS)"
            ) from exc

    def opens(self, sealed: str) -> bool:
        try:
            self._any.decrypt(sealed.encode())
        except InvalidToken:
            return False
        return True

    def is_current(self, sealed: str) -> bool:
        """Whether `sealed` was sealed with the current key (an old key's value needs re-sealing)."""
        try:
            self._current.decrypt(sealed.encode())
        except InvalidToken:
            return False
        return True

    def reseal(self, sealed: str) -> str:
        """The same secret sealed with the current key."""
        try:
            return self._any.rotate(sealed.encode()).decode()
        except InvalidToken as exc:
            raise SecretUnreadable("a stored secret cannot be opened with any configured key") from exc
