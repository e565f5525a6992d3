"""API keys as every component checks them: how a key is presented and stored, and who may read
a component's `/metrics`.

The API authenticates every route with these keys (`api.auth`); the gateway's and processor's
small HTTP servers (`ioc_core.health`) check them for `/metrics` only, through `MetricsKeys`.
Metrics need a key because they describe the whole system: devices by status in every city,
rejected messages by reason, how far behind each partition is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from enum import Enum

from pydantic import SecretStr

from ioc_core.errors import ServiceUnavailableError
from ioc_core.storage.views import ApiKeyRow

log = logging.getLogger(__name__)

METRICS_ROLE = "metrics"
# Keys are looked up by digest; longer strings are not keys and are not hashed or looked up.
KEY_MAX_LENGTH = 200

KeyLookup = Callable[[bytes], Awaitable[ApiKeyRow | None]]


def hash_key(key: str) -> bytes:
    """Keys are 32 random bytes, so a plain SHA-256 is enough to keep them unusable at rest."""
    return hashlib.sha256(key.encode()).digest()


def presented_key(authorization: str | None, api_key_header: str | None) -> str | None:
    """The key of a request: `Authorization: Bearer KEY`, else `X-API-Key: KEY`."""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return api_key_header or None


def is_admin_key(key: str, admin_key: SecretStr | None) -> bool:
    return admin_key is not None and hmac.compare_digest(key.encode(), admin_key.get_secret_value().encode())


def may_read_metrics(role: str, cities: Collection[str] | None, domains: Collection[str] | None) -> bool:
    """A `metrics` key, or an admin of the whole system: metrics count across every city and
    domain, so an admin limited to some may not read them (as with dead letters)."""
    return role == METRICS_ROLE or (role == "admin" and cities is None and domains is None)


class Verdict(Enum):
    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"  # a valid key without the role
    UNKNOWN = "unknown"  # not a key, or a revoked one


class MetricsKeys:
    """Who may read a component's `/metrics`: the settings' admin key, and keys in the database
    with the `metrics` role (or unscoped admins).

    An answer of the database is trusted for `cache_s` (the revocation delay, as in the API).
    While the database cannot be asked, the last answer it gave for a key stands, so that the
    metrics of a database outage can be read during it; a key never seen before then answers
    `ServiceUnavailableError`."""

    def __init__(self, admin_key: SecretStr | None, lookup: KeyLookup | None, *, cache_s: float) -> None:
        self._admin_key = admin_key
        self._lookup = lookup
        self._cache_s = cache_s
        self._answers: dict[bytes, tuple[float, Verdict]] = {}

    async def verdict(self, key: str) -> Verdict:
        if is_admin_key(key, self._admin_key):
            return Verdict.ALLOWED
        if self._lookup is None or len(key) > KEY_MAX_LENGTH:
            return Verdict.UNKNOWN
        digest = hash_key(key)
        known = self._answers.get(digest)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        try:
            row = await self._lookup(digest)
        except ServiceUnavailableError:
            if known is None:
                raise
            # Asked again after another `cache_s`, not at every scrape of the outage.
            self._answers[digest] = (time.monotonic() + self._cache_s, known[1])
            return known[1]
        verdict = Verdict.UNKNOWN
        if row is not None:
            allowed = may_read_metrics(row.role, row.cities, row.domains)
            verdict = Verdict.ALLOWED if allowed else Verdict.FORBIDDEN
        if len(self._answers) >= 10_000:
            self._answers.clear()
        self._answers[digest] = (time.monotonic() + self._cache_s, verdict)
        return verdict
