"""Webhook signing secrets at rest, for the webhooks store (`ioc_core.storage.webhooks`): sealed
with the key of IOC_SECRETS_KEY when an endpoint is made, opened when a delivery is claimed.

A secret stored in plain text by an earlier version (`whsec_…`) is used as it is until
`seal_all` (run by `ioc migrate`) seals it; the same pass seals again with the current key what
an old key sealed, which is how a key rotation ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ioc_core.errors import ConfigurationError
from ioc_core.sealing import SecretSealer, SecretUnreadable
from ioc_core.storage.pool import Connection
from ioc_core.webhooks import SECRET_PREFIX

_SHOWN_IDS = 5


@dataclass(frozen=True, slots=True)
class SealingReport:
    """What `seal_all` did: secrets sealed that were in plain text, and secrets sealed with an old
    key that were sealed again with the current one."""

    sealed: int
    resealed: int


def is_plain(stored: str) -> bool:
    return stored.startswith(SECRET_PREFIX)


class StoredSecrets:
    """Seals and opens the stored secrets. Without a sealer nothing can be sealed and only plain
    (earlier versions') secrets open."""

    def __init__(self, sealer: SecretSealer | None) -> None:
        self._sealer = sealer

    def seal(self, secret: str) -> str:
        if self._sealer is None:
            raise ConfigurationError(
                "IOC_SECRETS_KEY is not set: a webhook signing secret is never stored unsealed"
            )
        return self._sealer.seal(secret)

    def open(self, stored: str) -> str | None:
        """The secret, or None when no configured key opens it."""
        if is_plain(stored):
            return stored
        if self._sealer is None:
            return None
        try:
            return self._sealer.open(stored)
        except SecretUnreadable:
            return None

    def refuse_unreadable(self, stored_by_endpoint: Sequence[tuple[str, str]]) -> None:
        """Refuse, naming the endpoints, when a stored secret opens with no configured key."""
        refused = [endpoint for endpoint, stored in stored_by_endpoint if self.open(stored) is None]
        if not refused:
            return
        more = len(refused) - _SHOWN_IDS
        shown = ", ".join(refused[:_SHOWN_IDS]) + (f" and {more} more" if more > 0 else "")
        raise SecretUnreadable(
            f"the signing secrets of webhook endpoints {shown} open with neither IOC_SECRETS_KEY nor"
            " IOC_SECRETS_OLD_KEYS: give the key they were sealed with in IOC_SECRETS_OLD_KEYS"
        )

    async def seal_all(self, connection: Connection) -> SealingReport:
        """Inside the caller's transaction: seal the plain secrets, and seal again with the current
        key those an old key sealed. A secret no configured key opens stops it all, since that
        endpoint's deliveries could never be signed."""
        sealer = self._sealer
        if sealer is None:
            raise ConfigurationError("IOC_SECRETS_KEY is not set: there is nothing to seal secrets with")
        rows = await connection.fetch("SELECT id, secret FROM webhook_endpoints ORDER BY id FOR UPDATE")
        self.refuse_unreadable([(r["id"], r["secret"]) for r in rows])
        sealed = resealed = 0
        for row in rows:
            stored: str = row["secret"]
            if is_plain(stored):
                new, sealed = sealer.seal(stored), sealed + 1
            elif not sealer.is_current(stored):
                new, resealed = sealer.reseal(stored), resealed + 1
            else:
                continue
            await connection.execute("UPDATE webhook_endpoints SET secret = $2 WHERE id = $1", row["id"], new)
        return SealingReport(sealed=sealed, resealed=resealed)
