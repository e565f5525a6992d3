"""History exports for planners and integrators: a domain's readings over a range, or per-device
buckets of them, streamed as CSV or Parquet (see `ioc_core.exports`).

An export holds a pooled database connection, in a transaction, from its first row to its last
byte sent, however slowly the client reads; so each API process runs at most
`IOC_API_MAX_EXPORTS` of them at once, and more are a 429, before any database work."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from api.auth import Viewer
from api.deps import AppSettings, Db
from api.params import AreaFilter, CityFilter, area_list
from api.problems import PROBLEM, RETRY_AFTER_S, TOO_MANY_REQUESTS
from ioc_core.domains import DOMAINS
from ioc_core.exports import (
    FORMATS,
    MEDIA_TYPES,
    Encoder,
    check_range,
    choose_metrics,
    encoder,
    export_columns,
    file_name,
    parse_bucket,
    parse_format,
)
from ioc_core.supervision import describe

log = logging.getLogger(__name__)

router = APIRouter(tags=["export"])

Rows = AsyncGenerator[list[tuple[Any, ...]], None]


class ExportSlots:
    """The exports one API process runs at once (`IOC_API_MAX_EXPORTS`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def take(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def give_back(self) -> None:
        self.running -= 1


class _ExportStream:
    """One export's bytes, from its rows as the storage reads them, and its end: the slot given
    back, the database connection released, one log line."""

    def __init__(
        self,
        what: str,
        key: str,
        rows: Rows,
        first: Sequence[tuple[Any, ...]],
        encoder: Encoder,
        slots: ExportSlots,
        started: float,
    ) -> None:
        self._what, self._key = what, key
        self._rows, self._first, self._encoder = rows, first, encoder
        self._slots = slots
        self._started = started
        self._rows_sent = self._bytes_sent = 0
        self._finished = self._closed = False
        self.chunks = self._generate()

    def _encoded(self, rows: Sequence[tuple[Any, ...]]) -> bytes:
        self._rows_sent += len(rows)
        return self._encoder.encode(rows)

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        data = self._encoder.start() + self._encoded(self._first)
        self._bytes_sent += len(data)
        yield data
        async for rows in self._rows:
            data = self._encoded(rows)
            self._bytes_sent += len(data)
            yield data
        data = self._encoder.finish()
        self._bytes_sent += len(data)
        yield data
        self._finished = True

    async def close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots.give_back()
        # Shielded: a cancelled request must still roll back and hand its connection back.
        with anyio.CancelScope(shield=True):
            await self.chunks.aclose()
            await self._rows.aclose()
        seconds = time.monotonic() - self._started
        counts = (self._rows_sent, self._bytes_sent, seconds)
        if self._finished:
            log.info("export %s by key %r: %d rows, %d bytes in %.1f s", self._what, self._key, *counts)
        elif error is None or isinstance(error, OSError | ClientDisconnect | asyncio.CancelledError):
            log.info(
                "export %s by key %r stopped by the client after %d rows, %d bytes in %.1f s",
                self._what,
                self._key,
                *counts,
            )
        else:
            log.error(
                "export %s by key %r failed after %d rows, %d bytes in %.1f s: %s",
                self._what,
                self._key,
                *counts,
                describe(error),
            )


class _ExportResponse(StreamingResponse):
    """Streams an export and then ends it, whether it was sent whole, the client went away or
    the database failed midway (that error goes on up, so the server cuts the connection and the
    client cannot take a cut export for a whole one)."""

    def __init__(self, stream: _ExportStream, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(stream.chunks, media_type=media_type, headers=headers)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            await self._stream.close(exc)
            raise
        await self._stream.close()


_DOMAIN = Query(pattern="^(" + "|".join(DOMAINS) + ")$", description="the domain whose readings to export")


@router.get(
    "/v1/export",
    summary="A domain's readings over a range, or per-device buckets of them, as CSV or Parquet.",
    description="Streams, with bounded memory, the readings of the registered devices in the key's"
    " scope (and of `city`, when given), over [`from`, `to`): without `bucket`, one row per reading"
    " (`ts`, `device_id`, then each metric, empty or null where the reading lacks it) ordered by"
    " `ts` and `device_id`; with `bucket`, one row per device and bucket aligned to the Unix"
    " epoch in UTC (`bucket`, `device_id`, `readings`, then `<metric>_avg`, `_min`, `_max`)"
    " ordered by `bucket` and `device_id`. Times are UTC. A range longer than the server allows,"
    " a reversed one, a metric the domain lacks, a bad bucket or format is a 400; a domain"
    " outside the key's scope a 404; more exports at once than the server runs a 429. A"
    " connection that ends before the body does means the export failed midway.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the export, as an attachment",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                MEDIA_TYPES["parquet"]: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        400: PROBLEM,
        404: PROBLEM,
        429: {
            **TOO_MANY_REQUESTS,
            "description": "Too Many Requests: the key's rate limit, or more exports at once than the"
            " API process runs (then with `Retry-After` only)",
        },
    },
)
async def export(
    request: Request,
    database: Db,
    settings: AppSettings,
    principal: Viewer,
    domain: Annotated[str, _DOMAIN],
    from_: Annotated[datetime, Query(alias="from", description="start, RFC 3339 with an offset")],
    to: Annotated[datetime, Query(description="end (exclusive), RFC 3339 with an offset")],
    city: CityFilter = None,
    area: AreaFilter = None,
    metrics: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="comma-separated metrics of the domain (default: all, in their declared order)",
        ),
    ] = None,
    bucket: Annotated[
        str | None, Query(max_length=16, description="bucket width: 30s, 5m, 1h, 1d (default: no buckets)")
    ] = None,
    format_: Annotated[
        str,
        Query(
            alias="format",
            max_length=16,
            description="csv or parquet",
            json_schema_extra={"enum": list(FORMATS)},
        ),
    ] = "csv",
) -> StreamingResponse:
    if principal.domain_filter(domain) == []:
        raise HTTPException(404, f"the {domain} domain is not within this key's scope")
    export_format = parse_format(format_)
    check_range(from_, to, settings.api_max_export_days)
    chosen = choose_metrics(DOMAINS[domain], metrics)
    width = parse_bucket(bucket) if bucket is not None else None
    columns = export_columns(chosen, bucketed=width is not None)
    slots: ExportSlots = request.app.state.export_slots
    if not slots.take():
        log.warning("export by key %r refused: %d exports are running", principal.name, slots.running)
        raise HTTPException(
            429,
            f"this API process runs at most {slots.limit} exports at once; try again shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    started = time.monotonic()
    rows = database.readings.export(
        domain=domain,
        cities=principal.city_filter(city),
        start=from_,
        end=to,
        metrics=[m.name for m in chosen],
        bucket=width,
        areas=principal.area_filter(area_list(area)),
    )
    try:
        encode = encoder(export_format, columns)
        # Read before answering, so that a database that cannot serve the export gets a problem
        # answer (503) rather than a cut body.
        first: list[tuple[Any, ...]] = await anext(rows, [])
    except BaseException:
        slots.give_back()
        with anyio.CancelScope(shield=True):
            await rows.aclose()
        raise
    what = f"of {domain} in {city or 'every city in scope'} from {from_.isoformat()} to {to.isoformat()}"
    stream = _ExportStream(what, principal.name, rows, first, encode, slots, started)
    name = file_name(city, domain, from_, to, export_format)
    return _ExportResponse(
        stream, MEDIA_TYPES[export_format], {"Content-Disposition": f'attachment; filename="{name}"'}
    )
