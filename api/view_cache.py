"""Polled views answered by version: ETags, 304s, and the bodies of each version rendered once and
kept compressed, shared by every screen that polls the same scope."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastapi import Request, Response

from api.auth import Principal
from ioc_core.storage import Database

# Compressing costs CPU once per cached version; level 6 is most of level 9's gain at a third of it.
_GZIP_LEVEL = 6
_GZIP_MIN_BYTES = 1024
_VIEW_CACHE_ENTRIES = 64
# Bodies this large are compressed on a worker thread, so the event loop keeps answering.
_THREAD_BYTES = 256 * 1024


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
    database: Database,
    cache: ViewCache,
    cities: Sequence[str] | None,
    domains: Sequence[str] | None,
    render: Callable[[], Awaitable[bytes]],
    media_type: str = "application/json",
    also_version: str = "",
) -> Response:
    """Answer a polled view: 304 when the client has this version, else the (cached) body,
    gzipped when the client takes it. The tag covers the path, query, key scope and the state
    versions of the (city, domain) pairs in scope (and `also_version`, what else the view shows),
    read before the body so it is never newer."""
    version = await database.status.version(cities, domains) + also_version
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
    body = await cache.get_or_render(tag, render)
    if body.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        return Response(body.gzipped, media_type=media_type, headers={**headers, "Content-Encoding": "gzip"})
    return Response(body.plain, media_type=media_type, headers=headers)
