"""The FastAPI application: health, device registry and the latest-state view."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from api import problems
from api.auth import require
from ioc_core.domains import DOMAINS
from ioc_core.errors import IocError
from ioc_core.metrics import CONTENT_TYPE, Metric, render
from ioc_core.models import Device, DeviceIn, StateItem
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

DeviceId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="device id")]
CityFilter = Annotated[str | None, Query(pattern=f"^{CITY_PATTERN.pattern}$", description="city slug")]
DomainFilter = Annotated[str | None, Query(pattern="^(" + "|".join(DOMAINS) + ")$", description="domain")]

_PROBLEM = {"model": problems.Problem, "content": {problems.PROBLEM_MEDIA_TYPE: {}}}


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
    storage_tier: str | None = None


class StateList(BaseModel):
    items: list[StateItem]
    next: str | None = None


class DeadLetterItem(BaseModel):
    id: str
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str = Field(description="the raw payload as UTF-8 text, cut at 4 KiB")
    payload_size: int = Field(description="size of the original payload in bytes")


class DeadLetterList(BaseModel):
    items: list[DeadLetterItem]
    next: str | None = Field(description="cursor of the next page, or null on the last")


def _encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{value}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, value = text.split(":", 1)
        if version != "v1":
            raise ValueError(version)
        return int(value)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise HTTPException(400, "cursor is not valid; use the `next` value of a previous page") from exc


def create_app(settings: Settings, *, database: Database | None = None) -> FastAPI:
    """Build the app. With `database` given, the caller owns its lifetime (tests, `ioc up`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if database is not None:
            app.state.database = database
            yield
            return
        async with Database(settings.database_url.get_secret_value()) as owned:
            app.state.database = owned
            log.info("API ready on storage tier %s", owned.tier)
            yield

    app = FastAPI(
        title="IOC streaming backend",
        version="0.1.0",
        description="Operations-center API: devices, latest state, series, alarms, GIS layers, live events.",
        lifespan=lifespan,
        responses={401: _PROBLEM, 403: _PROBLEM, 422: _PROBLEM, 500: _PROBLEM},
    )
    app.state.settings = settings
    problems.install(app)

    def db(request: Request) -> Database:
        database_: Database = request.app.state.database
        return database_

    @app.get("/health", response_model=Health, summary="Liveness: the process answers.", tags=["health"])
    async def health() -> Health:
        return Health(status="ok")

    @app.get(
        "/ready",
        response_model=Readiness,
        summary="Readiness: every dependency answers (200) or not (503).",
        tags=["health"],
        responses={503: {"model": Readiness}},
    )
    async def ready(request: Request) -> Any:
        database_ = db(request)
        try:
            await database_.ping()
        except IocError as exc:
            body = Readiness(status="unavailable", checks={"database": str(exc)})
            return JSONResponse(body.model_dump(), status_code=503)
        return Readiness(
            status="ok",
            checks={"database": "ok"},
            storage_tier=str(database_.tier) if database_.tier else None,
        )

    @app.post(
        "/v1/devices",
        response_model=Device,
        status_code=201,
        summary="Register a device (admin).",
        tags=["devices"],
        dependencies=[require("admin")],
        responses={409: _PROBLEM},
    )
    async def register_device(request: Request, device: DeviceIn, response: Response) -> Device:
        created = await db(request).insert_device(device)
        response.headers["Location"] = f"/v1/devices/{created.id}"
        return created

    @app.get(
        "/v1/devices/{device_id}",
        response_model=Device,
        summary="One device with its status and latest reading.",
        tags=["devices"],
        dependencies=[require("viewer")],
        responses={404: _PROBLEM},
    )
    async def get_device(request: Request, device_id: DeviceId) -> Device:
        return await db(request).get_device(device_id)

    @app.get(
        "/v1/state",
        response_model=StateList,
        summary="The latest reading of every device in scope.",
        tags=["state"],
        dependencies=[require("viewer")],
    )
    async def state(request: Request, city: CityFilter = None, domain: DomainFilter = None) -> StateList:
        items = await db(request).list_state(city=city, domain=domain)
        return StateList(items=items, next=None)

    @app.get(
        "/v1/dead-letters",
        response_model=DeadLetterList,
        summary="Rejected device messages with their reason, newest first (admin).",
        tags=["dead letters"],
        dependencies=[require("admin")],
        responses={400: _PROBLEM},
    )
    async def dead_letters(
        request: Request,
        reason: Annotated[
            str | None, Query(max_length=64, pattern="^[a-z_]+$", description="only this reason")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
        cursor: Annotated[
            str | None, Query(max_length=200, description="`next` of the previous page")
        ] = None,
    ) -> DeadLetterList:
        before = _decode_cursor(cursor) if cursor else None
        rows = await db(request).list_dead_letters(limit=limit + 1, before_id=before, reason=reason)
        page = rows[:limit]
        return DeadLetterList(
            items=[DeadLetterItem(**{**row.model_dump(), "id": str(row.id)}) for row in page],
            next=_encode_cursor(page[-1].id) if len(rows) > limit else None,
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics.",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def metrics(request: Request) -> Response:
        database_ = db(request)
        dead = Metric("ioc_dead_letters_total", "counter", "rejected messages stored, by reason")
        for reason, count in sorted((await database_.dead_letter_counts()).items()):
            dead.add(count, reason=reason)
        devices = Metric("ioc_devices", "gauge", "registered devices, by status")
        for status, count in sorted((await database_.device_status_counts()).items()):
            devices.add(count, status=status)
        return Response(render([dead, devices]), media_type=CONTENT_TYPE)

    return app
