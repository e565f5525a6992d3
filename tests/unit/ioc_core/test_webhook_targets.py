"""Which addresses webhooks may reach (`ioc_core.webhook_targets`): a table of addresses under
the default policy, an allow-list, and the deprecated IOC_WEBHOOK_ALLOW_PRIVATE alias; URL
shapes; and a host whose names mix reachable and forbidden addresses."""

from __future__ import annotations

import ipaddress

import pytest

from ioc_core.errors import ConfigurationError
from ioc_core.settings import load_settings
from ioc_core.webhook_targets import (
    AddressPolicy,
    ForbiddenAddress,
    Resolver,
    allowed_addresses,
    parse_url,
    policy_of,
    setting_warnings,
)
from ioc_core.webhooks import WebhookError

DEFAULT = AddressPolicy()

# (address, the kind the refusal names, "" where Python versions name it differently): every
# one refused under the default policy.
REFUSED = [
    # loopback, RFC 1918, link-local, "this network", unspecified
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.9", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.10.20", "link-local"),
    ("0.0.0.0", "multicast, broadcast or unspecified"),
    ("0.1.2.3", "multicast, broadcast or unspecified"),
    # carrier-grade NAT (RFC 6598)
    ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("100.127.255.254", "shared (carrier-grade NAT)"),
    # documentation, benchmarking, reserved, IETF assignments, retired 6to4 anycast
    ("192.0.2.10", ""),
    ("198.18.0.1", ""),
    ("203.0.113.7", ""),
    ("240.0.0.1", ""),
    ("192.0.0.8", ""),
    ("192.88.99.1", ""),
    # multicast and broadcast, which `is_global` calls global
    ("224.0.0.1", "multicast, broadcast or unspecified"),
    ("239.255.255.250", "multicast, broadcast or unspecified"),
    ("255.255.255.255", "multicast, broadcast or unspecified"),
    ("ff02::1", "multicast, broadcast or unspecified"),
    ("ff0e::1", "multicast, broadcast or unspecified"),
    # IPv6 loopback, unspecified, unique-local, link-local (with a zone), documentation
    ("::1", "loopback"),
    ("::", "multicast, broadcast or unspecified"),
    ("fd12:3456::1", "private"),
    ("fc00::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("2001:db8::1", ""),
    # IPv4-mapped IPv6: judged by the IPv4 address it reaches
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:100.100.100.1", "shared (carrier-grade NAT)"),
    ("::ffff:7f00:1", "loopback"),
    # SIIT's IPv4-translated addresses, IPv6 documentation (2024) and SRv6 SIDs
    ("::ffff:0:7f00:1", ""),
    ("::ffff:0:808:808", ""),
    ("3fff::1", ""),
    ("5f00::1", ""),
    # IPv4-compatible IPv6 (deprecated)
    ("::127.0.0.1", ""),
    ("::8.8.8.8", ""),
    # 6to4 carrying a private IPv4 (2002:AABB:CCDD::/48 reaches AA.BB.CC.DD)
    ("2002:c0a8:0101::1", "private (embedded in IPv6)"),
    ("2002:0a00:0001::", "private (embedded in IPv6)"),
    ("2002:7f00:0001::1", "loopback (embedded in IPv6)"),
    ("2002:6440:0001::1", "shared (carrier-grade NAT) (embedded in IPv6)"),
    # NAT64: the well-known prefix carrying a private address, and the local-use prefix
    ("64:ff9b::a00:1", "private (embedded in IPv6)"),
    ("64:ff9b::7f00:1", "loopback (embedded in IPv6)"),
    ("64:ff9b::c0a8:101", "private (embedded in IPv6)"),
    ("64:ff9b:1::a00:1", ""),
    # Teredo
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ""),
    # cloud metadata and host agents: AWS (v4, v6, ECS, EKS), GCP/Azure/OpenStack, Azure
    # WireServer (a public-looking address), Alibaba (inside CGNAT), Oracle
    ("169.254.169.254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("169.254.170.23", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("fd00:ec2::23", "cloud metadata"),
    ("168.63.129.16", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("192.0.0.192", "cloud metadata"),
    # metadata addresses in other encodings
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("::ffff:a9fe:a9fe", "cloud metadata"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),
    ("2002:a9fe:a9fe::1", "cloud metadata"),
    ("2002:6464:64c8::", "cloud metadata"),
    ("::ffff:0:a9fe:a9fe", "cloud metadata"),
]

ACCEPTED = [
    "8.8.8.8",
    "1.1.1.1",
    "203.113.131.1",  # VNPT, Hà Nội
    "14.160.0.1",
    "93.184.215.14",
    "100.63.255.255",  # just below carrier-grade NAT
    "100.128.0.1",  # just above it
    "172.15.255.255",
    "172.32.0.1",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "2402:800::1",  # a Vietnamese ISP's range
    "::ffff:8.8.8.8",
    "2002:0808:0808::1",  # 6to4 carrying a public address
    "64:ff9b::808:808",  # NAT64 carrying a public address
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_addresses_that_are_not_globally_routable_are_refused(address: str, kind: str) -> None:
    refusal = DEFAULT.refusal(address)
    assert refusal is not None and (refusal == kind or not kind), refusal


@pytest.mark.parametrize("address", ACCEPTED)
def test_public_addresses_are_accepted(address: str) -> None:
    assert DEFAULT.refusal(address) is None


def _policy(*networks: str) -> AddressPolicy:
    return AddressPolicy(tuple(ipaddress.ip_network(n) for n in networks))


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        (("10.20.0.0/16",), "10.20.3.4", True),
        (("10.20.0.0/16",), "10.21.0.1", False),
        (("10.20.0.0/16",), "::ffff:10.20.3.4", True),  # the same IPv4 address, mapped
        (("10.20.0.0/16",), "2002:0a14:0304::1", True),  # 6to4 to a listed network
        (("10.20.0.0/16",), "64:ff9b::a14:304", True),  # NAT64 to a listed network
        (("10.20.0.0/16",), "64:ff9b::a15:1", False),
        (("127.0.0.0/8",), "127.0.0.1", True),
        (("127.0.0.0/8",), "::1", False),  # IPv6 loopback is listed on its own
        (("::1/128",), "::1", True),
        (("100.64.0.0/10",), "100.64.1.1", True),
        (("fd00::/8",), "fd12::1", True),
        # metadata addresses stay refused whatever is listed
        (("169.254.0.0/16",), "169.254.169.254", False),
        (("169.254.0.0/16",), "169.254.1.1", True),
        (("100.64.0.0/10",), "100.100.100.200", False),
        (("fd00::/8",), "fd00:ec2::254", False),
        (("168.63.129.16/32",), "168.63.129.16", False),
        # as do broadcast, multicast and "this host", even under 0.0.0.0/0
        (("0.0.0.0/0", "::/0"), "0.0.0.0", False),
        (("0.0.0.0/0", "::/0"), "255.255.255.255", False),
        (("0.0.0.0/0", "::/0"), "224.0.0.1", False),
        (("0.0.0.0/0", "::/0"), "::", False),
        (("0.0.0.0/0", "::/0"), "169.254.169.254", False),
        (("0.0.0.0/0", "::/0"), "192.168.1.1", True),
    ],
)
def test_the_allow_list_opens_its_networks_and_nothing_more(
    networks: tuple[str, ...], address: str, allowed: bool
) -> None:
    assert (_policy(*networks).refusal(address) is None) is allowed


def test_the_deprecated_alias_stands_for_rfc_1918_and_loopback() -> None:
    policy = policy_of(load_settings(webhook_allow_private=True))
    for address in ("10.0.0.1", "172.16.5.5", "192.168.0.10", "127.0.0.1", "::1"):
        assert policy.refusal(address) is None, address
    for address in ("169.254.169.254", "169.254.1.1", "100.64.0.1", "fd00::1", "fe80::1", "0.0.0.0"):
        assert policy.refusal(address) is not None, address
    combined = policy_of(load_settings(webhook_allow_private=True, webhook_allowed_networks="100.64.0.0/10"))
    assert combined.refusal("100.64.0.1") is None and combined.refusal("10.0.0.1") is None


def test_the_allow_list_reads_commas_or_json_and_refuses_a_host_with_a_prefix() -> None:
    assert [
        str(n)
        for n in load_settings(webhook_allowed_networks="10.20.0.0/16, 127.0.0.0/8").webhook_allowed_networks
    ] == [
        "10.20.0.0/16",
        "127.0.0.0/8",
    ]
    parsed = load_settings(webhook_allowed_networks='["fd00::/8", "10.0.0.5"]').webhook_allowed_networks
    assert [str(n) for n in parsed] == ["fd00::/8", "10.0.0.5/32"]
    assert load_settings(webhook_allowed_networks="").webhook_allowed_networks == []
    for wrong in ("10.20.0.1/16", "10.20.0.0/33", "intranet"):
        with pytest.raises(ConfigurationError, match="IOC_WEBHOOK_ALLOWED_NETWORKS"):
            load_settings(webhook_allowed_networks=wrong)


def test_start_warns_of_the_alias_and_of_listed_metadata_addresses() -> None:
    assert setting_warnings(load_settings()) == []
    [alias] = setting_warnings(load_settings(webhook_allow_private=True))
    assert "deprecated" in alias and "IOC_WEBHOOK_ALLOWED_NETWORKS" in alias
    [metadata] = setting_warnings(load_settings(webhook_allowed_networks="169.254.0.0/16"))
    assert "169.254.169.254" in metadata and "stay refused" in metadata
    assert load_settings(webhook_allowed_networks="10.0.0.0/8").masked()["webhook_allowed_networks"] == [
        "10.0.0.0/8"
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/x", "http"),
        ("file:///etc/passwd", "http"),
        ("gopher://127.0.0.1:6379/_INFO", "http"),
        ("https://", "no host"),
        ("https://user:pw@example.org/", "credentials"),
        ("https://example.org/#frag", "fragment"),
        ("https://example.org:99999/", "malformed"),
        ("http://[::1/", "malformed"),
        ("https://example.org/" + "a" * 2100, "longer"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(WebhookError, match=message):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # one parser reads a user name and another a host: refused, whichever is right
        ("http://8.8.8.8\\@127.0.0.1/", "credentials"),
        ("http://127.0.0.1\\@8.8.8.8/", "credentials"),
        ("http://127.0.0.1%2f@8.8.8.8/", "credentials"),
        # a name the sending client cannot encode
        ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", "malformed"),
    ],
)
def test_urls_two_parsers_could_read_differently_are_refused(url: str, message: str) -> None:
    with pytest.raises(WebhookError, match=message):
        parse_url(url)


def test_the_host_checked_is_the_one_the_sending_client_resolves() -> None:
    # IDNA 2008, as httpx encodes it; Python's own codec (IDNA 2003) would look up strasse.example.
    assert parse_url("http://straße.example/hook").host == "xn--strae-oqa.example"
    assert parse_url("https://Example.ORG/hook").host == "example.org"
    assert parse_url("http://[::ffff:127.0.0.1]/").host == "::ffff:127.0.0.1"


def test_url_ports_default_by_scheme() -> None:
    assert parse_url("https://example.org/hook").port == 443
    assert parse_url("http://example.org/hook").port == 80
    assert parse_url("http://example.org:8080/hook").port == 8080


def _resolver(*answers: str) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return list(answers)

    return resolve


async def test_a_name_with_one_forbidden_answer_is_refused_whole_without_saying_the_address() -> None:
    with pytest.raises(ForbiddenAddress) as refused:
        await allowed_addresses("agency.example", 443, DEFAULT, resolver=_resolver("8.8.8.8", "10.9.8.7"))
    assert "private" in str(refused.value) and "10.9.8.7" not in str(refused.value)
    assert "resolves to" in str(refused.value)
    assert await allowed_addresses("agency.example", 443, DEFAULT, resolver=_resolver("8.8.8.8")) == [
        "8.8.8.8"
    ]
    with pytest.raises(WebhookError, match="no address"):
        await allowed_addresses("agency.example", 443, DEFAULT, resolver=_resolver())


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "localhost"])
async def test_other_spellings_of_loopback_resolve_to_it_and_are_refused(host: str) -> None:
    with pytest.raises(ForbiddenAddress, match="loopback"):
        await allowed_addresses(host, 80, DEFAULT)
