"""Sending one delivery: a signed POST through an HTTP client that connects only to addresses
webhooks may reach, and what came of it as an `AttemptResult`.

The client resolves each host itself and connects only to allowed addresses, so a name that
passed the check at registration cannot later be pointed at an internal service.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx

from ioc_core.settings import Settings
from ioc_core.storage.webhooks import DeliveryJob
from ioc_core.webhook_targets import AddressPolicy, Resolver, allowed_addresses, policy_of, resolve
from ioc_core.webhooks import (
    RESPONSE_KEEP_MAX,
    RESPONSE_READ_MAX,
    AttemptResult,
    WebhookError,
    retry_after,
    signed_headers,
)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host itself, checks every address against the policy and connects only to
    the addresses it has just checked (pinned: no second lookup that DNS could answer otherwise);
    TLS still checks the certificate against the URL's host name."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._policy = policy
        self._resolver = resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await allowed_addresses(host, port, self._policy, resolver=self._resolver)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are not sent to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the address guard in place of its network backend, and no proxy
    or certificate settings taken from the environment."""

    def __init__(
        self, policy: AddressPolicy, *, resolver: Resolver = resolve, max_connections: int = 100
    ) -> None:
        super().__init__(trust_env=False)
        # httpx offers no public way to choose the network backend; the pool it built is replaced.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(policy, resolver),
        )


def webhook_client(settings: Settings, *, resolver: Resolver = resolve) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=GuardedTransport(policy_of(settings), resolver=resolver),
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


async def send_once(client: httpx.AsyncClient, job: DeliveryJob, *, timeout_s: float) -> AttemptResult:
    """One signed POST of `job`; never raises for what the endpoint or the network does."""
    if job.secret is None:
        # Sealed with a key this worker lacks; tried again later, as a key may yet be added.
        return AttemptResult(None, 0.0, "the signing secret opens with no configured key (IOC_SECRETS_KEY)")
    body = job.body.encode()
    headers = signed_headers(job.secret, job.message_id, body)
    started = time.monotonic()

    def elapsed() -> float:
        return round((time.monotonic() - started) * 1000, 1)

    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", job.url, content=body, headers=headers) as response:
                received = bytearray()
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= RESPONSE_READ_MAX:
                        break
                text = bytes(received[:RESPONSE_KEEP_MAX]).decode("utf-8", errors="replace")
                error = None
                if 300 <= response.status_code < 400:
                    # Where it points is part of the answer, shown only with the answer.
                    error = "redirects are not followed"
                    text = f"Location: {response.headers.get('location', '')[:200]}\n\n{text}"
                elif not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
                return AttemptResult(
                    status_code=response.status_code,
                    latency_ms=elapsed(),
                    error=error,
                    response=text or None,
                    retry_after_s=retry_after(response.headers.get("retry-after"), now=datetime.now(UTC)),
                )
    except TimeoutError:
        return AttemptResult(None, elapsed(), f"no answer within {timeout_s:g} s")
    except httpx.TimeoutException as exc:
        return AttemptResult(None, elapsed(), f"timed out: {type(exc).__name__}")
    except WebhookError as exc:
        return AttemptResult(None, elapsed(), str(exc))
    except httpx.ProtocolError as exc:
        # The parser's complaint quotes what the other end sent (an SSH banner, a database's
        # greeting): that is the answer, kept apart from the error.
        return AttemptResult(
            None,
            elapsed(),
            f"{type(exc).__name__}: the answer broke the HTTP protocol",
            response=str(exc)[:500],
        )
    except httpx.HTTPError as exc:
        return AttemptResult(None, elapsed(), f"{type(exc).__name__}: {exc}"[:500])
