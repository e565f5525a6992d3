"""What routes take from the running app, as `Annotated` dependencies: settings, the database,
device accounts, the live events hub, the view and key caches, the rate limiter; and devices and
alarms looked up within the caller's scope (a refused look-up goes to the audit log)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import KeyCache, Viewer
from api.device_accounts import DeviceAccounts
from api.params import AlarmId, DeviceId
from api.rate_limits import RateLimiter
from api.stream.hub import EventHub
from api.view_cache import ViewCache
from ioc_core.alarms import Alarm
from ioc_core.audit import ALARM, ALARM_READ, DEVICE, DEVICE_READ
from ioc_core.models import Device
from ioc_core.settings import Settings
from ioc_core.storage import Database


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def _device_accounts(request: Request) -> DeviceAccounts | None:
    accounts: DeviceAccounts | None = request.app.state.accounts
    return accounts


def _event_hub(request: Request) -> EventHub:
    hub: EventHub = request.app.state.event_hub
    return hub


def _view_cache(request: Request) -> ViewCache:
    cache: ViewCache = request.app.state.view_cache
    return cache


def _key_cache(request: Request) -> KeyCache:
    cache: KeyCache = request.app.state.key_cache
    return cache


def _rate_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


AppSettings = Annotated[Settings, Depends(_settings)]
Db = Annotated[Database, Depends(_database)]
# None where this deployment does not manage device credentials (IOC_MQTT_ADMIN_URL unset).
Accounts = Annotated[DeviceAccounts | None, Depends(_device_accounts)]
Hub = Annotated[EventHub, Depends(_event_hub)]
Views = Annotated[ViewCache, Depends(_view_cache)]
Keys = Annotated[KeyCache, Depends(_key_cache)]
Limiter = Annotated[RateLimiter, Depends(_rate_limiter)]


def managed(accounts: DeviceAccounts | None) -> DeviceAccounts:
    """The device accounts, for routes that exist only where the broker enforces credentials.
    Called in the route rather than as a dependency, so that a malformed request is still a 422
    first."""
    if accounts is None:
        raise HTTPException(
            404, "this deployment does not manage device credentials (IOC_MQTT_ADMIN_URL is unset)"
        )
    return accounts


async def scoped_device(audit: AuditTrail, device_id: str, action: str) -> Device:
    """The device, when it lies within the caller's scope; else 404, as a missing one, and the
    attempt (`action`) is recorded in the audit log."""
    device = await audit.database.devices.get(device_id)
    subject = Subject(action, DEVICE, device_id, [device.city], [device.domain], device.areas)
    await audit.require_scope(subject, what=f"device {device_id!r}")
    return device


async def scoped_alarm(audit: AuditTrail, alarm_id: int, action: str) -> Alarm:
    """The alarm, when it lies within the caller's scope (see `scoped_device`)."""
    alarm = await audit.database.alarms.get(alarm_id)
    subject = Subject(action, ALARM, str(alarm_id), [alarm.city], [alarm.domain], alarm.areas)
    await audit.require_scope(subject, what=f"alarm {alarm_id}")
    return alarm


async def _viewed_device(audit: Audit, principal: Viewer, device_id: DeviceId) -> Device:
    return await scoped_device(audit, device_id, DEVICE_READ)


async def _viewed_alarm(audit: Audit, principal: Viewer, alarm_id: AlarmId) -> Alarm:
    return await scoped_alarm(audit, alarm_id, ALARM_READ)


# For routes that only read the one object: a viewer's device or alarm, 404 outside its scope.
ViewedDevice = Annotated[Device, Depends(_viewed_device)]
ViewedAlarm = Annotated[Alarm, Depends(_viewed_alarm)]
