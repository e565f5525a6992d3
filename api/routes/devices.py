"""The device registry: list, register, change, remove and read devices, and give or revoke a
device's MQTT credentials where the broker enforces them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.auth import Admin, Viewer
from api.deps import Accounts, Db, ViewedDevice, managed, scoped_device
from api.pagination import Page, decode_text_cursor, paginate
from api.params import BboxFilter, CityFilter, Cursor, DeviceId, DomainFilter, parse_bbox, sees_nothing
from api.problems import PROBLEM
from ioc_core.errors import ConflictError, IocError, NotFoundError, ServiceUnavailableError
from ioc_core.models import Device, DeviceCredentials, DeviceIn, DevicePatch, RegisteredDevice
from ioc_core.storage import Database

log = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])

StatusFilter = Annotated[
    Literal["online", "offline", "unknown"] | None, Query(description="only devices with this status")
]


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
        raise ServiceUnavailableError(f"{what}: {exc}", public=f"{what}: {_public(exc)}") from exc


def _public(exc: IocError) -> str:
    """What may be said of a broker failure in an answer: never where the broker is."""
    return exc.public if isinstance(exc, ServiceUnavailableError) else str(exc)


@router.get(
    "/v1/devices",
    response_model=Page[Device],
    summary="Registered devices with their status and latest reading, in id order.",
    responses={400: PROBLEM},
)
async def devices(
    database: Db,
    principal: Viewer,
    city: CityFilter = None,
    domain: DomainFilter = None,
    status: StatusFilter = None,
    bbox: BboxFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[Device]:
    box = parse_bbox(bbox)
    after = decode_text_cursor(cursor)
    cities, domains = principal.city_filter(city), principal.domain_filter(domain)
    if sees_nothing(cities, domains):
        return Page[Device].empty()
    return await paginate(
        lambda n: database.devices.page(cities, domains, status=status, bbox=box, after=after, limit=n),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: row,
    )


@router.post(
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
    responses={409: PROBLEM, 503: PROBLEM},
)
async def register_device(
    database: Db, accounts: Accounts, principal: Admin, device: DeviceIn, response: Response
) -> RegisteredDevice:
    if not principal.allows(device.city, device.domain):
        raise HTTPException(403, f"this key may not register {device.domain} devices in {device.city}")
    created = await database.devices.insert(device)
    registered = RegisteredDevice(**created.model_dump())
    if accounts is not None:
        try:
            registered.credentials = await accounts.create(device.id, device.city, device.domain)
        except BaseException as exc:
            # A device that cannot connect must not look registered: take the row back.
            await _unregister(database, device.id)
            if isinstance(exc, IocError) and not isinstance(exc, ConflictError):
                raise ServiceUnavailableError(
                    f"device {device.id!r} was not registered: the MQTT broker could not create its"
                    f" account ({exc})",
                    public=f"device {device.id!r} was not registered: the MQTT broker could not create"
                    f" its account ({_public(exc)})",
                ) from exc
            raise
    response.headers["Location"] = f"/v1/devices/{created.id}"
    return registered


@router.patch(
    "/v1/devices/{device_id}",
    response_model=Device,
    summary="Change a device's name, district, location or thresholds (admin).",
    responses={404: PROBLEM},
)
async def update_device(database: Db, principal: Admin, device_id: DeviceId, patch: DevicePatch) -> Device:
    current = await scoped_device(database, principal, device_id)
    merged = {
        **current.model_dump(include={"id", "city", "domain", "name", "district", "location", "thresholds"}),
        **patch.model_dump(exclude_unset=True),
    }
    try:
        changed = DeviceIn.model_validate(merged)
    except ValidationError as exc:
        # Thresholds are checked against the device's domain, which only the stored device knows.
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc
    return await database.devices.update(changed)


@router.delete(
    "/v1/devices/{device_id}",
    status_code=204,
    summary="Remove a device and its MQTT account (admin).",
    responses={404: PROBLEM, 503: PROBLEM},
)
async def delete_device(database: Db, accounts: Accounts, principal: Admin, device_id: DeviceId) -> None:
    await scoped_device(database, principal, device_id)
    if accounts is not None:
        # The account goes first: a device still registered after a failure can be removed
        # again, one gone from the registry with a working account could not.
        with _broker_step(f"device {device_id!r} was not removed"):
            await accounts.delete(device_id)
    await database.devices.delete(device_id)


@router.post(
    "/v1/devices/{device_id}/credentials",
    response_model=DeviceCredentials,
    summary="Give a device new MQTT credentials (admin).",
    description="The new password is in this answer only. Connections made with the old one are"
    " closed by the broker at once, and a revoked device may connect again. A device registered"
    " before the broker enforced credentials gets its first ones here.",
    responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
)
async def rotate_credentials(
    database: Db, accounts: Accounts, principal: Admin, device_id: DeviceId
) -> DeviceCredentials:
    accounts_ = managed(accounts)
    device = await scoped_device(database, principal, device_id)
    with _broker_step(f"the credentials of device {device_id!r} were not changed"):
        try:
            return await accounts_.rotate(device_id)
        except NotFoundError:
            return await accounts_.create(device.id, device.city, device.domain)


@router.delete(
    "/v1/devices/{device_id}/credentials",
    status_code=204,
    summary="Revoke a device's MQTT credentials (admin).",
    description="The broker disconnects the device and refuses it until it gets new credentials"
    " (`POST /v1/devices/{id}/credentials`). The device stays registered.",
    responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
)
async def revoke_credentials(database: Db, accounts: Accounts, principal: Admin, device_id: DeviceId) -> None:
    accounts_ = managed(accounts)
    await scoped_device(database, principal, device_id)
    with _broker_step(f"the credentials of device {device_id!r} were not revoked"):
        await accounts_.revoke(device_id)


@router.get(
    "/v1/devices/{device_id}",
    response_model=Device,
    summary="One device with its status and latest reading.",
    responses={404: PROBLEM},
)
async def get_device(device: ViewedDevice) -> Device:
    return device
