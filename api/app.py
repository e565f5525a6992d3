"""The FastAPI application: health, device registry and the latest-state view."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import problems
from api.auth import Principal, require
from ioc_core.alarms import ALARM_STATES, Alarm
from ioc_core.broker_accounts import DeviceAccounts
from ioc_core.domains import DOMAINS
from ioc_core.errors import ConflictError, IocError, NotFoundError, ServiceUnavailableError
from ioc_core.metrics import CONTENT_TYPE, Metric, render
from ioc_core.models import Device, DeviceCredentials, DeviceIn, DevicePatch, RegisteredDevice, StateItem
from ioc_core.rules import SEVERITIES
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1, description="alarm id")]
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


class AlarmList(BaseModel):
    items: list[Alarm]
    next: str | None = Field(description="cursor of the next page, or null on the last")


class AlarmAction(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"note": "đội ứng cứu đã đến"}]}
    )

    note: str | None = Field(default=None, max_length=2000, description="why, for the audit trail")


def _comma_list(value: str | None, allowed: tuple[str, ...], name: str) -> list[str] | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise HTTPException(400, f"{name} must be a comma-separated list of {', '.join(allowed)}")
    return items


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
        await database.delete_device(device_id)
    except IocError as exc:
        log.error(
            "device %s is registered without a broker account and could not be removed: %s", device_id, exc
        )


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
        async with storage(app), device_accounts(app):
            yield

    @asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[None]:
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
        dependencies=[require("admin")],
        responses={409: _PROBLEM, 503: _PROBLEM},
    )
    async def register_device(request: Request, device: DeviceIn, response: Response) -> RegisteredDevice:
        database_ = db(request)
        created = await database_.insert_device(device)
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
        dependencies=[require("admin")],
        responses={404: _PROBLEM},
    )
    async def update_device(request: Request, device_id: DeviceId, patch: DevicePatch) -> Device:
        database_ = db(request)
        current = await database_.get_device(device_id)
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
        return await database_.update_device(changed)

    @app.delete(
        "/v1/devices/{device_id}",
        status_code=204,
        summary="Remove a device and its MQTT account (admin).",
        tags=["devices"],
        dependencies=[require("admin")],
        responses={404: _PROBLEM, 503: _PROBLEM},
    )
    async def delete_device(request: Request, device_id: DeviceId) -> None:
        database_ = db(request)
        await database_.get_device(device_id)
        accounts_: DeviceAccounts | None = request.app.state.accounts
        if accounts_ is not None:
            # The account goes first: a device still registered after a failure can be removed
            # again, one gone from the registry with a working account could not.
            with _broker_step(f"device {device_id!r} was not removed"):
                await accounts_.delete(device_id)
        await database_.delete_device(device_id)

    @app.post(
        "/v1/devices/{device_id}/credentials",
        response_model=DeviceCredentials,
        summary="Give a device new MQTT credentials (admin).",
        description="The new password is in this answer only. Connections made with the old one are"
        " closed by the broker at once, and a revoked device may connect again. A device registered"
        " before the broker enforced credentials gets its first ones here.",
        tags=["devices"],
        dependencies=[require("admin")],
        responses={404: _PROBLEM, 409: _PROBLEM, 503: _PROBLEM},
    )
    async def rotate_credentials(request: Request, device_id: DeviceId) -> DeviceCredentials:
        accounts_ = device_accounts_of(request)
        device = await db(request).get_device(device_id)
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
        dependencies=[require("admin")],
        responses={404: _PROBLEM, 409: _PROBLEM, 503: _PROBLEM},
    )
    async def revoke_credentials(request: Request, device_id: DeviceId) -> None:
        accounts_ = device_accounts_of(request)
        await db(request).get_device(device_id)
        with _broker_step(f"the credentials of device {device_id!r} were not revoked"):
            await accounts_.revoke(device_id)

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
        "/v1/alarms",
        response_model=AlarmList,
        summary="Alarms matching every filter given, newest first.",
        tags=["alarms"],
        dependencies=[require("viewer")],
        responses={400: _PROBLEM},
    )
    async def alarms(
        request: Request,
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
        before = _decode_cursor(cursor) if cursor else None
        rows = await db(request).list_alarms(
            limit=limit + 1,
            before_id=before,
            states=_comma_list(state, ALARM_STATES, "state"),
            city=city,
            domain=domain,
            severities=_comma_list(severity, SEVERITIES, "severity"),
            device_id=device_id,
        )
        page = rows[:limit]
        return AlarmList(items=page, next=_encode_cursor(page[-1].id) if len(rows) > limit else None)

    @app.get(
        "/v1/alarms/{alarm_id}",
        response_model=Alarm,
        summary="One alarm, with who acknowledged or resolved it.",
        tags=["alarms"],
        dependencies=[require("viewer")],
        responses={404: _PROBLEM},
    )
    async def alarm(request: Request, alarm_id: AlarmId) -> Alarm:
        return await db(request).get_alarm(alarm_id)

    @app.post(
        "/v1/alarms/{alarm_id}/ack",
        response_model=Alarm,
        summary="Acknowledge an alarm (operator).",
        tags=["alarms"],
        responses={404: _PROBLEM, 409: _PROBLEM},
    )
    async def acknowledge_alarm(
        request: Request,
        alarm_id: AlarmId,
        principal: Annotated[Principal, require("operator")],
        action: AlarmAction | None = None,
    ) -> Alarm:
        note = action.note if action else None
        return await db(request).acknowledge_alarm(alarm_id, actor=principal.name, note=note)

    @app.post(
        "/v1/alarms/{alarm_id}/resolve",
        response_model=Alarm,
        summary="Resolve an alarm by hand (operator).",
        tags=["alarms"],
        responses={404: _PROBLEM, 409: _PROBLEM},
    )
    async def resolve_alarm(
        request: Request,
        alarm_id: AlarmId,
        principal: Annotated[Principal, require("operator")],
        action: AlarmAction | None = None,
    ) -> Alarm:
        note = action.note if action else None
        return await db(request).resolve_alarm(alarm_id, actor=principal.name, note=note)

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
