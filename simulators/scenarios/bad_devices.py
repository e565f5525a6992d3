"""`bad-devices`: a few devices misbehave once each, one sends a message twice, one a stale reading,
and one device's clock runs ahead all along."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ioc_core.alarms import OFFLINE_RULE
from ioc_core.domains import DOMAINS
from ioc_core.rules import rules_for
from ioc_core.telemetry import (
    MAX_PAYLOAD_BYTES,
    REASON_BAD_STATUS,
    REASON_BAD_TIMESTAMP,
    REASON_DEVICE_MISMATCH,
    REASON_FUTURE_TIMESTAMP,
    REASON_MALFORMED,
    REASON_NOT_FINITE,
    REASON_OUT_OF_RANGE,
    REASON_TOO_LARGE,
    REASON_UNKNOWN_DEVICE,
    REASON_UNKNOWN_METRIC,
    TOPIC_ROOT,
)
from simulators.fleet import SimulatedDevice
from simulators.scenarios.base import PIPELINE_ALLOWANCE_S, Scenario, Send
from simulators.truth import Incident

# Misbehaviours, each done once by one device, at this point of the run.
_ONCE = (
    ("malformed_payload", 0.15),
    ("out_of_range", 0.2),
    ("not_finite", 0.25),
    ("unknown_metric", 0.3),
    ("bad_timestamp", 0.35),
    ("future_timestamp", 0.4),
    ("payload_too_large", 0.45),
    ("device_mismatch", 0.5),
    ("unknown_device", 0.55),
    ("bad_status", 0.6),
    ("duplicate", 0.65),
    ("out_of_order", 0.7),
)
_REASONS = {
    "malformed_payload": REASON_MALFORMED,
    "out_of_range": REASON_OUT_OF_RANGE,
    "not_finite": REASON_NOT_FINITE,
    "unknown_metric": REASON_UNKNOWN_METRIC,
    "bad_timestamp": REASON_BAD_TIMESTAMP,
    "future_timestamp": REASON_FUTURE_TIMESTAMP,
    "payload_too_large": REASON_TOO_LARGE,
    "device_mismatch": REASON_DEVICE_MISMATCH,
    "unknown_device": REASON_UNKNOWN_DEVICE,
    "bad_status": REASON_BAD_STATUS,
    "clock_skew": REASON_FUTURE_TIMESTAMP,
}
CLOCK_SKEW = timedelta(minutes=12)
_FUTURE = timedelta(hours=1)
# A stale reading is stamped this long before the run began: older than anything the device sent.
_STALE_BY = timedelta(minutes=2)


@dataclass
class _Plan:
    kind: str
    at: float
    device: SimulatedDevice
    done: bool = False


@dataclass
class _Skew:
    device: SimulatedDevice
    incident: Incident | None = None
    sent: int = 0


class BadDevices(Scenario):
    name = "bad-devices"

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        super().__init__(fleet, interval_s=interval_s, seed=seed)
        # The skewed clock gets a device of its own (every reading of it is refused); the one-off
        # misbehaviours go round the others.
        self.skewed = _Skew(fleet[-1]) if len(fleet) > 1 else None
        others = fleet[:-1] if len(fleet) > 1 else fleet
        self.plans = [_Plan(kind, at, others[index % len(others)]) for index, (kind, at) in enumerate(_ONCE)]

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if len(self.fleet) < 2:
            raise ValueError("scenario bad-devices needs at least 2 devices")

    def readings(self, device: SimulatedDevice, at: datetime, progress: float) -> list[Send]:
        skewed = self.skewed
        if skewed is not None and device is skewed.device:
            return [self._skewed_reading(skewed, at)]
        sends: list[Send] = []
        for plan in self.plans:
            if plan.device is device and not plan.done and progress >= plan.at:
                plan.done = True
                sends.extend(self._misbehave(plan.kind, device, at))
        if not any(send.topic == device.topic and send.payload for send in sends):
            sends.append(Send(device.topic, device.next_payload(at)))
        return sends

    def _skewed_reading(self, skewed: _Skew, at: datetime) -> Send:
        device = skewed.device
        ahead = at + CLOCK_SKEW
        skewed.sent += 1
        if skewed.incident is None:
            skewed.incident = self._dead_letter("clock_skew", device, device.topic, at)
            skewed.incident.allowed_rules = [OFFLINE_RULE]
            skewed.incident.detail = (
                f"the device's clock runs {CLOCK_SKEW.total_seconds() / 60:g} minutes ahead: every"
                " reading is stamped in the future"
            )
        skewed.incident.count = skewed.sent
        return Send(device.topic, device.payload(ahead, device.sample(at)))

    def _misbehave(self, kind: str, device: SimulatedDevice, at: datetime) -> list[Send]:
        metrics = device.sample(at)
        bad = _bad_message(kind, device, at, metrics)
        if bad is not None:
            topic, payload = bad
            return [self._rejected(kind, device, topic, payload, at)]
        if kind == "unknown_device":
            ghost = f"{device.id}-ghost"
            topic = f"{TOPIC_ROOT}/{device.city}/{device.domain.name}/{ghost}/telemetry"
            incident = self._dead_letter(kind, device, topic, at)
            incident.device_id = ghost
            self._incidents.append(incident)
            body = {"ts": at.isoformat(), "seq": 1, **metrics}
            return [Send(topic, _json(body), via=device.id)]
        if kind == "bad_status":
            return [self._rejected(kind, device, device.status_topic, b"rebooting", at)]
        if kind == "duplicate":
            payload = device.payload(at, metrics)
            self._incidents.append(
                self._stored(kind, "stored_once", device, at, payload, "the same message sent twice")
            )
            return [Send(device.topic, payload), Send(device.topic, payload)]
        if kind == "out_of_order":
            stale_at = (self.started_at or at) - _STALE_BY
            payload = device.payload(stale_at, _past_limits(device, device.sample(stale_at)))
            self._incidents.append(
                self._stored(
                    kind,
                    "stored_late",
                    device,
                    at,
                    payload,
                    "a reading older than the device's latest, past its limits: stored, raising nothing",
                )
            )
            return [Send(device.topic, device.next_payload(at)), Send(device.topic, payload)]
        raise ValueError(f"unknown misbehaviour {kind!r}")

    def _rejected(self, kind: str, device: SimulatedDevice, topic: str, payload: bytes, at: datetime) -> Send:
        self._incidents.append(self._dead_letter(kind, device, topic, at))
        return Send(topic, payload)

    def _dead_letter(self, kind: str, device: SimulatedDevice, topic: str, at: datetime) -> Incident:
        return Incident(
            scenario=self.name,
            kind=kind,
            city=device.city,
            domain=device.domain.name,
            expected="dead_letter",
            started_at=at,
            device_id=device.id,
            district=device.district,
            reason=_REASONS[kind],
            topic=topic,
            count=1,
            detect_within_s=PIPELINE_ALLOWANCE_S,
            detail=f"rejected with reason {_REASONS[kind]}",
        )

    def _stored(
        self, kind: str, expected: Any, device: SimulatedDevice, at: datetime, payload: bytes, detail: str
    ) -> Incident:
        body = json.loads(payload)
        return Incident(
            scenario=self.name,
            kind=kind,
            city=device.city,
            domain=device.domain.name,
            expected=expected,
            started_at=at,
            device_id=device.id,
            district=device.district,
            topic=device.topic,
            ts=body["ts"],
            seq=body["seq"],
            count=1,
            detect_within_s=PIPELINE_ALLOWANCE_S,
            detail=detail,
        )

    def incidents(self) -> list[Incident]:
        skew = [self.skewed.incident] if self.skewed is not None and self.skewed.incident else []
        return [*self._incidents, *skew]


def _past_limits(device: SimulatedDevice, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with one pushed past its critical limit (still within the valid range)."""
    rules = rules_for(device.domain, device.thresholds)
    for metric in device.domain.metrics:
        limits = rules[metric.name]
        if limits.crit_above is not None and limits.crit_above < metric.maximum:
            past = limits.crit_above + min(1.0, (metric.maximum - limits.crit_above) / 2)
            return {**metrics, metric.name: past}
        if limits.crit_below is not None and limits.crit_below > metric.minimum:
            return {**metrics, metric.name: (limits.crit_below + metric.minimum) / 2}
    return metrics


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _bad_message(
    kind: str, device: SimulatedDevice, at: datetime, metrics: dict[str, float]
) -> tuple[str, bytes] | None:
    """The topic and payload of a message the gateway must dead-letter as `kind` (None: not one)."""
    first = device.domain.metrics[0]
    if kind == "malformed_payload":
        whole = device.payload(at, metrics)
        return device.topic, whole[: len(whole) // 2]
    if kind == "out_of_range":
        wild = first.maximum + (first.maximum - first.minimum)
        return device.topic, device.payload(at, {first.name: wild})
    if kind == "not_finite":
        device.seq += 1
        return device.topic, f'{{"ts":"{at.isoformat()}","seq":{device.seq},"{first.name}":NaN}}'.encode()
    if kind == "unknown_metric":
        return device.topic, device.payload(at, {**metrics, "signalStrength": -71.0})
    if kind == "bad_timestamp":
        device.seq += 1
        return device.topic, _json({"ts": "hôm qua, 14 giờ", "seq": device.seq, **metrics})
    if kind == "future_timestamp":
        return device.topic, device.payload(at + _FUTURE, metrics)
    if kind == "payload_too_large":
        device.seq += 1
        body = {"ts": at.isoformat(), "seq": device.seq, **metrics, "log": "x" * MAX_PAYLOAD_BYTES}
        return device.topic, _json(body)
    if kind == "device_mismatch":
        other = next(name for name in sorted(DOMAINS) if name != device.domain.name)
        return f"{TOPIC_ROOT}/{device.city}/{other}/{device.id}/telemetry", device.payload(at, metrics)
    if kind == "bad_status":
        return device.status_topic, b"rebooting"
    return None
