"""The FastAPI application: health, device registry and the latest-state view."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api import problems
from api.auth import require
from ioc_core.domains import DOMAINS
from ioc_core.errors import IocError
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

    return app
