"""An ASGI app served by uvicorn inside our event loop, as a component with `start()`/`stop()`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ioc_core.component import Component
from ioc_core.errors import ConfigurationError, ServiceUnavailableError

log = logging.getLogger(__name__)

_H11_DEFAULT_HEAD_BYTES = 16 * 1024  # h11's own limit when none is configured


class ProblemH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering a request it cannot parse in RFC 9457 problem+json like
    every other error: 431 when the request line and headers outgrow the limit
    (`h11_max_incomplete_event_size`), 400 for anything else malformed. uvicorn's own answer is a
    plain-text 400 for both."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or _H11_DEFAULT_HEAD_BYTES
        # uvicorn calls this while handling h11's error, whose hint tells a head that outgrew
        # the buffer (431) from anything else malformed (400).
        error = sys.exception()
        hint = error.error_status_hint if isinstance(error, h11.RemoteProtocolError) else 400
        too_long = hint == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE if too_long else HTTPStatus.BAD_REQUEST
        detail = (
            f"the request line and headers exceed {limit} bytes"
            if too_long
            else "not a valid HTTP/1.1 request"
        )
        body = json.dumps(
            {"type": "about:blank", "title": status.phrase, "status": status, "detail": detail},
            separators=(",", ":"),
        )
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers, reason=status.phrase.encode()),
            h11.Data(data=body.encode()),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


# A connection closed while the client still sends a body lingers this long, reading and
# dropping what arrives, so that the client reads the answer before the close: a close with
# unread data sends a reset, and a reset can destroy the answer in the client's buffer before it
# is read (nginx's lingering close, for the same reason). Dropping costs next to nothing.
LINGER_S = 2.0


class _LingeringTransport:
    """The connection's transport as uvicorn uses it, with a `close` that lingers (see
    `LINGER_S`) while the client may still be sending; anything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: ClientTimeoutH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def abort(self) -> None:
        self._transport.abort()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        # Still sending: a body, or whatever made h11 give up (a head too long, say).
        if self._protocol.conn.their_state not in (h11.SEND_BODY, h11.ERROR):
            self._transport.close()
            return
        self.lingering = True
        if self._transport.can_write_eof():
            self._transport.write_eof()  # the answer is complete: the client reads it to the end
        self._transport.resume_reading()
        self._protocol.loop.call_later(LINGER_S, self._transport.close)


class ClientTimeoutH11Protocol(ProblemH11Protocol):
    """`ProblemH11Protocol` for clients that may be hostile. A client has `client_timeout_s` to
    send a request's line and headers, on a new connection and after each answer, or the
    connection closes; an answer it stops taking in (the transport's buffer full) for as long is
    dropped with the connection; and a close while it still sends a body (an answer refusing that
    body) lingers rather than resetting the connection (see `LINGER_S`).

    uvicorn has none of these: a client sending a byte every few seconds (slowloris), or asking
    for a large answer and never reading it, would hold its connection (and the request's slot)
    for ever, and enough of them would fill `limit_concurrency`. The body has its own deadline in
    the app; an answer may take as long as it takes while the client keeps reading (event
    streams)."""

    client_timeout_s: ClassVar[float] = 15.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = _LingeringTransport(transport, self)
        super().connection_made(cast(asyncio.Transport, self._lingering))
        self._head_deadline: asyncio.TimerHandle | None = None
        self._read_deadline: asyncio.TimerHandle | None = None
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:
            return  # the rest of a refused body
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_deadline = _cancelled(self._head_deadline)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.client_timeout_s, self._drop, "stopped reading")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._read_deadline = _cancelled(self._read_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline = _cancelled(self._head_deadline)
        self._read_deadline = _cancelled(self._read_deadline)
        super().connection_lost(exc)

    def _await_head(self) -> None:
        _cancelled(self._head_deadline)
        self._head_deadline = self.loop.call_later(self.client_timeout_s, self._head_too_late)

    def _head_too_late(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self._lingering.get_write_buffer_size():
            # Part of the last answer is still waiting for the client: a close would wait on it.
            self._drop("sent no request and did not take in the last answer")
            return
        self.conn.send(h11.ConnectionClosed())
        self.transport.close()

    def _drop(self, why: str) -> None:
        self._read_deadline = None
        log.info("dropped a client that %s for %g s", why, self.client_timeout_s)
        sock = self._lingering.get_extra_info("socket")
        if sock is not None:
            # A reset, so that what the kernel still holds for the client goes too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._lingering.abort()


def _cancelled(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel `timer` if there is one; None, to put in its place."""
    if timer is not None:
        timer.cancel()
    return None


def check_tls_files(certificate: Path, key: Path) -> None:
    """Refuse, in one line, a certificate and key that do not load together (a missing file, a key
    of another certificate, an encrypted key) before the server tries."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"IOC_API_TLS_CERT_FILE ({certificate}) and IOC_API_TLS_KEY_FILE ({key}) do not load as a"
            f" certificate and its unencrypted key: {exc}"
        ) from exc


class HttpServer(Component):
    """`max_header_bytes` bounds the request line and headers (431 beyond, with h11 as the
    parser), `client_timeout_s` the time to send them; `max_connections` the open connections
    (uvicorn's `limit_concurrency`: past it uvicorn answers a plain 503 itself, so an app with its
    own in-flight limit sets this higher). With `tls`, a PEM certificate (chain) file and its key
    file, it serves HTTPS only."""

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        name: str,
        max_header_bytes: int | None = None,
        client_timeout_s: float | None = None,
        max_connections: int | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        limits: dict[str, Any] = {"limit_concurrency": max_connections}
        if max_header_bytes is not None or client_timeout_s is not None:
            protocol: type[ProblemH11Protocol] = ProblemH11Protocol
            if client_timeout_s is not None:
                protocol = type(
                    "ClientTimeout", (ClientTimeoutH11Protocol,), {"client_timeout_s": client_timeout_s}
                )
            limits.update(http=protocol, h11_max_incomplete_event_size=max_header_bytes)
        # No proxy headers: uvicorn would otherwise take X-Forwarded-For from loopback peers for the
        # client's address, which any local client can write. No trusted-proxy setting exists, so
        # the address (in the audit log, say) is always the connection's peer.
        certificate, key = tls if tls is not None else (None, None)
        if tls is not None:
            check_tls_files(*tls)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            proxy_headers=False,
            ssl_certfile=certificate,
            ssl_keyfile=key,
            **limits,
        )
        self._server = uvicorn.Server(config)
        self._host, self._port, self._name = host, port, name
        self._scheme = "https" if tls is not None else "http"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name=f"{self._name}-http")
        while not self._server.started:
            if self._task.done():
                await self.stop()
                raise ServiceUnavailableError(
                    f"{self._name} could not listen on {self._host}:{self._port} (see the log above)"
                )
            await asyncio.sleep(0.05)
        log.info("%s listening on %s://%s:%d", self._name, self._scheme, self._host, self._port)

    async def _serve(self) -> None:
        # uvicorn exits the process when it cannot bind; here that is a failed start instead.
        with contextlib.suppress(SystemExit):
            await self._server.serve()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait(self) -> None:
        """Until the server ends by itself; cancelling this wait does not stop the server."""
        if self._task is not None:
            await asyncio.wait([self._task])
