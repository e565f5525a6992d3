"""Sending one delivery through the guarded client (`delivery.sending`), against small servers on
loopback and a resolver the test controls: a name that turns private between two connections is
refused before any connection is made, the address checked is the address connected to, and
what an endpoint sends back stays in `response`, apart from the error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from delivery.sending import send_once, webhook_client
from ioc_core.settings import Settings
from ioc_core.storage.webhooks import DeliveryJob

LOOPBACK_ONLY = Settings(webhook_allowed_networks=["127.0.0.0/8"], webhook_timeout_s=2)


class Server:
    """A TCP server on 127.0.0.1 that answers every connection with `answer`, and counts them."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@asynccontextmanager
async def serving(answer: bytes) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


class FlippingDns:
    """Answers each lookup with the next of `answers` (the last one from then on)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def job(url: str) -> DeliveryJob:
    return DeliveryJob(
        id=1,
        endpoint_id="wh_0000000000000000",
        url=url,
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        message_id="msg_1",
        event_type="alarm.raised",
        body="{}",
        attempts=0,
        window_started_at=datetime.now(UTC),
    )


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def test_a_name_that_turns_private_is_refused_before_connecting() -> None:
    async with serving(OK) as server:
        dns = FlippingDns(["127.0.0.1"], ["10.0.0.7"], ["127.0.0.1", "100.100.100.200"])
        url = f"http://agency.example:{server.port}/hook"
        async with webhook_client(LOOPBACK_ONLY, resolver=dns) as client:
            first = await send_once(client, job(url), timeout_s=2)
            second = await send_once(client, job(url), timeout_s=2)
            third = await send_once(client, job(url), timeout_s=2)
    # The name does not resolve in any real DNS: the request reached the address checked.
    assert first.status_code == 200 and server.connections == 1
    assert second.status_code is None and second.outcome == "retry"
    assert second.error == "agency.example resolves to a private address, which webhooks may not reach"
    assert third.status_code is None and "cloud metadata" in (third.error or "")
    assert server.connections == 1, "a refused name was connected to"
    assert len(dns.lookups) == 3, "each connection resolves once, and connects to what it checked"


async def test_an_address_listed_nowhere_is_refused_at_send_time_too() -> None:
    async with serving(OK) as server:
        async with webhook_client(Settings(webhook_timeout_s=2)) as client:
            refused = await send_once(client, job(f"http://127.0.0.1:{server.port}/hook"), timeout_s=2)
        assert refused.status_code is None and "loopback" in (refused.error or "")
        assert server.connections == 0
        async with webhook_client(Settings(webhook_allow_private=True)) as client:
            allowed = await send_once(client, job(f"http://127.0.0.1:{server.port}/hook"), timeout_s=2)
        assert allowed.status_code == 200


async def test_what_the_endpoint_sent_stays_out_of_the_error() -> None:
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n\r\n"
    redirect = (
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/latest/meta-data/\r\n"
        b"Content-Length: 6\r\nConnection: close\r\n\r\nsecret"
    )
    async with serving(banner) as ssh, serving(redirect) as moved, webhook_client(LOOPBACK_ONLY) as client:
        not_http = await send_once(client, job(f"http://127.0.0.1:{ssh.port}/"), timeout_s=2)
        redirected = await send_once(client, job(f"http://127.0.0.1:{moved.port}/"), timeout_s=2)
    assert not_http.status_code is None and "OpenSSH" not in (not_http.error or "")
    assert "OpenSSH" in (not_http.response or "")
    assert redirected.status_code == 307 and redirected.error == "redirects are not followed"
    assert "169.254.169.254" in (redirected.response or "") and "secret" in (redirected.response or "")
    assert moved.connections == 1, "the redirect was followed"
