"""Load mode: N devices' telemetry at a steady R messages a second, for measuring the pipeline.

Connections are few on purpose: each worker process carries its share of the devices over one
MQTT connection (QoS 1, a `seq` per device, real timestamps), without wills or status messages;
one connection per device is what scenario mode is for. A worker writes each message to the socket
as it publishes it and reads the broker's acknowledgements between batches, in one thread, so one
core does nothing but build and send messages; past what one core sustains, `processes` workers
split the devices and the rate between them.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import MqttEndpoint
from simulators.fleet import SimulatedDevice, build_fleet
from simulators.progress import Progress
from simulators.wire import WirePublisher, encode_topic

log = logging.getLogger(__name__)

# What one worker sustains on one core against a local Mosquitto, rounded down (see the README).
RATE_PER_PROCESS = 80_000
# Messages published before the worker looks at its socket and the clock again.
_BATCH = 1000
_READY_WITHIN_S = 60.0
_DRAIN_WITHIN_S = 30.0
_COUNTERS_EVERY_S = 0.1


@dataclass(frozen=True)
class LoadPlan:
    endpoint: MqttEndpoint
    city: str
    places: str | None
    devices: int
    rate: float
    duration: float
    processes: int
    seed: int
    run: str


@dataclass
class LoadSummary:
    sent: int
    acknowledged: int
    seconds: float
    processes: int
    devices: int
    target_rate: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "target_rate": self.target_rate,
            # Within 1 % of the target: the shortfall of a run's last batch is not a failure to keep up.
            "sustained": self.rate >= 0.99 * self.target_rate,
            "processes": self.processes,
            "connections": self.processes,
            "devices": self.devices,
        }


def default_processes(rate: float) -> int:
    return max(1, min(os.cpu_count() or 1, math.ceil(rate / RATE_PER_PROCESS)))


def run_load(
    endpoint: MqttEndpoint,
    *,
    city: str,
    devices: int,
    rate: float,
    duration: float,
    places: str | None = None,
    processes: int | None = None,
    seed: int = 7,
    on_progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> LoadSummary:
    """Publish for `duration` seconds at `rate` messages a second in total, or until `stop` is set
    (blocking)."""
    workers = processes or default_processes(rate)
    workers = min(workers, devices)
    plan = LoadPlan(endpoint, city, places, devices, rate, duration, workers, seed, uuid.uuid4().hex[:6])
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", 2 * workers, lock=False)
    reports: multiprocessing.Queue[tuple[Any, ...]] = context.Queue()
    go, halt = context.Event(), context.Event()
    processes_ = [
        context.Process(
            target=_publish_share,
            args=(index, plan, counters, reports, go, halt),
            name=f"ioc-load-{index}",
            daemon=True,
        )
        for index in range(workers)
    ]
    for process in processes_:
        process.start()
    try:
        _wait_until_ready(reports, processes_)
        go.set()
        results = _collect_results(reports, processes_, counters, halt, stop, on_progress)
    finally:
        go.set()
        for process in processes_:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    return LoadSummary(
        sent=sum(r[0] for r in results.values()),
        acknowledged=sum(r[1] for r in results.values()),
        seconds=max(r[2] for r in results.values()),
        processes=workers,
        devices=devices,
        target_rate=rate,
    )


def _collect_results(
    reports: multiprocessing.Queue[tuple[Any, ...]],
    processes: Sequence[multiprocessing.process.BaseProcess],
    counters: Any,
    halt: Any,
    stop: threading.Event | None,
    on_progress: Progress | None,
) -> dict[int, tuple[int, int, float]]:
    """Wait for every worker's final report (sent, acknowledged, seconds), passing on progress."""
    workers = len(processes)
    started = time.monotonic()
    results: dict[int, tuple[int, int, float]] = {}
    while len(results) < workers:
        if stop is not None and stop.is_set():
            halt.set()
        try:
            report = reports.get(timeout=0.25)
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                raise ServiceUnavailableError("load workers ended without reporting") from None
        else:
            if report[0] == "error":
                raise ServiceUnavailableError(str(report[2]))
            if report[0] == "done":
                results[report[1]] = (report[2], report[3], report[4])
        if on_progress is not None:
            sent = sum(counters[2 * i] for i in range(workers))
            acknowledged = sum(counters[2 * i + 1] for i in range(workers))
            on_progress(sent, acknowledged, time.monotonic() - started)
    return results


def _wait_until_ready(
    reports: multiprocessing.Queue[tuple[Any, ...]], processes: Sequence[multiprocessing.process.BaseProcess]
) -> None:
    ready = 0
    deadline = time.monotonic() + _READY_WITHIN_S
    while ready < len(processes):
        try:
            report = reports.get(timeout=0.25)
        except queue.Empty:
            if time.monotonic() > deadline or not all(process.is_alive() for process in processes):
                raise ServiceUnavailableError(
                    f"only {ready} of {len(processes)} load workers were connected and ready"
                ) from None
            continue
        if report[0] == "error":
            raise ServiceUnavailableError(str(report[2]))
        ready += report[0] == "ready"


class _Sender:
    """A device in load mode: its topic ready for the wire, and its metrics measured at most once a
    second (they change over minutes), each message still with its own `ts` and `seq`."""

    __slots__ = ("device", "measured_at", "metrics_json", "topic")

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.topic = encode_topic(device.topic)
        self.measured_at = -1
        self.metrics_json = ""

    def payload(self, at: datetime, second: int) -> bytes:
        device = self.device
        if second != self.measured_at:
            self.measured_at = second
            self.metrics_json = json.dumps(device.sample(at), separators=(",", ":"))[1:]
        device.seq += 1
        return f'{{"ts":"{at.isoformat()}","seq":{device.seq},{self.metrics_json}'.encode()


def _publish_share(
    index: int,
    plan: LoadPlan,
    counters: SynchronizedArray[int],
    reports: multiprocessing.Queue[tuple[Any, ...]],
    go: Any,
    halt: Any,
) -> None:
    """One worker: its devices (every `processes`-th of the fleet) at its share of the rate."""
    # Ctrl-C reaches every process of the terminal; the parent decides when the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fleet = build_fleet(plan.city, plan.devices, places=plan.places, seed=plan.seed)
    senders = [_Sender(device) for device in fleet[index :: plan.processes]]
    rate = plan.rate / plan.processes
    publisher = WirePublisher(plan.endpoint, f"ioc-load-{plan.run}-{index}")
    try:
        publisher.connect()
    except ServiceUnavailableError as exc:
        reports.put(("error", index, str(exc)))
        return
    reports.put(("ready", index))
    go.wait()
    try:
        sent, seconds = _publish_at_rate(publisher, senders, rate, plan.duration, counters, index, halt)
        deadline = time.monotonic() + _DRAIN_WITHIN_S
        while publisher.acknowledged < sent and time.monotonic() < deadline:
            publisher.read_acks(wait_s=0.05)
    except (OSError, ServiceUnavailableError) as exc:
        reports.put(("error", index, f"load worker {index}: {exc}"))
        return
    finally:
        publisher.close()
    counters[2 * index], counters[2 * index + 1] = publisher.sent, publisher.acknowledged
    reports.put(("done", index, publisher.sent, publisher.acknowledged, seconds))


def _publish_at_rate(
    publisher: WirePublisher,
    senders: list[_Sender],
    rate: float,
    duration: float,
    counters: SynchronizedArray[int],
    index: int,
    halt: Any,
) -> tuple[int, float]:
    total = int(rate * duration)
    sent = 0
    started = time.monotonic()
    next_counters = started
    while sent < total:
        now = time.monotonic()
        elapsed = now - started
        if elapsed >= duration:
            break
        due = min(int(elapsed * rate) + 1, total)
        if sent < due:
            end = min(due, sent + _BATCH)
            at = datetime.now(UTC)
            second = int(now)
            batch = []
            for k in range(sent, end):
                sender = senders[k % len(senders)]
                # One clock reading per batch; a microsecond apart, a device's readings never share a ts.
                batch.append((sender.topic, sender.payload(at + timedelta(microseconds=k - sent), second)))
            publisher.publish_batch(batch)
            sent = end
            publisher.read_acks()
        else:
            publisher.read_acks(wait_s=min(0.005, due / rate - elapsed))
        if now >= next_counters:
            next_counters = now + _COUNTERS_EVERY_S
            counters[2 * index], counters[2 * index + 1] = publisher.sent, publisher.acknowledged
            if halt.is_set():
                break
    return sent, time.monotonic() - started
