"""Per-device MQTT accounts, kept by Mosquitto's dynamic-security plugin.

Every registered device gets a broker account of its own: the username is the device id, the
password is random and shown only in the answer that created it, and the account's one role lets
it publish under `ioc/v1/{city}/{domain}/{id}/` and nowhere else, because the broker denies every
publish that no role grants. The gateway's account may subscribe to and receive `ioc/v1/`
(shared subscriptions included) and may publish nothing.

The plugin is driven over its control topic by an MQTT client holding the plugin admin's
credentials. The plugin answers every admin client on one response topic, so each command
carries correlation data of ours and answers to other clients are ignored.

How Mosquitto 2.0's plugin behaves, which callers rely on:
- a new password (setClientPassword, modifyClient), disableClient and deleteClient disconnect
  every connection using that username at once ("administrative action"), so rotation and
  revocation take effect immediately, not at the device's next connect;
- shared subscriptions are checked with their `$share/GROUP/` prefix, so the gateway's role must
  grant `$share/+/ioc/v1/#` besides `ioc/v1/#`;
- the plugin rewrites its JSON file after every change; when the broker may not write it, the
  change is only logged as an error and lost at the next restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ioc_core.component import Component
from ioc_core.domains import DOMAINS
from ioc_core.errors import (
    ConfigurationError,
    ConflictError,
    IocError,
    NotFoundError,
    ServiceUnavailableError,
)
from ioc_core.models import DeviceCredentials
from ioc_core.settings import mqtt_endpoint
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN, TOPIC_ROOT

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
DEVICE_ROLE_PREFIX = "ioc-device-"
GATEWAY_ROLE = "ioc-gateway"

Command = dict[str, Any]
Answer = dict[str, Any]

# What no role grants: nobody publishes or subscribes. Receiving and unsubscribing stay open so
# that whatever a role lets a client subscribe to is also delivered to it.
DEFAULT_ACL_ACCESS: tuple[dict[str, Any], ...] = (
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": True},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
)

GATEWAY_ACLS: tuple[dict[str, Any], ...] = (
    {"acltype": "subscribePattern", "topic": f"{TOPIC_ROOT}/#", "priority": 0, "allow": True},
    {"acltype": "subscribePattern", "topic": f"$share/+/{TOPIC_ROOT}/#", "priority": 0, "allow": True},
    {"acltype": "publishClientReceive", "topic": f"{TOPIC_ROOT}/#", "priority": 0, "allow": True},
    # Explicit, so that no change of the default access can ever let the gateway publish.
    {"acltype": "publishClientSend", "topic": "#", "priority": 0, "allow": False},
)

_CLIENT_NOT_FOUND = "Client not found"
_CLIENT_EXISTS = "Client already exists"
_ROLE_NOT_FOUND = "Role not found"
_ROLE_EXISTS = "Role already exists"


class BrokerCommandError(IocError):
    """The plugin refused a command; `error` is its own wording, e.g. "Client not found"."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"the broker's dynamic-security plugin refused {command}: {error}", retriable=False)
        self.command = command
        self.error = error


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_topic_filter(device_id: str, city: str, domain: str) -> str:
    """Everything a device may publish to: its telemetry and status topics, and nothing of others."""
    _check_device(device_id, city, domain)
    return f"{TOPIC_ROOT}/{city}/{domain}/{device_id}/#"


def device_acls(device_id: str, city: str, domain: str) -> list[dict[str, Any]]:
    return [
        {
            "acltype": "publishClientSend",
            "topic": device_topic_filter(device_id, city, domain),
            "priority": 0,
            "allow": True,
        }
    ]


def _check_device(device_id: str, city: str, domain: str) -> None:
    # These become part of a topic filter: a wildcard or a separator in them would widen the grant.
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise IocError(f"{device_id!r} is not a device id")
    if not CITY_PATTERN.fullmatch(city):
        raise IocError(f"{city!r} is not a city slug")
    if domain not in DOMAINS:
        raise IocError(f"{domain!r} is not a domain")


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _error_of(answer: Answer, *, tolerated: Iterable[str] = ()) -> str | None:
    """The plugin's error for one command: None on success, the text when tolerated, else raised."""
    error = answer.get("error")
    if error is None:
        return None
    if error in tolerated:
        return str(error)
    raise BrokerCommandError(str(answer.get("command", "a command")), str(error))


def _set_default_access() -> Command:
    return {"command": "setDefaultACLAccess", "acls": list(DEFAULT_ACL_ACCESS)}


@dataclass
class _Request:
    future: asyncio.Future[list[Answer]]
    answers: list[Answer | None]


class DeviceAccounts(Component):
    """Creates, rotates, revokes and deletes device accounts on the broker. Use with `async with`.

    Starting does not fail when the broker is down (whoever holds this keeps serving without it):
    paho keeps reconnecting, and each operation waits at most `timeout_s` for the connection and
    as long again for the plugin's answer before it raises ServiceUnavailableError.
    """

    def __init__(self, admin_url: str, *, timeout_s: float = 5.0) -> None:
        endpoint = mqtt_endpoint(admin_url, "IOC_MQTT_ADMIN_URL")
        if not endpoint.username or endpoint.password is None:
            raise ConfigurationError(
                "IOC_MQTT_ADMIN_URL must carry the dynamic-security admin's username and password"
            )
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._ready = asyncio.Event()
        self._problem: str | None = "not started"
        self._refusal: str | None = None  # paho's thread only
        self._stopping = False
        self._requests: dict[str, _Request] = {}
        self._in_flight: dict[int, str] = {}  # MQTT message id -> request id
        self._defaults_applied = False

    @property
    def where(self) -> str:
        return f"{self._endpoint.host}:{self._endpoint.port}"

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def problem(self) -> str | None:
        """Why the broker cannot take commands now; None when it can."""
        return None if self._ready.is_set() else self._problem

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._problem = "not connected yet"
        assert self._endpoint.password is not None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ioc-accounts-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self._endpoint.username, self._endpoint.password.get_secret_value())
        if self._endpoint.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client
        client.connect_async(self._endpoint.host, self._endpoint.port, keepalive=30)
        client.loop_start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self._timeout_s)
        if self._ready.is_set():
            log.info("device accounts are managed on the MQTT broker at %s", self.where)
        else:
            log.warning(
                "MQTT broker at %s is not available for device accounts yet (%s); device registration"
                " answers 503 until it is",
                self.where,
                self._problem,
            )

    async def stop(self) -> None:
        self._stopping = True
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        self._lost("device accounts are stopped")

    # -- operations ---------------------------------------------------------------------------

    async def create(self, device_id: str, city: str, domain: str) -> DeviceCredentials:
        """Create the device's account and role; returns the only copy of its password.

        An account that already exists and carries only this device's role is taken over with a
        new password: it is left by an earlier attempt whose answer was lost, or by a removal
        whose broker step failed. Any other account of that name is a ConflictError and is left
        untouched.
        """
        acls = device_acls(device_id, city, domain)
        role = device_role(device_id)
        password = _new_password()
        commands: list[Command] = [] if self._defaults_applied else [_set_default_access()]
        commands += [
            {"command": "createRole", "rolename": role, "textname": f"device {device_id}", "acls": acls},
            {
                "command": "createClient",
                "username": device_id,
                "password": password,
                "textname": f"{city}/{domain} device",
                "roles": [{"rolename": role}],
            },
        ]
        answers = await self._execute(commands)
        if not self._defaults_applied:
            _error_of(answers[0])
            self._defaults_applied = True
        role_existed = _error_of(answers[-2], tolerated=(_ROLE_EXISTS,)) is not None
        client_existed = _error_of(answers[-1], tolerated=(_CLIENT_EXISTS,)) is not None
        if role_existed:
            # Left by an earlier attempt: make its grant exactly this device's topics again.
            _error_of((await self._execute([{"command": "modifyRole", "rolename": role, "acls": acls}]))[0])
        if client_existed:
            if await self._account_state(device_id) != "device":
                if not role_existed:
                    await self._execute([{"command": "deleteRole", "rolename": role}])
                raise ConflictError(_not_a_device_account(device_id))
            for answer in await self._execute(
                [
                    {"command": "setClientPassword", "username": device_id, "password": password},
                    {"command": "enableClient", "username": device_id},
                ]
            ):
                _error_of(answer)
            log.info("took over the existing broker account of device %s with a new password", device_id)
        else:
            log.info("created the broker account of device %s", device_id)
        return DeviceCredentials(username=device_id, password=password)

    async def rotate(self, device_id: str) -> DeviceCredentials:
        """Give the device a new password (and re-enable a revoked account). The broker
        disconnects connections made with the old one at once; NotFoundError when there is no
        account."""
        state = await self._account_state(device_id)
        if state == "absent":
            raise NotFoundError(f"device {device_id!r} has no broker account")
        if state == "foreign":
            raise ConflictError(_not_a_device_account(device_id))
        password = _new_password()
        for answer in await self._execute(
            [
                {"command": "setClientPassword", "username": device_id, "password": password},
                {"command": "enableClient", "username": device_id},
            ]
        ):
            _error_of(answer)
        log.info("rotated the broker credentials of device %s", device_id)
        return DeviceCredentials(username=device_id, password=password)

    async def revoke(self, device_id: str) -> bool:
        """Disable the device's account; the broker disconnects it and refuses it from now on.
        False when the device has no account (nothing to revoke)."""
        state = await self._account_state(device_id)
        if state == "absent":
            return False
        if state == "foreign":
            raise ConflictError(_not_a_device_account(device_id))
        _error_of((await self._execute([{"command": "disableClient", "username": device_id}]))[0])
        log.info("revoked the broker credentials of device %s", device_id)
        return True

    async def delete(self, device_id: str) -> None:
        """Remove the device's account and role; nothing to remove is fine."""
        commands: list[Command] = [{"command": "deleteRole", "rolename": device_role(device_id)}]
        state = await self._account_state(device_id)
        if state == "device":
            commands.insert(0, {"command": "deleteClient", "username": device_id})
        elif state == "foreign":
            log.warning("broker account %r is not device %s's; left in place", device_id, device_id)
        for answer in await self._execute(commands):
            _error_of(answer, tolerated=(_CLIENT_NOT_FOUND, _ROLE_NOT_FOUND))
        log.info("deleted the broker account of device %s", device_id)

    async def ensure_gateway_account(self, username: str, password: str, *, role: str = GATEWAY_ROLE) -> None:
        """Create or update a gateway's account: read-only on `ioc/v1/`, never publishing. An
        existing account gets this password, which disconnects its current connections."""
        answers = await self._execute(
            [
                _set_default_access(),
                {"command": "createRole", "rolename": role, "textname": "ingest gateways"},
                {"command": "modifyRole", "rolename": role, "acls": list(GATEWAY_ACLS)},
                {
                    "command": "createClient",
                    "username": username,
                    "password": password,
                    "textname": "ingest gateway",
                    "roles": [{"rolename": role}],
                },
            ]
        )
        _error_of(answers[0])
        self._defaults_applied = True
        _error_of(answers[1], tolerated=(_ROLE_EXISTS,))
        _error_of(answers[2])
        if _error_of(answers[3], tolerated=(_CLIENT_EXISTS,)) is not None:
            for answer in await self._execute(
                [
                    {
                        "command": "modifyClient",
                        "username": username,
                        "password": password,
                        "roles": [{"rolename": role}],
                    },
                    {"command": "enableClient", "username": username},
                ]
            ):
                _error_of(answer)
        log.info("gateway account %s is read-only on %s/#", username, TOPIC_ROOT)

    async def get_client(self, username: str) -> dict[str, Any] | None:
        """The plugin's record of an account (roles, `disabled`), or None when there is none."""
        answer = (await self._execute([{"command": "getClient", "username": username}]))[0]
        if _error_of(answer, tolerated=(_CLIENT_NOT_FOUND,)) is not None:
            return None
        client: dict[str, Any] = answer.get("data", {}).get("client", {})
        return client

    async def _account_state(self, device_id: str) -> Literal["absent", "device", "foreign"]:
        """Whose the account named like the device is: a device's carries exactly its role. The
        check keeps a device id that happens to equal another account's name (the admin's, the
        gateway's) from ever changing or removing that account."""
        client = await self.get_client(device_id)
        if client is None:
            return "absent"
        roles = [r.get("rolename") for r in client.get("roles", [])]
        return "device" if roles == [device_role(device_id)] else "foreign"

    # -- requests -----------------------------------------------------------------------------

    async def _execute(self, commands: list[Command]) -> list[Answer]:
        """Send commands in one request; their answers, in order."""
        client = self._client
        if client is None or self._loop is None:
            raise ServiceUnavailableError(
                "device accounts are not started", public="device accounts are not started"
            )
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self._timeout_s)
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"MQTT broker at {self.where} is unavailable for device accounts: {self._problem}",
                    public=f"the MQTT broker is unavailable for device accounts: {self._problem}",
                ) from None
        request_id = uuid.uuid4().hex
        payload = json.dumps(
            {"commands": [{**c, "correlationData": f"{request_id}:{i}"} for i, c in enumerate(commands)]}
        )
        names = ", ".join(str(c["command"]) for c in commands)
        request = _Request(self._loop.create_future(), [None] * len(commands))
        self._requests[request_id] = request
        try:
            info = client.publish(CONTROL_TOPIC, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ServiceUnavailableError(
                    f"could not send {names} to the MQTT broker at {self.where}:"
                    f" {mqtt.error_string(info.rc)}",
                    public=f"could not send {names} to the MQTT broker",
                )
            self._in_flight[info.mid] = request_id
            try:
                return await asyncio.wait_for(request.future, self._timeout_s)
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"MQTT broker at {self.where} did not answer {names} within {self._timeout_s:g}s",
                    public=f"the MQTT broker did not answer {names} within {self._timeout_s:g}s",
                ) from None
        finally:
            self._requests.pop(request_id, None)

    # Everything below named without `_on_` runs in the event loop; the `_on_` callbacks run in
    # paho's network thread and only hand over to the loop.

    def _became_ready(self) -> None:
        if self._problem not in (None, "not connected yet"):
            log.info("MQTT broker at %s is available for device accounts again", self.where)
        self._problem = None
        self._ready.set()

    def _lost(self, problem: str) -> None:
        self._ready.clear()
        self._problem = problem
        self._in_flight.clear()
        for request in self._requests.values():
            if not request.future.done():
                request.future.set_exception(
                    ServiceUnavailableError(
                        f"MQTT broker at {self.where}: {problem} before it answered; the change may or"
                        " may not have been made",
                        public=f"the MQTT broker: {problem} before it answered; the change may or may"
                        " not have been made",
                    )
                )

    def _answered(self, payload: bytes) -> None:
        try:
            answers = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("unreadable answer on %s: %r", RESPONSE_TOPIC, payload[:200])
            return
        for answer in answers:
            correlation = answer.get("correlationData") if isinstance(answer, dict) else None
            if not isinstance(correlation, str):
                continue
            request_id, _, index = correlation.rpartition(":")
            request = self._requests.get(request_id)
            if request is None or request.future.done() or not index.isdigit():
                continue  # another admin client's, or given up
            if int(index) < len(request.answers):
                request.answers[int(index)] = answer
            if all(a is not None for a in request.answers):
                request.future.set_result([a for a in request.answers if a is not None])

    def _publish_done(self, mid: int, refusal: str | None) -> None:
        request_id = self._in_flight.pop(mid, None)
        request = self._requests.get(request_id) if request_id else None
        if refusal is None or request is None or request.future.done():
            return
        request.future.set_exception(
            IocError(
                f"MQTT broker at {self.where} refused the admin's command ({refusal}): the account in"
                f" IOC_MQTT_ADMIN_URL may not publish to {CONTROL_TOPIC}"
            )
        )

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            refusal = f"the broker refused the admin's connection ({reason_code})"
            if refusal != self._refusal:  # paho retries every few seconds; say it once
                log.error("MQTT broker at %s: %s; check IOC_MQTT_ADMIN_URL", self.where, refusal)
            self._refusal = refusal
            return
        self._refusal = None
        # A clean session each time: the response subscription is made again after every connect.
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._call(self._lost, "the broker cannot be reached")

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        if reason_codes and reason_codes[0].is_failure:
            problem = f"the admin may not subscribe to {RESPONSE_TOPIC} ({reason_codes[0]})"
            log.error("MQTT broker at %s: %s", self.where, problem)
            self._call(self._lost, problem)
            return
        self._call(self._became_ready)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        problem = self._refusal or f"the connection was lost ({reason_code})"
        if not self._stopping and self._refusal is None:
            log.warning("MQTT broker at %s for device accounts: %s; reconnecting", self.where, problem)
        self._call(self._lost, problem)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._call(self._answered, bytes(message.payload))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._call(self._publish_done, mid, str(reason_code) if reason_code.is_failure else None)


def _not_a_device_account(device_id: str) -> str:
    return (
        f"the broker already has an account named {device_id!r} that is not this device's;"
        " it was left untouched (register the device under another id)"
    )
