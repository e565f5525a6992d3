"""Throughput of the embedded MQTT broker for a QoS 1 burst.

    .venv/bin/python -m benchmarks.embedded_mqtt [--messages 100000] [--publishers 1]
        [--protocol 5|3.1.1] [--payload-bytes 120] [--against mqtt://127.0.0.1:1883]

Starts the embedded broker in this process, then one subscriber process and `--publishers`
publisher processes (paho-mqtt, QoS 1). Prints one JSON object: the rate at which the broker
acknowledged the publications, the rate at which the subscriber received them (first publish to
last delivery), whether every message arrived exactly once and in order per publisher, and the
broker's CPU time per message (on a small machine the paho clients, not the broker, set the
rate). `--against` runs the same clients against another broker instead, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import threading
import time
import uuid
from multiprocessing.synchronize import Event
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ioc.embedded.mqtt_broker import EmbeddedBroker

_PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


def _client(name: str, protocol: MQTTProtocolVersion) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol=protocol
    )


def subscribe(
    host: str,
    port: int,
    topic: str,
    protocol: MQTTProtocolVersion,
    expected: int,
    ready: Event,
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    client = _client("bench-sub", protocol)
    lock = threading.Lock()
    done = threading.Event()
    last_seq: dict[int, int] = collections.defaultdict(lambda: -1)
    state = {"received": 0, "duplicates": 0, "out_of_order": 0, "first": 0.0, "last": 0.0}
    seen: set[tuple[int, int]] = set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        publisher, seq = (int(x) for x in bytes(message.payload[:24]).split(b":", 2)[:2])
        with lock:
            now = time.monotonic()
            if not state["received"]:
                state["first"] = now
            state["last"] = now
            if (publisher, seq) in seen:
                state["duplicates"] += 1
                return
            seen.add((publisher, seq))
            if seq < last_seq[publisher]:
                state["out_of_order"] += 1
            last_seq[publisher] = seq
            state["received"] += 1
            if state["received"] >= expected:
                done.set()

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        ready.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(host, port, 60)
    client.subscribe(topic, qos=1)
    client.loop_start()
    done.wait(600)
    time.sleep(0.5)  # anything after the last expected message would be a copy
    client.disconnect()
    client.loop_stop()
    with lock:
        results.put({"role": "subscriber", **state})


def publish(
    host: str,
    port: int,
    topic: str,
    protocol: MQTTProtocolVersion,
    index: int,
    count: int,
    payload_bytes: int,
    go: Event,
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    client = _client(f"bench-pub{index}", protocol)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, 60)
    client.loop_start()
    padding = b"x" * max(0, payload_bytes - 24)
    go.wait()
    started = time.monotonic()
    infos: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
    for seq in range(count):
        # paho numbers messages with 16 bits: never have more than a fraction of that outstanding.
        while len(infos) >= 20_000:
            infos.popleft().wait_for_publish(120)
        infos.append(client.publish(f"{topic}/{index}", b"%d:%d:" % (index, seq) + padding, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    finished = time.monotonic()
    client.disconnect()
    client.loop_stop()
    results.put({"role": "publisher", "started": started, "finished": finished})


def run(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    ready, go = context.Event(), context.Event()
    protocol = _PROTOCOLS[args.protocol]
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    per_publisher = [args.messages // args.publishers] * args.publishers
    per_publisher[0] += args.messages - sum(per_publisher)
    subscriber = context.Process(
        target=subscribe, args=(host, port, f"{topic}/#", protocol, args.messages, ready, results)
    )
    subscriber.start()
    if not ready.wait(30):
        raise SystemExit("the subscriber did not subscribe within 30 s")
    publishers = [
        context.Process(
            target=publish,
            args=(host, port, topic, protocol, index, count, args.payload_bytes, go, results),
        )
        for index, count in enumerate(per_publisher)
    ]
    for process in publishers:
        process.start()
    time.sleep(1.0)  # every publisher connected
    go.set()
    reports = [results.get(timeout=900) for _ in range(args.publishers + 1)]
    for process in [subscriber, *publishers]:
        process.join(30)
    received = next(r for r in reports if r["role"] == "subscriber")
    published = [r for r in reports if r["role"] == "publisher"]
    started = min(r["started"] for r in published)
    publish_s = max(r["finished"] for r in published) - started
    deliver_s = received["last"] - started
    return {
        "messages": args.messages,
        "publishers": args.publishers,
        "protocol": args.protocol,
        "payload_bytes": args.payload_bytes,
        "publish_s": round(publish_s, 3),
        "publish_msg_per_s": round(args.messages / publish_s),
        "deliver_s": round(deliver_s, 3),
        "deliver_msg_per_s": round(received["received"] / deliver_s),
        "received": received["received"],
        "lost": args.messages - received["received"],
        "duplicates": received["duplicates"],
        "out_of_order": received["out_of_order"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes")
    parser.add_argument("--protocol", choices=sorted(_PROTOCOLS), default="5")
    parser.add_argument("--payload-bytes", type=int, default=120, help="size of each payload")
    parser.add_argument("--against", metavar="URL", help="measure this broker instead of the embedded one")
    args = parser.parse_args()
    if args.messages < 1 or args.publishers < 1:
        parser.error("--messages and --publishers must be positive")

    if args.against:
        parts = urlsplit(args.against)
        result = run(args, parts.hostname or "127.0.0.1", parts.port or 1883)
        result["broker"] = args.against
    else:
        loop = asyncio.new_event_loop()
        broker = EmbeddedBroker("127.0.0.1", 0)
        thread = threading.Thread(target=loop.run_forever, name="broker", daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result(10)
        try:
            # This process only runs the broker (the clients are other processes): its CPU time is
            # the broker's cost, and its inverse the rate one core could sustain.
            cpu_before = time.process_time()
            result = run(args, "127.0.0.1", broker.port)
            cpu_s = time.process_time() - cpu_before
            result["broker_cpu_s"] = round(cpu_s, 3)
            result["broker_cpu_us_per_msg"] = round(cpu_s / args.messages * 1e6, 1)
            result["broker_msg_per_cpu_s"] = round(args.messages / cpu_s)
        finally:
            asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        result["broker"] = "embedded"
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
