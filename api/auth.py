"""API-key authentication. Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsMarker
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

Role = Literal["viewer", "operator", "admin"]
_RANK: dict[Role, int] = {"viewer": 0, "operator": 1, "admin": 2}

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def _presented_key(bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return header or None


async def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = _presented_key(bearer, header)
    if key is None:
        raise HTTPException(401, "an API key is required", headers={"WWW-Authenticate": "Bearer"})
    admin_key = request.app.state.settings.admin_api_key
    if admin_key is not None and hmac.compare_digest(key.encode(), admin_key.get_secret_value().encode()):
        return Principal(name="admin", role="admin")
    raise HTTPException(401, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})


def require(role: Role) -> DependsMarker:
    async def _check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if _RANK[principal.role] < _RANK[role]:
            raise HTTPException(403, f"this needs the {role} role")
        return principal

    marker: DependsMarker = Depends(_check)
    return marker
