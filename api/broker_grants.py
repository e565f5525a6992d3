"""What the broker's dynamic-security plugin lets each account do, as the plugin's own JSON.

- Nobody publishes or subscribes unless a role grants it (`DEFAULT_ACL_ACCESS`).
- A device's role grants publishing to exactly its two topics, `…/{id}/telemetry` and
  `…/{id}/status`: not `…/{id}/#`, which would let it feed topics nobody validates.
- A device's account is bound to one MQTT client id, its device id: the plugin refuses the
  connection when the client id differs, before the broker looks for a session of that id. Without
  the binding any device could connect with the gateway's client id and take over its persistent
  session (Mosquitto hands the subscriptions and the queued messages to whoever connects with the
  id, whatever the username), or wipe it with a clean start.
- Device ids beginning with `ioc-` are refused, so no device account can ever be bound to the
  client id of one of the system's own clients (gateways, the API's admin client, the simulator's
  devices), which all begin so.
- The gateway's role subscribes to and receives `ioc/v1/`, shared subscriptions included, and
  publishes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ioc_core.domains import DOMAINS
from ioc_core.errors import ConflictError, IocError
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN, SYSTEM_CLIENT_PREFIX, TOPIC_ROOT

DEVICE_ROLE_PREFIX = "ioc-device-"
GATEWAY_ROLE = "ioc-gateway"
RESERVED_PREFIX = SYSTEM_CLIENT_PREFIX
DEVICE_TOPIC_KINDS = ("telemetry", "status")

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


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_topics(device_id: str, city: str, domain: str) -> list[str]:
    """Everything a device may publish to: its telemetry and status topics, and nothing else."""
    _check_device(device_id, city, domain)
    return [f"{TOPIC_ROOT}/{city}/{domain}/{device_id}/{kind}" for kind in DEVICE_TOPIC_KINDS]


def device_acls(device_id: str, city: str, domain: str) -> list[dict[str, Any]]:
    return [
        {"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": True}
        for topic in device_topics(device_id, city, domain)
    ]


def check_device_id_free(device_id: str) -> None:
    """Refuse a device id that an account bound to it would make a system client's id."""
    if device_id.startswith(RESERVED_PREFIX):
        raise ConflictError(
            f"device ids beginning with {RESERVED_PREFIX!r} are reserved for the system's own MQTT"
            f" clients (gateways, the API), whose client ids a device's account would be bound to;"
            f" register {device_id!r} under another id"
        )


def narrowed_grants(role: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """For a device role made by an earlier release, which granted `…/{id}/#`, the grants it
    should have now; None for any other role, or one already narrowed."""
    name = role.get("rolename")
    if not isinstance(name, str) or not name.startswith(DEVICE_ROLE_PREFIX):
        return None
    device_id = name.removeprefix(DEVICE_ROLE_PREFIX)
    for acl in role.get("acls") or []:
        parts = str(acl.get("topic", "")).split("/")
        if (
            acl.get("acltype") == "publishClientSend"
            and len(parts) == 6
            and "/".join(parts[:2]) == TOPIC_ROOT
            and parts[4:] == [device_id, "#"]
        ):
            try:
                return device_acls(device_id, parts[2], parts[3])
            except IocError:
                return None  # not one we made: left as it is
    return None


def _check_device(device_id: str, city: str, domain: str) -> None:
    # These become part of a topic name: a wildcard or a separator in them would widen the grant.
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise IocError(f"{device_id!r} is not a device id")
    if not CITY_PATTERN.fullmatch(city):
        raise IocError(f"{city!r} is not a city slug")
    if domain not in DOMAINS:
        raise IocError(f"{domain!r} is not a domain")
