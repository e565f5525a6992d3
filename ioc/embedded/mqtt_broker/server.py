"""The embedded broker itself: the `EmbeddedBroker` Component with its listener, the session
registry (attach, detach, expiry, wills), subscriptions, routing of published messages, the
keep-alive sweep, draining on stop and the `/metrics` counters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ioc.embedded.mqtt_broker.connection import Connection
from ioc.embedded.mqtt_broker.protocol import (
    KEEPALIVE_TIMEOUT,
    SHUTTING_DOWN,
    TAKEN_OVER,
    Message,
    filter_matches,
)
from ioc.embedded.mqtt_broker.session import Delivery, Queue, Session, SharedGroup, Subscription, TopicTree
from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError
from ioc_core.metrics import Metric

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED_PER_SESSION = 1_000_000
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
DEFAULT_MAX_INFLIGHT_V311 = 100
# Persistent sessions (an MQTT 3.1.1 one, or an MQTT 5 one asking for "never") end after a day
# without their client.
DEFAULT_MAX_SESSION_EXPIRY_S = 86_400.0
_CONNECT_TIMEOUT_S = 10.0
_SWEEP_INTERVAL_S = 0.5


class BrokerStats:
    """Counters for logs, tests and `/metrics`."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.messages_acked = 0
        self.publishers_held = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.connections_refused: collections.Counter[str] = collections.Counter()

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] += 1


class EmbeddedBroker(Component):
    """An MQTT 3.1.1/5.0 broker in the running event loop. See the package documentation."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        max_queued_per_session: int = DEFAULT_MAX_QUEUED_PER_SESSION,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_inflight_v311: int = DEFAULT_MAX_INFLIGHT_V311,
        drain_timeout_s: float = 5.0,
        max_session_expiry_s: float = DEFAULT_MAX_SESSION_EXPIRY_S,
        protected_clients: Mapping[str, str] | None = None,
        unretained: Iterable[str] = (),
    ) -> None:
        if max_session_expiry_s <= 0:
            raise ValueError("the longest session expiry must be positive")
        if max_queued_per_session < 1 or max_inflight_v311 < 1 or not 2 <= max_packet_size <= 268_435_460:
            raise ValueError("queue and in-flight limits must be positive; packet size 2 B to 256 MiB")
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.max_queued_per_session = max_queued_per_session
        self.max_packet_size = max_packet_size
        # Client id -> the password a connection must give to take it; every other id is open.
        self._protected = {
            client: password.encode() for client, password in (protected_clients or {}).items()
        }
        # Topic filters whose messages are routed but never kept as retained.
        self._unretained = [text.split("/") for text in unretained]
        self.max_inflight_v311 = max_inflight_v311
        self.drain_timeout_s = drain_timeout_s
        self.max_session_expiry_s = max_session_expiry_s
        self.stats = BrokerStats()
        self.connections: set[Connection] = set()
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, Message] = {}
        self.draining = False
        # Set on every acknowledgement and disconnection while draining, to re-check what is left.
        self.progress = asyncio.Event()
        self._tree = TopicTree()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the broker is not started"
        return self._loop

    @property
    def port(self) -> int:
        """The port listened on (the one picked by the system when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError("the embedded MQTT broker has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.draining = False
        try:
            self._server = await self._loop.create_server(
                lambda: Connection(self), self.host, self._requested_port
            )
        except OSError as exc:
            raise ServiceUnavailableError(
                f"the embedded MQTT broker cannot listen on {self.host}:{self._requested_port}"
                f" ({exc.strerror or exc}); is another broker running there? Stop it, or set"
                " IOC_MQTT_URL to use it instead"
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep(), name="mqtt-broker-keepalive")
        log.info("embedded MQTT broker listening on %s (MQTT 3.1.1 and 5, no authentication)", self.url)
        if not _is_loopback(self.host):
            log.warning(
                "the embedded MQTT broker listens on %s without authentication or TLS; it is meant for"
                " one machine and must not be reachable from a network",
                self.host,
            )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.draining = True
        deadline = time.monotonic() + self.drain_timeout_s
        while self._deliverable() and (remaining := deadline - time.monotonic()) > 0:
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)
        undelivered = sum(session.undelivered() for session in self.sessions.values())
        undelivered += sum(sum(1 for m in group.pending.items if m.qos) for group in self._groups())
        if undelivered:
            log.warning(
                "embedded MQTT broker stopping with %d QoS 1 messages not delivered to their subscribers;"
                " they are lost with it",
                undelivered,
            )
        for connection in list(self.connections):
            connection.terminate(will=False, reason_code=SHUTTING_DOWN)
        for session in self.sessions.values():
            for timer in (session.expiry_timer, session.will_timer):
                if timer is not None:
                    timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await server.wait_closed()
        self.sessions.clear()
        self.retained.clear()
        self._tree = TopicTree()
        log.info("embedded MQTT broker on port %d stopped", self._port)

    def metrics(self) -> list[Metric]:
        stats = self.stats
        dropped = Metric("ioc_mqtt_broker_dropped_total", "counter", "messages not delivered, by reason")
        for reason, count in sorted(stats.dropped.items()):
            dropped.add(count, reason=reason)
        refused = Metric(
            "ioc_mqtt_broker_connections_refused_total", "counter", "CONNECTs refused, by reason"
        )
        for reason, count in sorted(stats.connections_refused.items()):
            refused.add(count, reason=reason)
        queued = sum(len(s.queue) for s in self.sessions.values()) + sum(
            len(g.pending) for g in self._groups()
        )
        return [
            Metric("ioc_mqtt_broker_connections", "gauge", "open client connections").add(
                len(self.connections)
            ),
            Metric("ioc_mqtt_broker_sessions", "gauge", "sessions, connected or kept").add(
                len(self.sessions)
            ),
            Metric("ioc_mqtt_broker_received_total", "counter", "messages published to the broker").add(
                stats.messages_received
            ),
            Metric("ioc_mqtt_broker_sent_total", "counter", "message copies sent to subscribers").add(
                stats.messages_sent
            ),
            Metric("ioc_mqtt_broker_queued", "gauge", "messages waiting for a subscriber").add(queued),
            Metric("ioc_mqtt_broker_publishers_held_total", "counter", "times a publisher waited").add(
                stats.publishers_held
            ),
            dropped,
            refused,
        ]

    # -- sessions ----------------------------------------------------------------------------

    def may_take(self, client_id: str, password: bytes | None) -> bool:
        """Whether a connection may take this client id: a protected one only with its password,
        so that nobody connecting with the gateway's id takes its session over."""
        expected = self._protected.get(client_id)
        return expected is None or (password is not None and hmac.compare_digest(password, expected))

    def attach(
        self, connection: Connection, client_id: str, *, clean: bool, expiry_s: float
    ) -> tuple[Session, bool]:
        """Bind a connection to its session, taking over from an older connection; returns the
        session and whether it existed before."""
        self.stats.connections_total += 1
        existing = self.sessions.get(client_id)
        if existing is not None:
            if existing.connection is not None:
                log.debug("MQTT client %s connected again; closing its older connection", client_id)
                existing.connection.terminate(will=True, reason_code=TAKEN_OVER, reason="session taken over")
            # A new connection cancels a will still waiting for its delay.
            if existing.will_timer is not None:
                existing.will_timer.cancel()
                existing.will_timer = None
                existing.pending_will = None
            if existing.expiry_timer is not None:
                existing.expiry_timer.cancel()
                existing.expiry_timer = None
            existing = self.sessions.get(client_id)
        if clean and existing is not None:
            self.end_session(existing)
            existing = None
        session = existing or Session(self, client_id)
        session.connection = connection
        session.expiry_s = expiry_s
        connection.session = session
        self.sessions[client_id] = session
        return session, existing is not None

    def detach(self, connection: Connection, *, publish_will: bool) -> None:
        session = connection.session
        will = connection.will if publish_will else None
        connection.will = None
        if session is None or session.connection is not connection:
            return
        session.connection = None
        self.progress.set()
        self._return_shared(session, ending=False)
        if session.expiry_s == 0:
            self.end_session(session)
        else:
            # A persistent session nobody comes back for (an MQTT 3.1.1 one never expires by the
            # protocol) would queue its subscriptions' messages until it held every publisher up.
            expiry_s = min(session.expiry_s, self.max_session_expiry_s)
            session.expiry_timer = self.loop.call_later(expiry_s, self._expire, session)
        if will is not None:
            if connection.will_delay_s and self.sessions.get(session.client_id) is session:
                session.pending_will = will
                session.will_expiry_s = connection.will_expiry_s
                session.will_timer = self.loop.call_later(
                    connection.will_delay_s, self._publish_pending_will, session
                )
            else:
                self._publish_will(will, connection.will_expiry_s)

    def _return_shared(self, session: Session, *, ending: bool) -> None:
        """Give shared-subscription messages a session took and did not acknowledge back to their
        groups, in front: all of them when the session ends; when it only lost its connection,
        those of groups where another member is connected and can take them now. The others stay
        in flight, to be resent with the same packet ids when the session returns, so that an
        acknowledgement it sends late can never be taken for one of another message."""
        returned: list[tuple[int, Delivery]] = []
        for packet_id, delivery in session.inflight.items():
            group = delivery.group
            if group is not None and (
                ending or any(m.connection is not None for m in group.order if m is not session)
            ):
                returned.append((packet_id, delivery))
        groups: set[SharedGroup] = set()
        for packet_id, delivery in reversed(returned):
            del session.inflight[packet_id]
            assert delivery.group is not None
            delivery.group.pending.appendleft(delivery.message)
            groups.add(delivery.group)
        for group in groups:
            group.feed_all()

    def _publish_will(self, will: Message, expiry_s: int | None) -> None:
        # A will's message expiry counts from when it is published, not from the CONNECT.
        if expiry_s is not None:
            will.expires_at = time.monotonic() + expiry_s
        self.publish(will, publisher=None)

    def _publish_pending_will(self, session: Session) -> None:
        will, session.pending_will, session.will_timer = session.pending_will, None, None
        if will is not None:
            self._publish_will(will, session.will_expiry_s)

    def _expire(self, session: Session) -> None:
        session.expiry_timer = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.debug("MQTT session of %s expired", session.client_id)
            self.end_session(session)

    def end_session(self, session: Session) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if session.will_timer is not None:
            session.will_timer.cancel()
            self._publish_pending_will(session)
        # While it is still a member, so that a group it leaves empty counts them as lost.
        self._return_shared(session, ending=True)
        for text in list(session.subscriptions):
            self.unsubscribe(session, text)
        undelivered = session.undelivered()
        if undelivered:
            log.info(
                "MQTT session of %s ended with %d QoS 1 messages it had not taken",
                session.client_id,
                undelivered,
            )
            self.stats.dropped["session_ended"] += undelivered
        session.inflight.clear()
        session.queue.clear()

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(
        self,
        session: Session,
        text: str,
        group_name: str | None,
        topic_filter: str,
        qos: int,
        *,
        no_local: bool,
        retain_as_published: bool,
    ) -> bool:
        """Add or replace a subscription; returns whether it is new."""
        node = self._tree.node(topic_filter)
        group: SharedGroup | None = None
        if group_name is not None:
            group = node.groups.get(group_name)
            if group is None:
                group = node.groups[group_name] = SharedGroup(self, group_name, topic_filter)
        subscription = Subscription(
            session, text, qos, no_local=no_local, retain_as_published=retain_as_published, group=group
        )
        is_new = text not in session.subscriptions
        session.subscriptions[text] = subscription
        if group is not None:
            if group not in session.groups:
                session.groups.append(group)
            group.add(subscription)
            group.feed(session)
        else:
            node.subscriptions[session] = subscription
        return is_new

    def unsubscribe(self, session: Session, text: str) -> bool:
        subscription = session.subscriptions.pop(text, None)
        if subscription is None:
            return False
        group = subscription.group
        topic_filter = group.filter if group is not None else text
        node = self._tree.find(topic_filter)
        if group is not None and group in session.groups:
            session.groups.remove(group)
        if node is not None:
            if group is not None:
                group.remove(session)
                if not group.members:
                    del node.groups[group.name]
                    lost = sum(1 for message in group.pending.clear() if message.qos)
                    if lost:
                        log.warning(
                            "MQTT shared subscription $share/%s/%s lost its last member with %d messages"
                            " waiting; they are dropped",
                            group.name,
                            group.filter,
                            lost,
                        )
                        self.stats.dropped["shared_group_ended"] += lost
            else:
                node.subscriptions.pop(session, None)
            self._tree.prune(topic_filter)
        return True

    def send_retained(self, session: Session, topic_filter: str, granted: int) -> None:
        levels = topic_filter.split("/")
        now = time.monotonic()
        for topic, message in list(self.retained.items()):
            if message.expired(now):
                del self.retained[topic]
            elif filter_matches(levels, topic):
                session.deliver(Delivery(message, min(message.qos, granted), True, None))

    def _groups(self) -> Iterable[SharedGroup]:
        stack = [self._tree.root]
        while stack:
            node = stack.pop()
            yield from node.groups.values()
            stack.extend(node.children.values())

    # -- routing -----------------------------------------------------------------------------

    def publish(self, message: Message, *, publisher: Session | None) -> set[Queue[Any]]:
        """Route a message to every matching subscription; returns the queues that are full and
        on which the publisher should wait."""
        if message.retain and not any(filter_matches(levels, message.topic) for levels in self._unretained):
            if message.payload:
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)
        nodes = self._tree.match(message.topic)
        chosen: dict[Session, Subscription] = {}
        rap: set[Session] = set()
        for node in nodes:
            for session, subscription in node.subscriptions.items():
                if subscription.no_local and session is publisher:
                    continue
                current = chosen.get(session)
                if current is None or subscription.qos > current.qos:
                    chosen[session] = subscription
                if subscription.retain_as_published:
                    rap.add(session)
        full: set[Queue[Any]] = set()
        for session, subscription in chosen.items():
            delivery = Delivery(
                message, min(message.qos, subscription.qos), message.retain and session in rap, None
            )
            queue = session.deliver(delivery)
            if queue is not None and session is not publisher:
                full.add(queue)
        for node in nodes:
            for group in list(node.groups.values()):
                pending = group.dispatch(message)
                if pending is not None and (publisher is None or publisher not in group.members):
                    full.add(pending)
        return full

    # -- housekeeping ------------------------------------------------------------------------

    def _deliverable(self) -> bool:
        for session in self.sessions.values():
            if session.connection is not None and (session.inflight or session.queue):
                return True
        return any(
            group.pending and any(s.connection is not None for s in group.order) for group in self._groups()
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.closed or connection.held is not None:
                    continue  # a held publisher is silent because we stopped reading it
                if connection.session is None:
                    if now - connection.opened_at > _CONNECT_TIMEOUT_S:
                        log.debug("closing MQTT connection from %s: no CONNECT in time", connection.peer)
                        connection.terminate(will=False)
                elif connection.keepalive_s and now - connection.last_read > 1.5 * connection.keepalive_s:
                    log.debug(
                        "MQTT client %s silent for 1.5 times its keep-alive of %d s; closing",
                        connection.client_id,
                        connection.keepalive_s,
                    )
                    connection.terminate(
                        will=True, reason_code=KEEPALIVE_TIMEOUT, reason="keep-alive timeout"
                    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
