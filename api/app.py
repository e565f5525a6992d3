"""The FastAPI application: health, device registry, alarms and dead letters; the polled views
(`views`), API keys (`keys`), the live stream and the operations page come from their modules."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import keys, problems, public, views, webhooks
from api.auth import Admin, KeyCache, Operator, Viewer
from api.common import (
    PROBLEM,
    AlarmId,
    CityFilter,
    DeviceId,
    DomainFilter,
    ViewCache,
    comma_list,
    db,
    decode_int_cursor,
    encode_cursor,
    reject_unknown_query_parameters,
    scoped_alarm,
    scoped_device,
    sees_nothing,
)
from api.device_accounts import DeviceAccounts
from api.page import add_page_routes
from api.stream import EventHub, add_stream_route
from ioc_core.alarms import ALARM_STATES, Alarm
from ioc_core.errors import ConflictError, IocError, NotFoundError, ServiceUnavailableError
from ioc_core.metrics import CONTENT_TYPE, Metric, render
from ioc_core.models import Device, DeviceCredentials, DeviceIn, DevicePatch, RegisteredDevice
from ioc_core.rules import SEVERITIES
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
    storage_tier: str | None = None


class AlarmList(BaseModel):
    items: list[Alarm]
    next: str | None = Field(description="cursor of the next page, or null on the last")


class AlarmAction(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"note": "đội ứng cứu đã đến"}]}
    )

    note: str | None = Field(default=None, max_length=2000, description="why, for the audit trail")


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


async def _unregister(database: Database, device_id: str) -> None:
    try:
        await database.devices.delete(device_id)
    except IocError as exc:
        log.error(
            "device %s is registered without a broker account and could not be removed: %s", device_id, exc
        )


@contextmanager
def _broker_step(what: str) -> Iterator[None]:
    """A missing or foreign account keeps its meaning (404, 409); any other broker failure means
    the broker is unavailable for this change (503)."""
    try:
        yield
    except (NotFoundError, ConflictError, ServiceUnavailableError):
        raise
    except IocError as exc:
        raise ServiceUnavailableError(f"{what}: {exc}") from exc


def create_app(
    settings: Settings, *, database: Database | None = None, accounts: DeviceAccounts | None = None
) -> FastAPI:
    """Build the app. With `database` or `accounts` given, the caller owns their lifetime (tests,
    `ioc up`); otherwise device accounts are on when IOC_MQTT_ADMIN_URL is set."""

    @asynccontextmanager
    async def device_accounts(app: FastAPI) -> AsyncIterator[None]:
        app.state.accounts = accounts
        if accounts is not None or settings.mqtt_admin_url is None:
            yield
            return
        async with DeviceAccounts(settings.mqtt_admin_url.get_secret_value()) as owned:
            app.state.accounts = owned
            yield

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with storage(app), device_accounts(app), EventHub(settings) as hub:
            app.state.event_hub = hub
            yield

    @asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[None]:
        if database is not None:
            app.state.database = database
            yield
            return
        async with Database(
            settings.database_url.get_secret_value(), timeout_s=settings.database_timeout_s
        ) as owned:
            app.state.database = owned
            log.info("API ready on storage tier %s", owned.tier)
            yield

    app = FastAPI(
        title="IOC streaming backend",
        version="0.1.0",
        description="Operations-center API: devices, latest state, series, alarms, GIS layers, live events."
        " Every error is RFC 9457 problem+json. Keys go in `Authorization: Bearer KEY` or `X-API-Key`.",
        lifespan=lifespan,
        responses={400: PROBLEM, 401: PROBLEM, 403: PROBLEM, 422: PROBLEM, 500: PROBLEM},
        dependencies=[Depends(reject_unknown_query_parameters)],
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.api_key_cache_s)
    app.state.view_cache = ViewCache()
    problems.install(app)
    # Views that screens poll compress themselves once per version; this covers the rest.
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=6)
    app.include_router(views.router)
    app.include_router(keys.router)
    app.include_router(public.router)
    app.include_router(webhooks.router)
    add_stream_route(app)

    def device_accounts_of(request: Request) -> DeviceAccounts:
        accounts_: DeviceAccounts | None = request.app.state.accounts
        if accounts_ is None:
            raise HTTPException(
                404, "this deployment does not manage device credentials (IOC_MQTT_ADMIN_URL is unset)"
            )
        return accounts_

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
        checks = {"database": "ok"}
        accounts_: DeviceAccounts | None = request.app.state.accounts
        if accounts_ is not None:
            # Reading goes on without the broker; only registration and credential changes wait.
            checks["device_accounts"] = f"unavailable: {accounts_.problem}" if accounts_.problem else "ok"
        return Readiness(
            status="ok" if all(v == "ok" for v in checks.values()) else "degraded",
            checks=checks,
            storage_tier=str(database_.tier) if database_.tier else None,
        )

    @app.post(
        "/v1/devices",
        response_model=RegisteredDevice,
        # `credentials` appears only when there are some: no null where the broker enforces none.
        response_model_exclude_unset=True,
        status_code=201,
        summary="Register a device (admin).",
        description="Where the broker enforces device credentials, the answer carries the device's"
        " MQTT `credentials`, once: they cannot be read back, only replaced"
        " (`POST /v1/devices/{id}/credentials`). When the broker cannot create the account the device"
        " is not registered (503).",
        tags=["devices"],
        responses={409: PROBLEM, 503: PROBLEM},
    )
    async def register_device(
        request: Request, principal: Admin, device: DeviceIn, response: Response
    ) -> RegisteredDevice:
        if not principal.allows(device.city, device.domain):
            raise HTTPException(403, f"this key may not register {device.domain} devices in {device.city}")
        database_ = db(request)
        created = await database_.devices.insert(device)
        accounts_: DeviceAccounts | None = request.app.state.accounts
        registered = RegisteredDevice(**created.model_dump())
        if accounts_ is not None:
            try:
                registered.credentials = await accounts_.create(device.id, device.city, device.domain)
            except BaseException as exc:
                # A device that cannot connect must not look registered: take the row back.
                await _unregister(database_, device.id)
                if isinstance(exc, IocError) and not isinstance(exc, ConflictError):
                    raise ServiceUnavailableError(
                        f"device {device.id!r} was not registered: the MQTT broker could not create its"
                        f" account ({exc})"
                    ) from exc
                raise
        response.headers["Location"] = f"/v1/devices/{created.id}"
        return registered

    @app.patch(
        "/v1/devices/{device_id}",
        response_model=Device,
        summary="Change a device's name, district, location or thresholds (admin).",
        tags=["devices"],
        responses={404: PROBLEM},
    )
    async def update_device(
        request: Request, principal: Admin, device_id: DeviceId, patch: DevicePatch
    ) -> Device:
        database_ = db(request)
        current = await scoped_device(request, principal, device_id)
        merged = {
            **current.model_dump(
                include={"id", "city", "domain", "name", "district", "location", "thresholds"}
            ),
            **patch.model_dump(exclude_unset=True),
        }
        try:
            changed = DeviceIn.model_validate(merged)
        except ValidationError as exc:
            # Thresholds are checked against the device's domain, which only the stored device knows.
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from exc
        return await database_.devices.update(changed)

    @app.delete(
        "/v1/devices/{device_id}",
        status_code=204,
        summary="Remove a device and its MQTT account (admin).",
        tags=["devices"],
        responses={404: PROBLEM, 503: PROBLEM},
    )
    async def delete_device(request: Request, principal: Admin, device_id: DeviceId) -> None:
        database_ = db(request)
        await scoped_device(request, principal, device_id)
        accounts_: DeviceAccounts | None = request.app.state.accounts
        if accounts_ is not None:
            # The account goes first: a device still registered after a failure can be removed
            # again, one gone from the registry with a working account could not.
            with _broker_step(f"device {device_id!r} was not removed"):
                await accounts_.delete(device_id)
        await database_.devices.delete(device_id)

    @app.post(
        "/v1/devices/{device_id}/credentials",
        response_model=DeviceCredentials,
        summary="Give a device new MQTT credentials (admin).",
        description="The new password is in this answer only. Connections made with the old one are"
        " closed by the broker at once, and a revoked device may connect again. A device registered"
        " before the broker enforced credentials gets its first ones here.",
        tags=["devices"],
        responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
    )
    async def rotate_credentials(
        request: Request, principal: Admin, device_id: DeviceId
    ) -> DeviceCredentials:
        accounts_ = device_accounts_of(request)
        device = await scoped_device(request, principal, device_id)
        with _broker_step(f"the credentials of device {device_id!r} were not changed"):
            try:
                return await accounts_.rotate(device_id)
            except NotFoundError:
                return await accounts_.create(device.id, device.city, device.domain)

    @app.delete(
        "/v1/devices/{device_id}/credentials",
        status_code=204,
        summary="Revoke a device's MQTT credentials (admin).",
        description="The broker disconnects the device and refuses it until it gets new credentials"
        " (`POST /v1/devices/{id}/credentials`). The device stays registered.",
        tags=["devices"],
        responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
    )
    async def revoke_credentials(request: Request, principal: Admin, device_id: DeviceId) -> None:
        accounts_ = device_accounts_of(request)
        await scoped_device(request, principal, device_id)
        with _broker_step(f"the credentials of device {device_id!r} were not revoked"):
            await accounts_.revoke(device_id)

    @app.get(
        "/v1/devices/{device_id}",
        response_model=Device,
        summary="One device with its status and latest reading.",
        tags=["devices"],
        responses={404: PROBLEM},
    )
    async def get_device(request: Request, principal: Viewer, device_id: DeviceId) -> Device:
        return await scoped_device(request, principal, device_id)

    @app.get(
        "/v1/dead-letters",
        response_model=DeadLetterList,
        summary="Rejected device messages with their reason, newest first (admin).",
        tags=["dead letters"],
        responses={400: PROBLEM},
    )
    async def dead_letters(
        request: Request,
        principal: Admin,
        reason: Annotated[
            str | None, Query(max_length=64, pattern="^[a-z_]+$", description="only this reason")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
        cursor: Annotated[
            str | None, Query(max_length=200, description="`next` of the previous page")
        ] = None,
    ) -> DeadLetterList:
        if principal.cities is not None or principal.domains is not None:
            # A rejected message may name no device, so it cannot be placed in a scope.
            raise HTTPException(403, "dead letters need an admin key without a city or domain limit")
        before = decode_int_cursor(cursor)
        rows = await db(request).dead_letters.page(limit=limit + 1, before_id=before, reason=reason)
        page = rows[:limit]
        return DeadLetterList(
            items=[DeadLetterItem(**{**row.model_dump(), "id": str(row.id)}) for row in page],
            next=encode_cursor(page[-1].id) if len(rows) > limit else None,
        )

    @app.get(
        "/v1/alarms",
        response_model=AlarmList,
        summary="Alarms matching every filter given, newest first.",
        tags=["alarms"],
        responses={400: PROBLEM},
    )
    async def alarms(
        request: Request,
        principal: Viewer,
        state: Annotated[
            str | None, Query(max_length=100, description="comma-separated: active, acknowledged, resolved")
        ] = None,
        city: CityFilter = None,
        domain: DomainFilter = None,
        severity: Annotated[
            str | None, Query(max_length=100, description="comma-separated: low, medium, high, critical")
        ] = None,
        device_id: Annotated[
            str | None, Query(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="one device's alarms")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
        cursor: Annotated[
            str | None, Query(max_length=200, description="`next` of the previous page")
        ] = None,
    ) -> AlarmList:
        before = decode_int_cursor(cursor)
        cities, domains = principal.city_filter(city), principal.domain_filter(domain)
        if sees_nothing(cities, domains):
            return AlarmList(items=[], next=None)
        rows = await db(request).alarms.page(
            limit=limit + 1,
            before_id=before,
            states=comma_list(state, ALARM_STATES, "state"),
            cities=cities,
            domains=domains,
            severities=comma_list(severity, SEVERITIES, "severity"),
            device_id=device_id,
        )
        page = rows[:limit]
        return AlarmList(items=page, next=encode_cursor(page[-1].id) if len(rows) > limit else None)

    @app.get(
        "/v1/alarms/{alarm_id}",
        response_model=Alarm,
        summary="One alarm, with who acknowledged or resolved it.",
        tags=["alarms"],
        responses={404: PROBLEM},
    )
    async def alarm(request: Request, principal: Viewer, alarm_id: AlarmId) -> Alarm:
        return await scoped_alarm(request, principal, alarm_id)

    @app.post(
        "/v1/alarms/{alarm_id}/ack",
        response_model=Alarm,
        summary="Acknowledge an alarm (operator).",
        tags=["alarms"],
        responses={404: PROBLEM, 409: PROBLEM},
    )
    async def acknowledge_alarm(
        request: Request,
        alarm_id: AlarmId,
        principal: Operator,
        action: AlarmAction | None = None,
    ) -> Alarm:
        note = action.note if action else None
        await scoped_alarm(request, principal, alarm_id)
        return await db(request).alarms.acknowledge(alarm_id, actor=principal.name, note=note)

    @app.post(
        "/v1/alarms/{alarm_id}/resolve",
        response_model=Alarm,
        summary="Resolve an alarm by hand (operator).",
        tags=["alarms"],
        responses={404: PROBLEM, 409: PROBLEM},
    )
    async def resolve_alarm(
        request: Request,
        alarm_id: AlarmId,
        principal: Operator,
        action: AlarmAction | None = None,
    ) -> Alarm:
        note = action.note if action else None
        await scoped_alarm(request, principal, alarm_id)
        return await db(request).alarms.resolve(alarm_id, actor=principal.name, note=note)

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
        for reason, count in sorted((await database_.dead_letters.counts()).items()):
            dead.add(count, reason=reason)
        devices = Metric("ioc_devices", "gauge", "registered devices, by status")
        for status, count in sorted((await database_.status.counts()).items()):
            devices.add(count, status=status)
        deliveries = Metric("ioc_webhook_deliveries", "gauge", "webhook deliveries kept, by state")
        for state, count in sorted((await database_.webhooks.delivery_counts()).items()):
            deliveries.add(count, state=state)
        return Response(render([dead, devices, deliveries]), media_type=CONTENT_TYPE)

    add_page_routes(app, settings)
    return app
