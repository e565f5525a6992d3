"""The device registry: list, register, change, remove and read devices, and give or revoke a
device's MQTT credentials where the broker enforces them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Admin, Viewer
from api.deps import Accounts, Db, ViewedDevice, managed, scoped_device
from api.pagination import Page, decode_text_cursor, paginate
from api.params import (
    AreaFilter,
    BboxFilter,
    CityFilter,
    Cursor,
    DeviceId,
    DomainFilter,
    area_list,
    parse_bbox,
    sees_nothing,
)
from api.problems import PROBLEM
from ioc_core.audit import (
    DEVICE,
    DEVICE_CREATE,
    DEVICE_CREDENTIALS_REVOKE,
    DEVICE_CREDENTIALS_ROTATE,
    DEVICE_DELETE,
    DEVICE_UPDATE,
)
from ioc_core.errors import ConflictError, IocError, NotFoundError, ServiceUnavailableError
from ioc_core.models import Device, DeviceCredentials, DeviceIn, DevicePatch, RegisteredDevice

log = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])

StatusFilter = Annotated[
    Literal["online", "offline", "unknown"] | None, Query(description="only devices with this status")
]


def _subject(action: str, device: DeviceIn | Device) -> Subject:
    return Subject(action, DEVICE, device.id, [device.city], [device.domain])


async def _unregister(audit: AuditTrail, device: DeviceIn, reason: str) -> None:
    """Take back a registration whose broker account could not be made; the log says why."""
    try:
        async with audit.change(_subject(DEVICE_DELETE, device), reason=reason) as change:
            await audit.database.devices.delete(device.id, within=change.transaction)
    except IocError as exc:
        log.error(
            "device %s is registered without a broker account and could not be removed: %s", device.id, exc
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
    area: AreaFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[Device]:
    box = parse_bbox(bbox)
    areas = principal.area_filter(area_list(area))
    after = decode_text_cursor(cursor)
    cities, domains = principal.city_filter(city), principal.domain_filter(domain)
    if sees_nothing(cities, domains, areas):
        return Page[Device].empty()
    return await paginate(
        lambda n: database.devices.page(
            cities, domains, status=status, bbox=box, after=after, limit=n, areas=areas
        ),
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
    database: Db, audit: Audit, accounts: Accounts, principal: Admin, device: DeviceIn, response: Response
) -> RegisteredDevice:
    subject = _subject(DEVICE_CREATE, device)
    if not principal.allows(device.city, device.domain):
        raise await audit.refuse(
            subject, 403, f"this key may not register {device.domain} devices in {device.city}"
        )
    async with audit.change(subject, name=device.name, district=device.district) as change:
        created = await database.devices.insert(device, within=change.transaction)
    registered = RegisteredDevice(**created.model_dump())
    if accounts is not None:
        try:
            registered.credentials = await accounts.create(device.id, device.city, device.domain)
        except BaseException as exc:
            # A device that cannot connect must not look registered: take the row back.
            await _unregister(audit, device, "the MQTT broker could not create its account")
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
async def update_device(
    database: Db, audit: Audit, principal: Admin, device_id: DeviceId, patch: DevicePatch
) -> Device:
    current = await scoped_device(audit, device_id, DEVICE_UPDATE)
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
    changes = patch.model_dump(exclude_unset=True, mode="json")
    async with audit.change(_subject(DEVICE_UPDATE, current), changes=changes) as change:
        return await database.devices.update(changed, within=change.transaction)


@router.delete(
    "/v1/devices/{device_id}",
    status_code=204,
    summary="Remove a device and its MQTT account (admin).",
    responses={404: PROBLEM, 503: PROBLEM},
)
async def delete_device(
    database: Db, audit: Audit, accounts: Accounts, principal: Admin, device_id: DeviceId
) -> None:
    device = await scoped_device(audit, device_id, DEVICE_DELETE)
    if accounts is not None:
        # The account goes first: a device still registered after a failure can be removed
        # again, one gone from the registry with a working account could not.
        with _broker_step(f"device {device_id!r} was not removed"):
            await accounts.delete(device_id)
    async with audit.change(_subject(DEVICE_DELETE, device), name=device.name) as change:
        await database.devices.delete(device_id, within=change.transaction)


@router.post(
    "/v1/devices/{device_id}/credentials",
    response_model=DeviceCredentials,
    summary="Give a device new MQTT credentials (admin).",
    description="The new password is in this answer only. Connections made with the old one are"
    " closed by the broker at once, and a revoked device may connect again. A device registered"
    " before the broker enforced credentials gets its first ones here; one registered before"
    " accounts were bound to a client id is bound to its id from now on.",
    responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
)
async def rotate_credentials(
    audit: Audit, accounts: Accounts, principal: Admin, device_id: DeviceId
) -> DeviceCredentials:
    accounts_ = managed(accounts)
    device = await scoped_device(audit, device_id, DEVICE_CREDENTIALS_ROTATE)
    with _broker_step(f"the credentials of device {device_id!r} were not changed"):
        try:
            credentials, first = await accounts_.rotate(device.id, device.city, device.domain), False
        except NotFoundError:
            credentials, first = await accounts_.create(device.id, device.city, device.domain), True
    # The broker holds the change; the entry follows it (never with the password).
    await audit.done(_subject(DEVICE_CREDENTIALS_ROTATE, device), first=first)
    return credentials


@router.delete(
    "/v1/devices/{device_id}/credentials",
    status_code=204,
    summary="Revoke a device's MQTT credentials (admin).",
    description="The broker disconnects the device and refuses it until it gets new credentials"
    " (`POST /v1/devices/{id}/credentials`). The device stays registered.",
    responses={404: PROBLEM, 409: PROBLEM, 503: PROBLEM},
)
async def revoke_credentials(audit: Audit, accounts: Accounts, principal: Admin, device_id: DeviceId) -> None:
    accounts_ = managed(accounts)
    device = await scoped_device(audit, device_id, DEVICE_CREDENTIALS_REVOKE)
    with _broker_step(f"the credentials of device {device_id!r} were not revoked"):
        await accounts_.revoke(device_id)
    await audit.done(_subject(DEVICE_CREDENTIALS_REVOKE, device))


@router.get(
    "/v1/devices/{device_id}",
    response_model=Device,
    summary="One device with its status and latest reading.",
    responses={404: PROBLEM},
)
async def get_device(device: ViewedDevice) -> Device:
    return device
