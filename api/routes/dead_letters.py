"""Dead letters: device messages the pipeline rejected, with their reason (admin, unscoped)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from api.auth import Admin
from api.deps import Db
from api.pagination import Page, decode_int_cursor, paginate
from api.problems import PROBLEM

router = APIRouter(tags=["dead letters"])


class DeadLetterItem(BaseModel):
    id: str
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str = Field(description="the raw payload as UTF-8 text, cut at 4 KiB")
    payload_size: int = Field(description="size of the original payload in bytes")


@router.get(
    "/v1/dead-letters",
    response_model=Page[DeadLetterItem],
    summary="Rejected device messages with their reason, newest first (admin).",
    responses={400: PROBLEM},
)
async def dead_letters(
    database: Db,
    principal: Admin,
    reason: Annotated[
        str | None, Query(max_length=64, pattern="^[a-z_]+$", description="only this reason")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
) -> Page[DeadLetterItem]:
    if principal.cities is not None or principal.domains is not None:
        # A rejected message may name no device, so it cannot be placed in a scope.
        raise HTTPException(403, "dead letters need an admin key without a city or domain limit")
    before = decode_int_cursor(cursor)
    return await paginate(
        lambda n: database.dead_letters.page(limit=n, before_id=before, reason=reason),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: DeadLetterItem(**{**row.model_dump(), "id": str(row.id)}),
    )
