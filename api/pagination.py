"""Paged lists: opaque cursors, the `Page` every list answers with, and `paginate`, which fetches
one row more than the page to know whether another page follows."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from fastapi import HTTPException
from pydantic import BaseModel, Field

ItemT = TypeVar("ItemT")
RowT = TypeVar("RowT")


class Page(BaseModel, Generic[ItemT]):
    """One page of a list: `{"items": [...], "next": cursor or null}`."""

    items: list[ItemT]
    next: str | None = Field(description="cursor of the next page, or null on the last")

    @classmethod
    def empty(cls) -> Page[ItemT]:
        return cls(items=[], next=None)


def encode_cursor(value: int | str) -> str:
    kind = "i" if isinstance(value, int) else "s"
    return base64.urlsafe_b64encode(f"v1:{kind}:{value}".encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[str, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, kind, value = text.split(":", 2)
        if version != "v1" or kind not in ("i", "s"):
            raise ValueError(version)
        return kind, value
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise HTTPException(400, "cursor is not valid; use the `next` value of a previous page") from exc


def decode_int_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    kind, value = _decode(cursor)
    if kind != "i" or not value.isdigit() or int(value) > 2**63 - 1:
        raise HTTPException(400, "cursor is not valid for this list; use the `next` value of its last page")
    return int(value)


def decode_text_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    kind, value = _decode(cursor)
    if kind != "s":
        raise HTTPException(400, "cursor is not valid for this list; use the `next` value of its last page")
    return value


async def paginate(
    fetch: Callable[[int], Awaitable[Sequence[RowT]]],
    limit: int,
    *,
    cursor_of: Callable[[RowT], int | str],
    item: Callable[[RowT], ItemT],
) -> Page[ItemT]:
    """`fetch(limit + 1)` rows; the first `limit` make the page, and the one more, if there is
    one, says that another page follows, starting after the cursor of this page's last row."""
    rows = await fetch(limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return Page[ItemT](
        items=[item(row) for row in page], next=encode_cursor(cursor_of(page[-1])) if more else None
    )
