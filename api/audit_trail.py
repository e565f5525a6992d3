"""The caller's side of the audit log: each request gets an `AuditTrail` that knows who is calling
(the API key's id and name) and from which address, and records what the request changes, in the
transaction of the change, and what it was refused because the object lies outside the key's scope.

The address is the socket peer: no trusted-proxy setting exists, so a forwarding header, which any
client can write, is never taken for it (`ioc_core.http` serves without uvicorn's proxy headers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from api.auth import Principal, current_principal
from ioc_core.audit import Actor, AuditRecord, Outcome, scope_of
from ioc_core.storage import Database, Transaction

OUTSIDE_SCOPE = "the object lies outside the key's scope"


@dataclass(slots=True)
class Change:
    """A change in progress: stores join `transaction` (`within=`); `detail` may still be added to
    until the block ends, when the entry is written."""

    transaction: Transaction
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subject:
    """What an entry is about: the action, the object, and the object's cities and domains (None:
    every one), which decide which scoped admins see the entry."""

    action: str
    object_type: str
    object_id: str
    cities: Iterable[str] | None
    domains: Iterable[str] | None
    # The areas the object lies in, for keys limited to areas (None: no area holds it).
    areas: Iterable[str] | None = None


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


class AuditTrail:
    """Records one request's actions."""

    def __init__(self, database: Database, principal: Principal, address: str | None) -> None:
        self.database = database
        self.principal = principal
        self.actor = Actor(key_id=principal.key_id, name=principal.name, address=address)

    def _record(self, subject: Subject, outcome: Outcome, detail: dict[str, Any]) -> AuditRecord:
        return AuditRecord(
            actor=self.actor,
            action=subject.action,
            object_type=subject.object_type,
            object_id=subject.object_id,
            cities=scope_of(subject.cities),
            domains=scope_of(subject.domains),
            outcome=outcome,
            detail=detail,
        )

    @asynccontextmanager
    async def change(self, subject: Subject, **detail: Any) -> AsyncIterator[Change]:
        """A database change and its entry, committed together when the block ends; nothing is
        recorded when the block raises (the change is rolled back)."""
        async with self.database.unit_of_work() as transaction:
            change = Change(transaction, dict(detail))
            yield change
            await self.database.audit.record(self._record(subject, "done", change.detail), within=transaction)

    async def done(self, subject: Subject, **detail: Any) -> None:
        """An action outside the database (the broker's device accounts), once it has succeeded."""
        await self.database.audit.record(self._record(subject, "done", detail))

    async def refuse(
        self, subject: Subject, status: int, answer: str, *, reason: str | None = None, **detail: Any
    ) -> HTTPException:
        """Record an attempt refused because of the key's scope; returns the answer to raise."""
        recorded = {"status": status, "reason": reason or answer, **detail}
        await self.database.audit.record(self._record(subject, "refused", recorded))
        return HTTPException(status, answer)

    async def require_scope(self, subject: Subject, *, what: str) -> None:
        """Objects outside the key's scope answer exactly as missing ones do (404), so a key cannot
        learn that they exist; the attempt is recorded."""
        if not self.principal.covers(subject.cities, subject.domains) or not self.principal.sees_areas(
            subject.areas
        ):
            raise await self.refuse(subject, 404, f"{what} not found", reason=OUTSIDE_SCOPE)


async def _audit_trail(
    request: Request, principal: Annotated[Principal, Depends(current_principal)]
) -> AuditTrail:
    database: Database = request.app.state.database
    return AuditTrail(database, principal, client_address(request))


Audit = Annotated[AuditTrail, Depends(_audit_trail)]
