"""API-key authentication and scopes. Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`.

A key has a role (viewer < operator < admin) and may be limited to some cities and domains; a
`metrics` key reads `/metrics` and nothing else (as may an admin without a scope limit).
Objects outside a key's scope do not exist for it: they answer 404, never 403, so a key cannot
even learn that another city's device or alarm exists.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsMarker
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import State

from ioc_core.access import KEY_MAX_LENGTH, hash_key, is_admin_key, may_read_metrics
from ioc_core.storage import ApiKeyRow, Database

Role = Literal["viewer", "operator", "admin", "metrics"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin", "metrics")
# A metrics key is below every other role: it reads /metrics and nothing else.
_RANK: dict[Role, int] = {"metrics": -1, "viewer": 0, "operator": 1, "admin": 2}
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
    # A ward office's key: only the devices lying in these areas, and their alarms (None: no limit).
    areas: frozenset[str] | None = None

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

    def area_filter(self, requested: list[str] | None) -> list[str] | None:
        """An `area=` filter within the key's areas: None = no filter, [] = nothing can match."""
        if self.areas is None:
            return requested
        return sorted(self.areas if requested is None else self.areas & set(requested))

    def sees_areas(self, areas: Iterable[str] | None) -> bool:
        """Whether an object lying in `areas` (None: an object no area holds) is within the key's."""
        return self.areas is None or (areas is not None and not self.areas.isdisjoint(areas))

    def city_filter(self, city: str | None) -> list[str] | None:
        return self.narrow(city, self.cities)

    def domain_filter(self, domain: str | None) -> list[str] | None:
        return self.narrow(domain, self.domains)

    @property
    def scope_key(self) -> str:
        """Identifies the scope, for caches and ETags shared by keys that see the same."""
        cities = ",".join(sorted(self.cities)) if self.cities is not None else "*"
        domains = ",".join(sorted(self.domains)) if self.domains is not None else "*"
        areas = ",".join(sorted(self.areas)) if self.areas is not None else "*"
        return f"{cities}|{domains}|{areas}"


_SETTINGS_ADMIN = Principal(name="admin", role="admin")


def principal_of(row: ApiKeyRow) -> Principal:
    return Principal(
        name=row.name or row.id,
        role=row.role,  # type: ignore[arg-type]
        cities=frozenset(row.cities) if row.cities is not None else None,
        domains=frozenset(row.domains) if row.domains is not None else None,
        key_id=row.id,
        areas=frozenset(row.areas) if row.areas is not None else None,
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


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key in raw ASGI request headers, read as `current_principal` reads it (a bearer token
    first, then `X-API-Key`), for code that runs before the route (the rate limiter)."""
    bearer: str | None = None
    header: str | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials:
                bearer = credentials
        elif name == b"x-api-key":
            header = value.decode("latin-1")
    return bearer or header or None


def cached_principal(state: State, key: str) -> tuple[bool, Principal | None]:
    """Who `key` is, when that is known without a query: (known, principal or None if invalid)."""
    if is_admin_key(key, state.settings.admin_api_key):
        return True, _SETTINGS_ADMIN
    if len(key) > KEY_MAX_LENGTH:
        return True, None
    cache: KeyCache = state.key_cache
    return cache.get(hash_key(key))


async def principal_for_key(state: State, key: str) -> Principal | None:
    known, principal = cached_principal(state, key)
    if known:
        return principal
    database: Database = state.database
    digest = hash_key(key)
    row = await database.api_keys.by_hash(digest)
    principal = principal_of(row) if row is not None else None
    cache: KeyCache = state.key_cache
    cache.put(digest, principal)
    return principal


# Where the rate limiter leaves the principal it looked up for a request, so the route does not
# look it up again (with IOC_API_KEY_CACHE_S=0 that would be a second query).
RESOLVED_PRINCIPAL = "ioc.resolved_principal"


async def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = _presented_key(bearer, header)
    if key is None:
        raise HTTPException(401, "an API key is required", headers={"WWW-Authenticate": "Bearer"})
    if RESOLVED_PRINCIPAL in request.scope:
        principal: Principal | None = request.scope[RESOLVED_PRINCIPAL]
    else:
        principal = await principal_for_key(request.app.state, key)
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


async def _metrics_reader(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not may_read_metrics(principal.role, principal.cities, principal.domains):
        raise HTTPException(403, "this needs the metrics role (or an admin key without a scope limit)")
    return principal


Viewer = Annotated[Principal, require("viewer")]
Operator = Annotated[Principal, require("operator")]
Admin = Annotated[Principal, require("admin")]
MetricsReader = Annotated[Principal, Depends(_metrics_reader)]
