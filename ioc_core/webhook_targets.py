"""Which addresses a webhook may reach (contract §8): the URL's shape, the address policy, and
resolving a host to the addresses a request may go to.

A webhook URL is chosen by an admin, and the system then POSTs to it from inside the city's
network: without a policy it would be a way into every internal service the workers can reach
(SSRF). Only globally routable addresses are reachable, except the networks an operator lists in
`IOC_WEBHOOK_ALLOWED_NETWORKS`; the cloud metadata services never are. The API checks at
registration and the delivery worker again at every connection, connecting only to the addresses
it has just checked (`delivery.sending`), so a name that later resolves elsewhere gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from ioc_core.webhooks import WebhookError

if TYPE_CHECKING:
    from ioc_core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Instance metadata and host agents of the large clouds: they hand out credentials to whoever
# asks from inside, so no setting opens them. AWS (IPv4 and IPv6, the ECS task and EKS pod
# identity agents), GCP, Azure and OpenStack share 169.254.169.254; Azure's WireServer is
# 168.63.129.16 (a public-looking address reachable only inside Azure), Alibaba's is
# 100.100.100.200, Oracle's older one 192.0.0.192.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "168.63.129.16",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)

# Not destinations of a unicast request at all, whatever is listed: "this host" (0.0.0.0 reaches
# the local machine on Linux), broadcast and multicast.
_NEVER: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "255.255.255.255/32", "224.0.0.0/4", "::/128", "ff00::/8")
)

# Ranges that `is_global` calls global in some Python versions and are not reachable on the
# Internet: local-use NAT64 (RFC 8215), the deprecated IPv4-compatible IPv6 addresses, SIIT's
# IPv4-translated addresses (RFC 2765), IPv6 documentation (RFC 9637) and SRv6 SIDs (RFC 9602),
# the IETF protocol assignments and the retired 6to4 relay anycast.
_NOT_GLOBAL: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "64:ff9b:1::/48",
        "::/96",
        "::ffff:0:0:0/96",
        "3fff::/20",
        "5f00::/16",
        "192.0.0.0/24",
        "192.88.99.0/24",
    )
)

# Where other addresses are carried inside an IPv6 one: NAT64's well-known prefix (RFC 6052)
# and 6to4 (2002::/16) route to the IPv4 address inside; Teredo (2001::/32) to its server and
# its client.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")

# The networks `IOC_WEBHOOK_ALLOW_PRIVATE=true` stood for: RFC 1918 and loopback.
LEGACY_PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128")
)

# A name that takes longer to resolve is refused (registration) or tried again later (delivery).
RESOLVE_TIMEOUT_S = 5.0


class ForbiddenAddress(WebhookError):
    """The URL's host is or resolves to an address webhooks may not reach."""


def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])


def _is_global(ip: IPAddress) -> bool:
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _NOT_GLOBAL)


def carried(ip: IPAddress) -> list[IPAddress]:
    """The address a packet to `ip` really reaches, and every address embedded in it: an
    IPv4-mapped address is its IPv4 address; NAT64, SIIT, 6to4, Teredo and IPv4-compatible
    addresses carry one or two IPv4 addresses that the translator or relay forwards to."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    inside: list[IPAddress] = []
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        inside.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        inside.append(ip.sixtofour)
    if ip.teredo is not None:
        inside.extend(ip.teredo)
    return [ip, *inside]


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Globally routable addresses, plus `allowed` networks; metadata services never."""

    allowed: tuple[IPNetwork, ...] = ()

    def refusal(self, address: str) -> str | None:
        """Why webhooks may not reach this IP address (a short kind, such as "private"), or
        None when they may."""
        try:
            ip = _address(address)
        except ValueError:
            return "unparseable"
        forms = carried(ip)
        for form in forms:
            if form in METADATA_ADDRESSES:
                return "cloud metadata"
            if any(form in net for net in _NEVER):
                return "multicast, broadcast or unspecified"
        for form in forms:
            if not _is_global(form) and not self._allows(form):
                return _kind(form) if form is forms[0] else f"{_kind(form)} (embedded in IPv6)"
        return None

    def _allows(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)


def _kind(ip: IPAddress) -> str:
    for kind, hit in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("shared (carrier-grade NAT)", ip in ipaddress.ip_network("100.64.0.0/10")),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if hit:
            return kind
    return "non-global"


@dataclass(frozen=True, slots=True)
class WebhookUrl:
    url: str
    host: str
    port: int


def parse_url(url: str) -> WebhookUrl:
    """Check a URL's shape: http(s), a host, no credentials, no fragment."""
    if len(url) > 2048:
        raise WebhookError("the URL is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookError(f"the URL is malformed: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise WebhookError("the URL must start with http:// or https://")
    if not parts.hostname:
        raise WebhookError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError("credentials in the URL are not supported; requests are signed instead")
    if parts.fragment:
        raise WebhookError("the URL must not have a #fragment")
    # The host checked is the one the delivery worker's client (httpx) will connect to, in the
    # form it resolves (IDNA 2008): two parsers that read one URL differently would otherwise let
    # a URL pass the check for one host and be sent to another.
    try:
        sent_to = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WebhookError(f"the URL is malformed: {exc}") from exc
    if sent_to.userinfo:
        raise WebhookError("credentials in the URL are not supported; requests are signed instead")
    host = sent_to.raw_host.decode("ascii")
    return WebhookUrl(
        url=url, host=host, port=sent_to.port or port or (443 if parts.scheme == "https" else 80)
    )


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        _address(host)
    except ValueError:
        pass
    else:
        return [host]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError as exc:
        raise WebhookError(f"{host} did not resolve within {RESOLVE_TIMEOUT_S:g} s", retriable=True) from exc
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise WebhookError(f"{host} does not resolve: {reason}", retriable=True) from exc
    return sorted({str(info[4][0]) for info in infos})


async def allowed_addresses(
    host: str, port: int, policy: AddressPolicy, *, resolver: Resolver = resolve
) -> list[str]:
    """The addresses to connect to. A host with any forbidden address is refused whole: a name
    that mixes reachable and forbidden answers is an attack (or about to become one). The refusal
    names the kind of address, not the address: for a name, that would tell an admin limited to
    a scope what the internal DNS holds."""
    addresses = await resolver(host, port)
    if not addresses:
        raise WebhookError(f"{host} has no address", retriable=True)
    for address in addresses:
        kind = policy.refusal(address)
        if kind is not None:
            what = "is" if address == host else "resolves to"
            raise ForbiddenAddress(f"{host} {what} a {kind} address, which webhooks may not reach")
    return addresses


def listed_metadata(networks: Iterable[IPNetwork]) -> list[str]:
    """The metadata addresses inside `networks`: listed, and refused all the same."""
    return sorted(
        str(a) for a in METADATA_ADDRESSES if any(a.version == n.version and a in n for n in networks)
    )


def policy_of(settings: Settings) -> AddressPolicy:
    """The address policy the settings describe: `IOC_WEBHOOK_ALLOWED_NETWORKS`, plus RFC 1918
    and loopback for the deprecated `IOC_WEBHOOK_ALLOW_PRIVATE=true`."""
    allowed = list(settings.webhook_allowed_networks)
    if settings.webhook_allow_private:
        allowed += [n for n in LEGACY_PRIVATE_NETWORKS if n not in allowed]
    return AddressPolicy(tuple(allowed))


def setting_warnings(settings: Settings) -> list[str]:
    """What an operator should hear once at start about the webhook address settings."""
    warnings = []
    if "webhook_allow_private" in settings.model_fields_set:
        warnings.append(
            "IOC_WEBHOOK_ALLOW_PRIVATE is deprecated and goes in the next release; set"
            " IOC_WEBHOOK_ALLOWED_NETWORKS to the networks agencies are on instead"
            + (
                " (true stands for 10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,::1/128)"
                if settings.webhook_allow_private
                else ""
            )
        )
    metadata = listed_metadata(settings.webhook_allowed_networks)
    if metadata:
        warnings.append(
            "IOC_WEBHOOK_ALLOWED_NETWORKS includes cloud metadata addresses, which stay refused: "
            + ", ".join(metadata)
        )
    return warnings
