"""An MQTT broker inside our own event loop, so that `ioc up` runs without Mosquitto.

It speaks MQTT 3.1.1 and 5.0 on one listener and implements what the gateway, the simulator and
field devices use, with the delivery guarantees the pipeline depends on:

- QoS 0 and 1 end to end. QoS 2 publishers are served the full PUBREC/PUBREL/PUBCOMP handshake
  (a resent QoS 2 PUBLISH is recognised by its packet id and not routed twice), but subscribers
  receive at most QoS 1: a SUBSCRIBE asking for QoS 2 is granted QoS 1.
- Wildcards (`+`, `#`; `$`-topics are not matched by a wildcard in the first level), shared
  subscriptions `$share/{group}/{filter}`, retained messages (an empty payload clears one), last
  wills (MQTT 5 will delay honoured), keep-alive (silent for 1.5 times it: closed, will sent),
  session takeover, persistent sessions (3.1.1 `clean_session=0`: kept until a clean connect;
  5.0 `clean_start` and Session Expiry Interval, which DISCONNECT may change; either ends after
  `max_session_expiry_s`, a day by default, without its client) with messages queued while the
  client is away and unacknowledged QoS 1 messages resent with DUP on reconnect.
- MQTT 5: Receive Maximum, Maximum Packet Size (both ways), message expiry, no-local,
  retain-as-published, retain handling, user properties and the other publish properties passed
  on, reason codes on DISCONNECT. Not offered: topic aliases (Topic Alias Maximum is 0, so a
  client alias is a protocol error), subscription identifiers (announced unavailable), enhanced
  authentication, response information.

Flow control. A connection's packets are handled one at a time, and its socket is read only when
the event loop gets to it, so a publisher the broker cannot keep up with is held back by TCP.
Towards a subscriber at most Receive Maximum QoS 1 messages are unacknowledged at once
(`max_inflight_v311` for 3.1.1 clients, which cannot say), and nothing is written while its socket
buffer is full. Messages beyond that wait in the session's queue (or, for a shared subscription, in
the group's queue, from which whichever member has room takes the next one). A queue never drops a
QoS 1 message: when it reaches `max_queued_per_session`, each publisher whose message it took is
held -- its PUBACK is withheld and its connection not read -- until the queue has room again; the
first time, a warning names the queue. (A publisher is not held for its own session's queue, nor
for a group it is a member of, which would deadlock it.) QoS 0 messages to a full queue are dropped
and counted.

A shared-subscription message that a member took and had not acknowledged when its connection
dropped goes back to its group, in front, for another connected member; with none connected it
stays with the member's session, to be resent (DUP) when the member returns, or handed to the
group when that session ends. Such a message may be delivered twice; one that a member
acknowledged never is. Which member takes a new message: the next one, in turn, that has room.

Limits. Packets over `max_packet_size` (1 MiB by default; `ioc up` sets 128 KiB, as the compose
broker's `max_packet_size`), malformed packets, topics with wildcards, invalid UTF-8 or NUL, and
protocol violations close that connection with a warning in the log (and a DISCONNECT with a
reason code for MQTT 5 clients); nothing a client sends stops the broker. A packet is judged by
its length before its body is read, so no client makes the broker buffer more than the limit.
Messages on topics matching an `unretained` filter are routed but never kept as retained.

State lives in memory only: sessions, queues and retained messages do not outlive the process.
`stop()` first stops accepting connections and publications and gives connected subscribers up to
`drain_timeout_s` to take what is queued for them, then logs a warning with the number of QoS 1
messages still undelivered.

There is no authentication and no TLS: this is a development broker for one machine. It binds
127.0.0.1 by default and must not be exposed to a network; it warns when asked to bind anything
else. The one exception: a client id in `protected_clients` (the gateway's, in `ioc up`) can only
be taken with its password; any other connection claiming it is refused ("not authorized") before
it touches that id's session, so nobody can take the gateway's session over or close its
connection by connecting with its id.

Modules: `protocol` (the wire format: packets, properties, reason codes, topic rules), `session`
(sessions, their queues and in-flight windows, subscriptions, shared groups, the topic tree),
`connection` (one client's socket and the handling of its packets) and `server` (the
`EmbeddedBroker` Component: listener, session registry, routing, keep-alive sweep, metrics).
"""

from ioc.embedded.mqtt_broker.server import (
    DEFAULT_MAX_INFLIGHT_V311,
    DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MAX_QUEUED_PER_SESSION,
    DEFAULT_MAX_SESSION_EXPIRY_S,
    BrokerStats,
    EmbeddedBroker,
)

__all__ = [
    "DEFAULT_MAX_INFLIGHT_V311",
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MAX_QUEUED_PER_SESSION",
    "DEFAULT_MAX_SESSION_EXPIRY_S",
    "BrokerStats",
    "EmbeddedBroker",
]
