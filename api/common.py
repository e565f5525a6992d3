"""What the API's routers share: parameter types, cursors, filters, and cached views with ETags."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import HTTPException, Path, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api import problems
from api.auth import Principal
from ioc_core.alarms import Alarm
from ioc_core.domains import DOMAINS
from ioc_core.models import Device
from ioc_core.storage import Database
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN

PROBLEM: dict[str, Any] = {"model": problems.Problem, "content": {problems.PROBLEM_MEDIA_TYPE: {}}}

AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1, description="alarm id")]
DeviceId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="device id")]
DomainName = Annotated[str, Path(pattern="^(" + "|".join(DOMAINS) + ")$", description="domain")]
CityFilter = Annotated[str | None, Query(pattern=f"^{CITY_PATTERN.pattern}$", description="city slug")]
DomainFilter = Annotated[str | None, Query(pattern="^(" + "|".join(DOMAINS) + ")$", description="domain")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next` of the previous page")]
BboxFilter = Annotated[
    str | None,
    Query(
        max_length=200,
        description="bounding box `minLon,minLat,maxLon,maxLat` (WGS 84 degrees)",
        examples=["105.75,20.95,105.90,21.10"],
    ),
]

# Compressing costs CPU once per cached version; level 6 is most of level 9's gain at a third of it.
_GZIP_LEVEL = 6
_GZIP_MIN_BYTES = 1024
_VIEW_CACHE_ENTRIES = 64
# Bodies this large are compressed on a worker thread, so the event loop keeps answering.
_THREAD_BYTES = 256 * 1024


def db(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


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


def comma_list(value: str | None, allowed: Sequence[str], name: str) -> list[str] | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise HTTPException(400, f"{name} must be a comma-separated list of {', '.join(allowed)}")
    return items


def parse_bbox(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    parts = value.split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise HTTPException(400, "bbox must be four numbers: minLon,minLat,maxLon,maxLat")
    min_lon, min_lat, max_lon, max_lat = numbers
    if not (-180 <= min_lon <= max_lon <= 180 and -90 <= min_lat <= max_lat <= 90):
        raise HTTPException(
            400, "bbox must have -180 <= minLon <= maxLon <= 180 and -90 <= minLat <= maxLat <= 90"
        )
    return min_lon, min_lat, max_lon, max_lat


def _outside_scope(principal: Principal, city: str, domain: str, what: str) -> None:
    """Objects outside the key's scope answer exactly as missing ones do."""
    if not principal.allows(city, domain):
        raise HTTPException(404, f"{what} not found")


async def scoped_device(request: Request, principal: Principal, device_id: str) -> Device:
    device = await db(request).devices.get(device_id)
    _outside_scope(principal, device.city, device.domain, f"device {device_id!r}")
    return device


async def scoped_alarm(request: Request, principal: Principal, alarm_id: int) -> Alarm:
    alarm = await db(request).alarms.get(alarm_id)
    _outside_scope(principal, alarm.city, alarm.domain, f"alarm {alarm_id}")
    return alarm


def sees_nothing(cities: Sequence[str] | None, domains: Sequence[str] | None) -> bool:
    """Filters narrowed to the key's scope that no object can match (see `Principal.narrow`)."""
    return cities == [] or domains == []


_ALLOWED_QUERY: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query_parameters(request: Request) -> None:
    """A misspelt filter must not silently widen a query: unknown parameters are a 400."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _ALLOWED_QUERY.get(id(route))
    if allowed is None:
        allowed = frozenset(_query_names(route.dependant))
        _ALLOWED_QUERY[id(route)] = allowed
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise HTTPException(400, f"unknown query parameter {', '.join(unknown)}; this endpoint takes {known}")


@dataclass(frozen=True, slots=True)
class _CachedBody:
    plain: bytes
    gzipped: bytes | None


class ViewCache:
    """Bodies of polled views by ETag: every screen polling one city shares one rendering of a
    version, and an unchanged version costs a single small query."""

    def __init__(self, entries: int = _VIEW_CACHE_ENTRIES) -> None:
        self._entries: OrderedDict[str, _CachedBody] = OrderedDict()
        self._size = entries
        self._rendering: dict[str, asyncio.Future[_CachedBody]] = {}

    async def get_or_render(self, tag: str, render: Callable[[], Awaitable[bytes]]) -> _CachedBody:
        """The body for `tag`, rendering it once however many requests ask at the same time:
        while the pipeline ingests, versions change several times a second, and without this
        every waiting screen would render the same version again."""
        body = self.get(tag)
        if body is not None:
            return body
        pending = self._rendering.get(tag)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_CachedBody] = asyncio.get_running_loop().create_future()
        self._rendering[tag] = future
        try:
            plain = await render()
            body = self.put(tag, plain, await _compressed(plain))
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            # Read, so an error nobody else waited for is not reported as never retrieved.
            future.exception()
            raise
        finally:
            del self._rendering[tag]

    def get(self, tag: str) -> _CachedBody | None:
        body = self._entries.get(tag)
        if body is not None:
            self._entries.move_to_end(tag)
        return body

    def put(self, tag: str, plain: bytes, gzipped: bytes | None) -> _CachedBody:
        body = _CachedBody(plain, gzipped)
        self._entries[tag] = body
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return body


async def _compressed(plain: bytes) -> bytes | None:
    if len(plain) < _GZIP_MIN_BYTES:
        return None
    if len(plain) < _THREAD_BYTES:
        return gzip.compress(plain, _GZIP_LEVEL, mtime=0)
    return await asyncio.to_thread(gzip.compress, plain, _GZIP_LEVEL, mtime=0)


def etag_matches(if_none_match: str | None, tag: str) -> bool:
    if not if_none_match:
        return False
    weak_tag = tag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == weak_tag:
            return True
    return False


async def cached_view(
    request: Request,
    principal: Principal,
    *,
    cities: Sequence[str] | None,
    domains: Sequence[str] | None,
    render: Callable[[], Awaitable[bytes]],
    media_type: str = "application/json",
) -> Response:
    """Answer a polled view: 304 when the client has this version, else the (cached) body,
    gzipped when the client takes it. The tag covers the path, query, key scope and the state
    versions of the (city, domain) pairs in scope, read before the body so it is never newer."""
    version = await db(request).status.version(cities, domains)
    query = "&".join(f"{k}={v}" for k, v in sorted(request.query_params.multi_items()))
    digest = hashlib.blake2b(
        f"{request.url.path}?{query}|{principal.scope_key}|{version}".encode(), digest_size=16
    ).hexdigest()
    tag = f'W/"{digest}"'
    headers = {
        "ETag": tag,
        "Cache-Control": "private, no-cache",
        "Vary": "Accept-Encoding, Authorization, X-API-Key",
    }
    if etag_matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    cache: ViewCache = request.app.state.view_cache
    body = await cache.get_or_render(tag, render)
    if body.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        return Response(body.gzipped, media_type=media_type, headers={**headers, "Content-Encoding": "gzip"})
    return Response(body.plain, media_type=media_type, headers=headers)
