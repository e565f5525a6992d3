"""What the embedded broker keeps for its clients, connected or not: sessions with their
in-flight window and queue, subscriptions, shared-subscription groups, and the topic tree that
matches a topic to the subscriptions that want it.

Queues here hold publishers back (rather than dropping QoS 1 messages) through the connections
waiting on them; see the package documentation for the flow control this implements.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Generic, TypeVar

from ioc.embedded.mqtt_broker.protocol import Message

if TYPE_CHECKING:
    from ioc.embedded.mqtt_broker.connection import Connection
    from ioc.embedded.mqtt_broker.server import EmbeddedBroker

log = logging.getLogger(__name__)


class Delivery:
    """A message on its way to one session, with the QoS and retain flag of that copy."""

    __slots__ = ("group", "message", "qos", "retain")

    def __init__(self, message: Message, qos: int, retain: bool, group: SharedGroup | None) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.group = group


_Item = TypeVar("_Item")


class Queue(Generic[_Item]):
    """A FIFO that holds back publishers, rather than dropping, once it reaches its limit."""

    __slots__ = ("items", "limit", "name", "waiters", "warned")

    def __init__(self, limit: int, name: str) -> None:
        self.items: collections.deque[_Item] = collections.deque()
        self.limit = limit
        self.name = name
        self.waiters: list[Connection] = []
        self.warned = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limit

    def append(self, item: _Item) -> None:
        self.items.append(item)
        if not self.warned and len(self.items) >= self.limit:
            self.warned = True
            log.warning(
                "MQTT queue of %s reached %d messages; holding its publishers until it drains",
                self.name,
                self.limit,
            )

    def appendleft(self, item: _Item) -> None:
        self.items.appendleft(item)

    def popleft(self) -> _Item:
        item = self.items.popleft()
        if self.waiters and len(self.items) < self.limit:
            self._release()
        return item

    def clear(self) -> list[_Item]:
        items = list(self.items)
        self.items.clear()
        self._release()
        return items

    def _release(self) -> None:
        if len(self.items) < self.limit // 2:
            self.warned = False
        waiters, self.waiters = self.waiters, []
        for connection in waiters:
            connection.queue_has_room(self)


class Subscription:
    __slots__ = ("group", "no_local", "qos", "retain_as_published", "session", "text")

    def __init__(
        self,
        session: Session,
        text: str,
        qos: int,
        *,
        no_local: bool,
        retain_as_published: bool,
        group: SharedGroup | None,
    ) -> None:
        self.session = session
        self.text = text
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.group = group


class SharedGroup:
    """The members of one `$share/{group}/{filter}`; each message goes to one of them."""

    def __init__(self, broker: EmbeddedBroker, name: str, topic_filter: str) -> None:
        self.broker = broker
        self.name = name
        self.filter = topic_filter
        self.members: dict[Session, Subscription] = {}
        self.order: list[Session] = []
        self.cursor = 0
        self.pending: Queue[Message] = Queue(broker.max_queued_per_session, f"$share/{name}/{topic_filter}")

    def add(self, subscription: Subscription) -> None:
        if subscription.session not in self.members:
            self.order.append(subscription.session)
        self.members[subscription.session] = subscription

    def remove(self, session: Session) -> None:
        if self.members.pop(session, None) is not None:
            self.order.remove(session)

    def dispatch(self, message: Message) -> Queue[Message] | None:
        """Hand a new message to a member with room, else queue it; returns the queue when it is
        full and the publisher should be held."""
        if not self.pending:
            count = len(self.order)
            for step in range(count):
                session = self.order[(self.cursor + step) % count]
                subscription = self.members[session]
                qos = min(message.qos, subscription.qos)
                if session.has_room(qos):
                    self.cursor = (self.cursor + step + 1) % count
                    session.send(
                        Delivery(message, qos, message.retain and subscription.retain_as_published, self)
                    )
                    return None
        if message.qos == 0 and (self.pending.full or not any(s.connection for s in self.order)):
            self.broker.stats.count_drop("qos0_queue_full_or_offline")
            return None
        self.pending.append(message)
        return self.pending if self.pending.full and message.qos else None

    def feed(self, session: Session) -> None:
        """Give a member with room the messages waiting in the group."""
        subscription = self.members.get(session)
        if subscription is None:
            return
        while self.pending and session.has_room(min(self.pending.items[0].qos, subscription.qos)):
            message = self.pending.popleft()
            qos = min(message.qos, subscription.qos)
            session.send(Delivery(message, qos, message.retain and subscription.retain_as_published, self))

    def feed_all(self) -> None:
        for session in list(self.order):
            if not self.pending:
                return
            if session.connection is not None:
                self.feed(session)


class Session:
    """What the broker keeps for one client id, connected or not."""

    def __init__(self, broker: EmbeddedBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.connection: Connection | None = None
        self.expiry_s: float = 0.0
        self.subscriptions: dict[str, Subscription] = {}
        # The shared groups among those subscriptions, looked at after every acknowledgement.
        self.groups: list[SharedGroup] = []
        self.queue: Queue[Delivery] = Queue(broker.max_queued_per_session, f"client {client_id!r}")
        # Packet id -> delivery, in the order sent, which is the order resent.
        self.inflight: dict[int, Delivery] = {}
        # QoS 2 packet ids taken from the client and not yet released by its PUBREL.
        self.awaiting_release: set[int] = set()
        self.next_packet_id = 1
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.pending_will: Message | None = None
        self.will_expiry_s: int | None = None
        self.will_timer: asyncio.TimerHandle | None = None

    def has_room(self, qos: int) -> bool:
        connection = self.connection
        if connection is None or connection.writing_paused or connection.closed:
            return False
        return qos == 0 or len(self.inflight) < connection.receive_maximum

    def deliver(self, delivery: Delivery) -> Queue[Delivery] | None:
        """Send now or queue; returns the queue when it is full and the publisher should be held."""
        if not self.queue and self.has_room(delivery.qos):
            self.send(delivery)
            return None
        if delivery.qos == 0 and (self.connection is None or self.queue.full):
            self.broker.stats.count_drop("qos0_queue_full_or_offline")
            return None
        self.queue.append(delivery)
        return self.queue if self.queue.full and delivery.qos else None

    def send(self, delivery: Delivery) -> None:
        connection = self.connection
        assert connection is not None
        now = time.monotonic()
        message = delivery.message
        if message.expired(now):
            self.broker.stats.count_drop("expired")
            return
        packet_id = 0
        if delivery.qos:
            packet_id = self._allocate_packet_id()
        packet = message.encode(
            delivery.qos, packet_id, dup=False, retain=delivery.retain, v5=connection.v5, now=now
        )
        if len(packet) > connection.max_outgoing_packet:
            # MQTT 5 says to discard what the client declared it cannot take, as if delivered.
            self.broker.stats.count_drop("too_large_for_client")
            log.warning(
                "dropped a %d-byte message on %s for client %r, whose maximum packet size is %d",
                len(packet),
                message.topic,
                self.client_id,
                connection.max_outgoing_packet,
            )
            return
        if delivery.qos:
            self.inflight[packet_id] = delivery
        self.broker.stats.messages_sent += 1
        connection.write(packet)

    def resend_inflight(self) -> None:
        connection = self.connection
        assert connection is not None
        now = time.monotonic()
        for packet_id, delivery in self.inflight.items():
            connection.write(
                delivery.message.encode(
                    delivery.qos, packet_id, dup=True, retain=delivery.retain, v5=connection.v5, now=now
                )
            )

    def pump(self) -> None:
        """Send what waits for this session, as far as its window allows."""
        queue = self.queue
        while queue and self.has_room(queue.items[0].qos):
            self.send(queue.popleft())
        if not queue:
            for group in self.groups:
                if group.pending:
                    group.feed(self)

    def _allocate_packet_id(self) -> int:
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 0xFFFF + 1
        self.next_packet_id = packet_id % 0xFFFF + 1
        return packet_id

    def undelivered(self) -> int:
        queued = sum(1 for delivery in self.queue.items if delivery.qos)
        return queued + len(self.inflight)


class _Node:
    __slots__ = ("children", "groups", "subscriptions")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscriptions: dict[Session, Subscription] = {}
        self.groups: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not (self.children or self.subscriptions or self.groups)


class TopicTree:
    """Subscriptions by topic filter level, so matching costs the depth of the topic, not the
    number of subscriptions."""

    def __init__(self) -> None:
        self.root = _Node()

    def node(self, topic_filter: str) -> _Node:
        node = self.root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        return node

    def find(self, topic_filter: str) -> _Node | None:
        node: _Node | None = self.root
        for level in topic_filter.split("/"):
            assert node is not None
            node = node.children.get(level)
            if node is None:
                return None
        return node

    def prune(self, topic_filter: str) -> None:
        path = [self.root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        for depth in range(len(levels), 0, -1):
            if not path[depth].empty():
                return
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> list[_Node]:
        found: list[_Node] = []
        self._match(self.root, topic.split("/"), 0, found, topic.startswith("$"))
        return found

    def _match(self, node: _Node, levels: list[str], index: int, found: list[_Node], dollar: bool) -> None:
        wildcards = not (dollar and index == 0)
        if wildcards:
            rest = node.children.get("#")
            if rest is not None:
                found.append(rest)
        if index == len(levels):
            found.append(node)
            return
        child = node.children.get(levels[index])
        if child is not None:
            self._match(child, levels, index + 1, found, dollar)
        if wildcards:
            plus = node.children.get("+")
            if plus is not None:
                self._match(plus, levels, index + 1, found, dollar)
