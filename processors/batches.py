"""One batch from the bus into the database: decoding the records, and writing them with what
detection makes of them in one transaction.

`BatchWriter` owns the caches detection reads from (device profiles, detector state as last
committed) and the detectors themselves. It neither commits offsets nor sends anything: the runner
does that once `write` has returned.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from ioc_core.alarms import Finding
from ioc_core.bus import BusRecord
from ioc_core.errors import RejectedMessage
from ioc_core.storage import (
    BatchTransaction,
    Database,
    DeviceProfileRow,
    StatusTransition,
    StoredSignal,
    TelemetryBatch,
)
from ioc_core.supervision import Supervisor
from ioc_core.telemetry import Reading, StoredDeadLetter, decode_record
from processors.detection import (
    DeviceDetection,
    DeviceDetectorState,
    DeviceProfile,
    DistrictFloodCorrelator,
    FloodZone,
    StationSignal,
    offline_finding,
)
from processors.phases import PhaseClock
from processors.state_cache import StateCache

log = logging.getLogger(__name__)

# The supervisor's name for the work of storing a batch; readiness reports it as "database".
WRITING_A_BATCH = "writing a batch"
# Unwritten detector states written outside a batch go in transactions of this many.
_STATE_WRITE_CHUNK = 5_000


def decode_batch(records: Sequence[BusRecord], *, deadletter_topic: str) -> TelemetryBatch:
    """The records of one poll as a batch: telemetry decoded, anything undecodable (and whatever
    came from the dead-letter topic) as dead letters named by their bus position."""
    batch = TelemetryBatch()
    for record in records:
        source = f"{record.topic}/{record.partition}@{record.offset}"
        if record.topic == deadletter_topic:
            batch.dead_letters.append(StoredDeadLetter.from_bytes(record.value, source=source))
            continue
        try:
            batch.records.append((decode_record(record.value), record.partition))
        except RejectedMessage as rejection:
            batch.dead_letters.append(StoredDeadLetter.of_rejection(rejection, record.value, source=source))
    return batch


@dataclass(slots=True)
class BatchOutcome:
    """What one committed batch changed, for the runner's counters and the state events."""

    kept: list[Reading]
    transitions: list[StatusTransition]
    profiles: dict[str, DeviceProfile]
    stored: int
    duplicates: int
    findings: int
    events_recorded: bool = field(default=False)


class BatchWriter:
    """Writes batches, one transaction each: readings, status, detector state, alarms, events."""

    def __init__(
        self,
        database: Database,
        supervisor: Supervisor,
        *,
        clock: PhaseClock | None = None,
        rules_refresh_s: float = 3.0,
        state_cache_bytes: int = 64 * 2**20,
        state_write_s: float = 60.0,
    ) -> None:
        self._database = database
        self._clock = clock or PhaseClock()
        self._supervisor = supervisor
        self._detection = DeviceDetection()
        self._correlator = DistrictFloodCorrelator()
        # Detector state as the last committed batch left it, per device, as the JSON document
        # the database holds or will (see `StateCache`; a state whose alarms did not change may
        # be written later). Kept as text, not as the detectors' objects: a fifth of the memory,
        # and nothing for the garbage collector to walk (with 100,000 devices the objects made
        # each full collection take over 100 ms). Not as orjson's bytes either: each keeps the
        # 4 KiB buffer it was written into, ten times its length. Written and dropped when the
        # partition assignment changes, since another processor may move it on; updated only
        # when a transaction commits.
        self._detector_states = StateCache(state_cache_bytes)
        # How long a held state whose alarms did not change may go unwritten (see `write`).
        self._state_write_s = state_write_s
        self._profiles: dict[str, DeviceProfile] = {}
        # Rules at run time: the rules and device profiles versions the cached profiles were read
        # at, and when they were last compared with the database's (see `_device_profiles`).
        self._rules_refresh_s = rules_refresh_s
        self._version: tuple[int, int] | None = None
        self._rules_checked_at = 0.0

    async def forget_detector_states(self) -> None:
        """Write the states the database does not have yet, then let every state go: the
        partitions are moving, and their next owner reads the states from the database."""
        try:
            await self.write_unwritten_states(everything=True)
        except Exception as exc:
            # The partitions' next owner goes on from the states stored before: it loses what
            # the devices' baselines learned since, never an alarm (trackers are always written).
            log.warning(
                "%d devices' detector state of the last %.0f s not written before the partitions moved: %s",
                self._detector_states.unwritten,
                self._state_write_s,
                exc,
            )
        self._detector_states.clear()

    async def write_unwritten_states(self, *, everything: bool = False) -> int:
        """Write the held states left unwritten longer than `state_write_s` (or all of them), in
        transactions of a few thousand; returns how many were written. Called between batches,
        so that the states of devices that fell silent reach the database too."""
        cache = self._detector_states
        if everything:
            due = cache.all_unwritten()
        else:
            due = cache.unwritten_since(time.monotonic() - self._state_write_s)
        ids = list(due)
        for start in range(0, len(ids), _STATE_WRITE_CHUNK):
            chunk = {d: due[d] for d in ids[start : start + _STATE_WRITE_CHUNK]}
            async with self._database.transaction() as transaction:
                await transaction.save_detector_states(chunk, {})
            cache.written(chunk)
        return len(ids)

    async def write(self, batch: TelemetryBatch) -> BatchOutcome:
        """Store `batch` and what detection finds in it; nothing is kept in memory unless the
        transaction commits, so a failed write can simply be tried again."""
        clock = self._clock
        clock.start()
        device_ids = {record.device_id for record, _ in batch.records}
        profiles = await self._device_profiles(device_ids)
        clock.lap("profiles")
        states: dict[str, DeviceDetectorState] = {}
        written: dict[str, str] = {}
        try:
            async with self._database.transaction() as transaction:
                result = await transaction.write(batch)
                clock.lap("readings")
                by_device: dict[str, list[Reading]] = {}
                for reading in result.kept:
                    by_device.setdefault(reading.device_id, []).append(reading)
                states = await self._working_states(transaction, [d for d in by_device if d in profiles])
                trackers = {d: state.alarm_trackers() for d, state in states.items()}
                clock.lap("load_state")
                findings, zones = self._detect(profiles, by_device, states)
                clock.lap("detect")
                new_states = {d: orjson.dumps(state.to_json()).decode() for d, state in states.items()}
                signals = self._station_signals(profiles, states)
                written = self._states_to_write(profiles, states, trackers, new_states, now=time.monotonic())
                await transaction.save_detector_states(written, signals)
                clock.lap("save_state")
                findings.extend(await self._correlate(transaction, zones, _rising(signals)))
                clock.lap("correlate")
                findings.extend(offline_findings(result.transitions))
                alarm_events = await transaction.apply_findings(findings)
                clock.lap("alarms")
            clock.lap("transaction_commit")
        except BaseException:
            # A commit that failed on the way back may still have been made: the states it
            # wrote are held as they were before the batch, but compared with the database's
            # next time, and the newer one is taken (see `_working_states`). A state it did not
            # write is held as it was before the batch: its alarms are the same either way.
            self._detector_states.doubt(d for d in written if d in states)
            raise
        cache = self._detector_states
        cache.update(new_states, unwritten=new_states.keys() - written.keys(), at=time.monotonic())
        cache.written(written)
        return BatchOutcome(
            kept=result.kept,
            transitions=result.transitions,
            profiles=profiles,
            stored=result.stored,
            duplicates=result.duplicates,
            findings=len(findings),
            events_recorded=bool(result.events or alarm_events),
        )

    def _detect(
        self,
        profiles: dict[str, DeviceProfile],
        by_device: dict[str, list[Reading]],
        states: dict[str, DeviceDetectorState],
    ) -> tuple[list[Finding], dict[str, _TouchedZone]]:
        """Each device's findings, and per flood zone the newest reading that touched it."""
        findings: list[Finding] = []
        zones: dict[str, _TouchedZone] = {}
        for device_id, state in states.items():
            profile = profiles[device_id]
            readings = by_device[device_id]
            findings.extend(self._detection.evaluate(profile, readings, state))
            zone = profile.zone
            if zone is None:
                continue
            newest = max(r.ts for r in readings)
            _touch(zones, zone, profile.city, newest)
            if zone.area_id is not None and profile.district:
                # A station registered with a `district` that now lies in an area has left the
                # district's zone (of older releases, or before the areas came): an open alarm
                # of that district is judged again, without it, and passes once none is left.
                _touch(zones, FloodZone.of_district(profile.city, profile.district), profile.city, newest)
        return findings, zones

    def _states_to_write(
        self,
        profiles: dict[str, DeviceProfile],
        states: dict[str, DeviceDetectorState],
        trackers_before: dict[str, tuple[tuple[str, str, str, int], ...]],
        new_states: dict[str, str],
        *,
        now: float,
    ) -> dict[str, str]:
        """The detector states this batch writes. Writing every device's state in every batch
        was the database's largest cost with many devices (a quarter of its time at 100,000), and
        most of it only moves a baseline on. So a state is written with its batch when:
        - an alarm's tracker changed (opened, worsened, counting towards clearing, cleared), so
          that the database's alarms and the trackers never disagree, even after a crash;
        - it is a flood station's, whose signal the zone correlation reads from the database;
        - the cache cannot hold it;
        - or it has gone unwritten for `state_write_s`.
        The others are held unwritten; a processor that dies loses what their baselines learned
        since (seconds of a daily profile), never a reading or an alarm. The held states of
        devices not in the batch that are due go with it too."""
        cache = self._detector_states
        if self._state_write_s <= 0:
            return new_states
        held = cache.holds_after(new_states)
        due = cache.unwritten_since(now - self._state_write_s)
        written = {
            d: text
            for d, text in new_states.items()
            if d not in held
            or d in due
            or profiles[d].zone is not None
            or states[d].alarm_trackers() != trackers_before[d]
        }
        for device_id, text in due.items():
            written.setdefault(device_id, text)
        return written

    def _station_signals(
        self, profiles: dict[str, DeviceProfile], states: dict[str, DeviceDetectorState]
    ) -> dict[str, StoredSignal | None]:
        # Computed after detection has moved the states on, as the correlation reads them.
        signals: dict[str, StoredSignal | None] = {}
        for device_id, state in states.items():
            profile = profiles[device_id]
            if profile.zone is not None:
                signal = self._correlator.station_signal(profile, state)
                signals[device_id] = (
                    StoredSignal(signal.to_json(), profile.zone.subject) if signal is not None else None
                )
        return signals

    async def _correlate(
        self,
        transaction: BatchTransaction,
        zones: dict[str, _TouchedZone],
        rising: set[str],
    ) -> list[Finding]:
        """Judge the zones this batch touched. Only a station whose water rises counts towards
        a zone alarm, and it is judged in the batch that carries its readings: without an open
        alarm, a zone none of whose stations here rises cannot change, and only the rising
        stations' signals can raise it. Reading every station's signal of every zone in every
        batch was a quarter of the database's time at 100,000 devices."""
        if not zones:
            return []
        open_now = await transaction.open_zone_alarms(sorted(zones))
        findings = []
        for subject, touched in sorted(zones.items()):
            active = subject in open_now
            if not active and subject not in rising:
                continue
            stations = await transaction.zone_flood_signals(subject, rising_only=not active)
            finding = self._correlator.evaluate(
                city=touched.city,
                zone=touched.zone,
                signals=_readable_signals([station.signal for station in stations]),
                active=active,
                now=touched.newest,
                station_areas={str(station.signal.get("device_id")): station.areas for station in stations},
            )
            if finding is not None:
                findings.append(finding)
        return findings

    async def _working_states(
        self, transaction: BatchTransaction, device_ids: list[str]
    ) -> dict[str, DeviceDetectorState]:
        """The devices' detector state as the last committed batch left it, loading what is not
        held, as fresh objects for detection to move on (the cache keeps the committed ones)."""
        cache = self._detector_states
        held = {d: text for d in device_ids if (text := cache.get(d)) is not None}
        missing = [d for d in device_ids if d not in held or cache.doubted(d)]
        loaded = await transaction.detector_states(missing) if missing else {}
        states = {}
        for device_id in device_ids:
            # Held: this process wrote it, and reads it back without the checks a stored one needs.
            document = held.get(device_id)
            state = None if document is None else DeviceDetectorState.from_own_json(orjson.loads(document))
            if state is None or (device_id in loaded and cache.doubted(device_id)):
                # Not held, or a failed commit may have been made after all: the database's, read
                # with every check (another version, or anyone, may have written it), if newer.
                stored = DeviceDetectorState.from_json(loaded.get(device_id) or {})
                if state is None or _seen_no_earlier(stored, state):
                    state = stored
            states[device_id] = state
        return states

    @property
    def state_cache(self) -> StateCache:
        return self._detector_states

    async def _device_profiles(self, device_ids: set[str]) -> dict[str, DeviceProfile]:
        """What detection needs to know of each device; read again as soon as the rules version
        or the device profiles version moves (a rule override, a device's thresholds, an area),
        compared every `rules_refresh_s`, so that a change takes effect within seconds. Devices no
        longer registered are left out."""
        if time.monotonic() - self._rules_checked_at >= self._rules_refresh_s:
            # One row read every few seconds, not per batch; the versions are read before the
            # profiles, so a change committed in between is seen again at the next check.
            version = await self._supervisor.retry(WRITING_A_BATCH, self._database.devices.detection_version)
            self._rules_checked_at = time.monotonic()
            if version != self._version:
                if self._version is not None:
                    log.info(
                        "rules changed (version %d, devices version %d): reading the devices' rules again",
                        *version,
                    )
                self._profiles.clear()
                self._version = version
        missing = [d for d in device_ids if d not in self._profiles]
        if missing:
            rows = await self._supervisor.retry(
                WRITING_A_BATCH, functools.partial(self._database.devices.profiles, missing)
            )
            self._profiles.update((row.id, _profile_of(row)) for row in rows)
        return {d: self._profiles[d] for d in device_ids if d in self._profiles}


def _profile_of(row: DeviceProfileRow) -> DeviceProfile:
    # Interned: a processor holds one profile per device, and 100,000 of them name a few cities,
    # domains and wards.
    return DeviceProfile.of(
        id=sys.intern(row.id),
        city=sys.intern(row.city),
        domain=sys.intern(row.domain),
        name=row.name,
        district=sys.intern(row.district) if row.district is not None else None,
        thresholds=row.thresholds,
        zone_area=row.zone_area,
        zone_name_vi=row.zone_name_vi,
        zone_name_en=row.zone_name_en,
        overrides=row.rule_layers,
    )


def offline_findings(transitions: list[StatusTransition]) -> list[Finding]:
    """A device going offline raises its `offline` alarm; coming back resolves it."""
    return [
        offline_finding(
            DeviceProfile.of(
                id=t.device_id, city=t.city, domain=t.domain, name=t.name, district=t.district, thresholds={}
            ),
            at=t.at,
            active=t.status == "offline",
        )
        for t in transitions
    ]


def _seen_no_earlier(stored: DeviceDetectorState, held: DeviceDetectorState) -> bool:
    """Whether a stored state has seen readings up to the held one's at least (a state's
    `last_ts` moves with every reading it evaluates)."""
    return stored.last_ts is not None and (held.last_ts is None or stored.last_ts >= held.last_ts)


def _rising(signals: dict[str, StoredSignal | None]) -> set[str]:
    """The zones of the flood stations whose water rises as of this batch."""
    return {
        signal.zone
        for signal in signals.values()
        if signal is not None and signal.zone is not None and signal.body.get("rising") is True
    }


@dataclass
class _TouchedZone:
    """A flood zone a batch's readings touched, with the newest of them."""

    zone: FloodZone
    city: str
    newest: datetime


def _touch(zones: dict[str, _TouchedZone], zone: FloodZone, city: str, newest: datetime) -> None:
    touched = zones.get(zone.subject)
    if touched is None:
        zones[zone.subject] = _TouchedZone(zone, city, newest)
    else:
        touched.newest = max(touched.newest, newest)


def _readable_signals(stored: list[dict[str, object]]) -> list[StationSignal]:
    """Stored station signals; one that cannot be read (written by another version) is left out
    rather than stopping the district's correlation."""
    signals = []
    for item in stored:
        try:
            signals.append(StationSignal.from_json(item))
        except ValueError as exc:
            log.warning("ignoring an unreadable flood station signal %r: %s", item, exc)
    return signals
