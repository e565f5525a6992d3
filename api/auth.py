"""API-key authentication and scopes. Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`.

A key has a role (viewer < operator < admin) and may be limited to some cities and domains.
Objects outside a key's scope do not exist for it: they answer 404, never 403, so a key cannot
even learn that another city's device or alarm exists.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsMarker
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers

from ioc_core.storage import ApiKeyRow, Database

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
_RANK: dict[Role, int] = {"viewer": 0, "operator": 1, "admin": 2}
_CACHE_MAX = 10_000

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


@dataclass(frozen=True)
class Principal:
    """Who is calling: `cities`/`domains` None means every one."""

    name: str
    role: Role
    cities: frozenset[str] | None = None
    domains: frozenset[str] | None = None
    key_id: str | None = None

    def allows(self, city: str, domain: str) -> bool:
        return (self.cities is None or city in self.cities) and (
            self.domains is None or domain in self.domains
        )

    def has_role(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def covers(self, cities: Iterable[str] | None, domains: Iterable[str] | None) -> bool:
        """Whether a scope (None = all) lies within this principal's: keys it makes cannot see more."""
        if self.cities is not None and (cities is None or not set(cities) <= self.cities):
            return False
        return self.domains is None or (domains is not None and set(domains) <= self.domains)

    def narrow(self, requested: str | None, scope: frozenset[str] | None) -> list[str] | None:
        """A query filter within the scope: None = no filter, [] = nothing can match."""
        if requested is not None:
            return [requested] if scope is None or requested in scope else []
        return None if scope is None else sorted(scope)

    def city_filter(self, city: str | None) -> list[str] | None:
        return self.narrow(city, self.cities)

    def domain_filter(self, domain: str | None) -> list[str] | None:
        return self.narrow(domain, self.domains)

    @property
    def scope_key(self) -> str:
        """Identifies the scope, for caches and ETags shared by keys that see the same."""
        cities = ",".join(sorted(self.cities)) if self.cities is not None else "*"
        domains = ",".join(sorted(self.domains)) if self.domains is not None else "*"
        return f"{cities}|{domains}"


def hash_key(key: str) -> bytes:
    """Keys are 32 random bytes, so a plain SHA-256 is enough to keep them unusable at rest."""
    return hashlib.sha256(key.encode()).digest()


def principal_of(row: ApiKeyRow) -> Principal:
    return Principal(
        name=row.name or row.id,
        role=row.role,  # type: ignore[arg-type]
        cities=frozenset(row.cities) if row.cities is not None else None,
        domains=frozenset(row.domains) if row.domains is not None else None,
        key_id=row.id,
    )


class KeyCache:
    """Looked-up keys for a few seconds, so polling screens do not cost a query each."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    def get(self, digest: bytes) -> tuple[bool, Principal | None]:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, digest: bytes, principal: Principal | None) -> None:
        if len(self._entries) >= _CACHE_MAX:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self._ttl_s, principal)

    def clear(self) -> None:
        self._entries.clear()


def _presented_key(bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return header or None


def key_from_headers(headers: Headers) -> str | None:
    """The key a request presents, read as `current_principal`'s security schemes read it: a
    bearer token first, else `X-API-Key`."""
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return headers.get("x-api-key") or None


async def principal_for_key(request: Request, key: str) -> Principal | None:
    admin_key = request.app.state.settings.admin_api_key
    if admin_key is not None and hmac.compare_digest(key.encode(), admin_key.get_secret_value().encode()):
        return Principal(name="admin", role="admin")
    if len(key) > 200:
        return None
    digest = hash_key(key)
    cache: KeyCache = request.app.state.key_cache
    hit, principal = cache.get(digest)
    if hit:
        return principal
    database: Database = request.app.state.database
    row = await database.api_keys.by_hash(digest)
    principal = principal_of(row) if row is not None else None
    cache.put(digest, principal)
    return principal


async def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = _presented_key(bearer, header)
    if key is None:
        raise HTTPException(401, "an API key is required", headers={"WWW-Authenticate": "Bearer"})
    principal = await principal_for_key(request, key)
    if principal is None:
        raise HTTPException(401, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


def require(role: Role) -> DependsMarker:
    """A dependency that yields the caller's `Principal` when it has at least `role`."""

    async def _check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.has_role(role):
            raise HTTPException(403, f"this needs the {role} role")
        return principal

    marker: DependsMarker = Depends(_check)
    return marker


Viewer = Annotated[Principal, require("viewer")]
Operator = Annotated[Principal, require("operator")]
Admin = Annotated[Principal, require("admin")]
