"""`ioc simulate` scenarios against the whole pipeline: each scenario's ground truth is matched by
what the system makes of it.

The four scenarios run at once, each as an `ioc simulate --register` process for a city of its own
laid out on a real city's map, with its timeline compressed into under a minute; meanwhile the test
polls the alarms of every city, noting when each alarm (and each of its severities) first showed.
Then, per scenario:

- storm: every injected incident has its alarm (`expected_rules`, at least `expected_severity`),
  seen within the incident's `detect_within_s` (its device's reporting interval twice, plus ten
  seconds for the pipeline) of the reading that caused it, and resolved once the water is gone;
  every alarm raised is one of those or an allowed side effect;
- outage: every device on the failed feeder is alarmed `offline` within ten seconds of losing power
  (its last will, not silence), and the alarm resolves once it is back;
- bad-devices: every rejected message is a dead letter with the right reason, the message sent
  twice is stored once, the stale reading is stored without moving the latest state back or
  raising anything, and nothing else raises an alarm;
- normal: no alarm at all during the run.

This module runs a system of its own (database, topics, gateway, processor and API).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ioc_core.rules import severity_rank
from ioc_core.settings import load_settings
from simulators.cities import city_areas, slug
from simulators.fleet import build_fleet
from simulators.runner import ScenarioRun
from simulators.scenarios import Scenario
from simulators.truth import Incident, read_truth
from tests.conftest import Figures
from tests.integration import harness
from tests.integration.conftest import ADMIN_KEY
from tests.integration.harness import unique
from tests.integration.systems import own_system
from tests.storm_story import STORM_STORY

# scenario → (map, devices, messages per second, seconds); every device reports once a second.
RUNS = {
    "storm": ("hai-phong", 40, 40, 45),
    "outage": ("ha-noi", 20, 20, 40),
    "bad-devices": ("quang-ninh", 25, 25, 40),
    "normal": ("da-nang", 30, 30, 40),
}
# After the simulators end: the longest the test waits for what is still on its way.
GRACE_S = 25
POLL_S = 0.5


@dataclass
class Observed:
    """One alarm as polled: its latest form, and when each severity was first seen (wall clock)."""

    alarm: dict[str, Any]
    first_seen: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    scenario: str
    city: str
    truth_path: Path
    started: float = 0.0
    ended: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    alarms: dict[str, Observed] = field(default_factory=dict)

    @property
    def truth(self) -> list[Incident]:
        return read_truth(self.truth_path)


@dataclass
class ScenarioSystem:
    env: dict[str, str]
    api_url: str
    database_url: str
    runs: dict[str, Run]


@pytest.fixture(scope="module")
async def scenarios(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScenarioSystem]:
    runs = {
        scenario: Run(
            scenario, unique(f"scn-{scenario}")[:32], tmp_path_factory.mktemp("truth") / "truth.jsonl"
        )
        for scenario in RUNS
    }
    async with own_system(
        log_dir,
        "scenarios",
        [run.city for run in runs.values()],
        # Short enough that silence would be caught too, long enough that the outage's alarms can
        # only have come from the devices' last wills within the incidents' ten seconds.
        IOC_OFFLINE_AFTER_S=json.dumps({"grid": 30, "water": 30}),
    ) as own:
        system = ScenarioSystem(env=own.env, api_url=own.api_url, database_url=own.database_url, runs=runs)
        await _run_all(system)
        yield system


async def _run_all(system: ScenarioSystem) -> None:
    """Run the four simulators at once, polling the alarms of their cities all along."""
    simulators: dict[str, asyncio.subprocess.Process] = {}
    for scenario, run in system.runs.items():
        places, devices, rate, duration = RUNS[scenario]
        command = [
            sys.executable,
            "-m",
            "ioc.cli",
            "simulate",
            "--city",
            run.city,
            "--places",
            places,
            "--scenario",
            scenario,
            "--devices",
            str(devices),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--register",
            "--truth",
            str(run.truth_path),
        ]
        if scenario == "bad-devices":
            command += ["--api", system.api_url]  # the other way of registering
        simulators[scenario] = await asyncio.create_subprocess_exec(
            *command, env=system.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        run.started = time.time()

    async def finish(scenario: str) -> None:
        process, run = simulators[scenario], system.runs[scenario]
        output, _ = await process.communicate()
        run.ended = time.time()
        run.output = output.decode(errors="replace")
        assert process.returncode == 0, f"ioc simulate --scenario {scenario} failed:\n{run.output[-3000:]}"
        run.summary = json.loads(run.output.strip().splitlines()[-1])

    waiting = asyncio.gather(*(finish(scenario) for scenario in simulators))
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as api:
        while not waiting.done():
            await _poll(api, system)
            await asyncio.sleep(POLL_S)
        await waiting
        deadline = time.time() + GRACE_S
        while time.time() < deadline and not _all_seen(system):
            await _poll(api, system)
            await asyncio.sleep(POLL_S)
        await _poll(api, system)


async def _poll(api: httpx.AsyncClient, system: ScenarioSystem) -> None:
    now = time.time()
    for run in system.runs.values():
        response = await api.get("/v1/alarms", params={"city": run.city, "limit": 1000})
        assert response.status_code == 200, response.text
        for alarm in response.json()["items"]:
            seen = run.alarms.setdefault(str(alarm["id"]), Observed(alarm))
            seen.alarm = alarm
            seen.first_seen.setdefault(alarm["severity"], now)


def _all_seen(system: ScenarioSystem) -> bool:
    """Every alarm incident of every run has its alarm, at its severity, and resolved if it ended."""
    for run in system.runs.values():
        if not run.truth_path.exists():
            return False
        for incident in run.truth:
            if incident.expected != "alarm":
                continue
            found = _matching(run, incident)
            if found is None or severity_rank(found.alarm["severity"]) < severity_rank(
                incident.expected_severity
            ):
                return False
            if incident.ended_at is not None and found.alarm["state"] != "resolved":
                return False
    return True


def _matching(run: Run, incident: Incident) -> Observed | None:
    for seen in run.alarms.values():
        alarm = seen.alarm
        # One excursion is one alarm: the expected rule may be any of its reasons.
        rules = {reason["rule"] for reason in alarm["reasons"]}
        if alarm["subject"] == incident.subject and rules & set(incident.expected_rules):
            return seen
    return None


def _check_alarm_incidents(run: Run) -> list[Incident]:
    """Every alarm incident has its alarm in time; returns the alarm incidents."""
    incidents = [incident for incident in run.truth if incident.expected == "alarm"]
    problems = []
    for incident in incidents:
        seen = _matching(run, incident)
        what = f"{incident.kind} of {incident.subject} ({incident.detail})"
        if seen is None:
            problems.append(f"no {incident.expected_rules} alarm for {what}")
            continue
        reached = [
            at
            for severity, at in seen.first_seen.items()
            if severity_rank(severity) >= severity_rank(incident.expected_severity)
        ]
        if not reached:
            problems.append(f"{what}: alarm never reached {incident.expected_severity}: {seen.alarm}")
            continue
        delay = min(reached) - incident.started_at.timestamp()
        assert incident.detect_within_s is not None
        # Polling adds up to one interval to the time the alarm was first seen.
        if delay > incident.detect_within_s + POLL_S:
            problems.append(
                f"{what}: seen {delay:.1f}s after it started, allowed {incident.detect_within_s}s"
            )
        if incident.ended_at is not None and seen.alarm["state"] != "resolved":
            problems.append(f"{what}: ended at {incident.ended_at} but its alarm is {seen.alarm['state']}")
    assert not problems, "\n".join(problems)
    return incidents


def _check_nothing_else(run: Run) -> None:
    """Every alarm raised during the run is expected or allowed by some incident of its subject."""
    explained: dict[str, set[str]] = {}
    for incident in run.truth:
        rules = explained.setdefault(incident.subject, set())
        rules.update(incident.expected_rules, incident.allowed_rules)
    unexplained = []
    for seen in run.alarms.values():
        alarm = seen.alarm
        started = datetime.fromisoformat(alarm["started_at"]).timestamp()
        if alarm["rule"] == "offline" and started >= run.ended - 1:
            continue  # the simulator has stopped: its devices are silent now, as they should be
        for reason in alarm["reasons"]:
            if reason["rule"] not in explained.get(alarm["subject"], set()):
                unexplained.append(
                    f"{alarm['subject']} {reason['rule']} {reason['severity']}: {reason['messages']['en']}"
                )
    assert not unexplained, "alarms nobody injected:\n" + "\n".join(unexplained)


def _check_summary(run: Run) -> None:
    summary = run.summary
    assert summary["scenario"] == run.scenario and summary["city"] == run.city
    # A device losing power may lose the messages it had in flight; how many depends on how busy
    # the machine is at that instant (748 of 760 acknowledged was seen on a loaded run). What was
    # acknowledged is checked against storage elsewhere; this only bounds the loss.
    share = 0.97 if run.scenario == "outage" else 0.99
    assert summary["sent"] > 0 and summary["acknowledged"] >= share * summary["sent"], summary
    assert summary["registered"] + summary["updated"] == RUNS[run.scenario][1]
    assert summary["areas"] == len(city_areas(run.city, places=RUNS[run.scenario][0]))


async def test_storm_incidents_are_all_alarmed_in_time(scenarios: ScenarioSystem) -> None:
    run = scenarios.runs["storm"]
    _check_summary(run)
    incidents = _check_alarm_incidents(run)
    kinds = {incident.kind for incident in incidents}
    assert kinds >= STORM_STORY, kinds
    zones = [i for i in incidents if i.kind == "district_flood"]
    assert zones
    for incident in zones:
        # The storm's flood is correlated by the catchment (or ward) the simulated map gives it.
        assert incident.area is not None and incident.subject == f"area:{incident.area}"
        seen = _matching(run, incident)
        assert seen is not None and seen.alarm["device_id"] is None
        assert incident.area in seen.alarm["areas"]
    _check_nothing_else(run)


# -- incidents (ioc_core.incidents): the storm's alarms become one incident per area ----------


async def test_storm_becomes_one_flood_incident_per_area(scenarios: ScenarioSystem, figures: Figures) -> None:
    run = scenarios.runs["storm"]
    zones = {i.area for i in run.truth if i.kind == "district_flood" and i.area is not None}
    assert zones
    flood_alarms = {int(i) for i, seen in run.alarms.items() if seen.alarm["domain"] == "flood"}
    async with httpx.AsyncClient(
        base_url=scenarios.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as api:

        async def storm_incidents() -> list[dict[str, Any]] | None:
            answer = await api.get("/v1/incidents", params={"city": run.city, "limit": 1000})
            assert answer.status_code == 200, answer.text
            items: list[dict[str, Any]] = answer.json()["items"]
            flooded = {i["area"] for i in items if i["kind"] == "flood"}
            return items if zones <= flooded else None

        listed = await harness.wait_until(
            storm_incidents, timeout=30, what=f"a flood incident for each of {sorted(zones)}"
        )
        incidents = [(await api.get(f"/v1/incidents/{i['id']}")).json() for i in listed]
    flood = [i for i in incidents if i["kind"] == "flood"]
    # One incident per area: no area has two, and every area that flooded has its own.
    areas = [i["area"] for i in flood]
    assert len(areas) == len(set(areas)), areas
    assert zones <= set(areas)
    for incident in flood:
        if incident["area"] in zones:
            # The zone's own alarm and its stations' alarms are in the one incident of the zone.
            subjects = {a["subject"] for a in incident["alarms"]}
            assert f"area:{incident['area']}" in subjects, incident["alarms"]
            assert len(subjects) > 1, f"no station alarm joined the incident of {incident['area']}"
    grouped = {a["id"] for i in incidents for a in i["alarms"]}
    figures.lines.append(
        f"storm scenario ({run.city}): {len(run.alarms)} alarms -> {len(incidents)} incidents"
        f" ({len(flood_alarms)} flood alarms -> {len(flood)} flood incidents over {len(zones)} flooded"
        f" areas; {len(grouped)} alarms grouped)"
    )


async def test_outage_devices_go_offline_by_their_last_will_and_come_back(scenarios: ScenarioSystem) -> None:
    run = scenarios.runs["outage"]
    _check_summary(run)
    try:
        incidents = _check_alarm_incidents(run)
    except AssertionError as failure:
        diagnosis = await _device_histories(scenarios, run)
        raise AssertionError(f"{failure}\n{diagnosis}\nsimulator summary: {run.summary}") from None
    assert incidents and all(i.kind == "feeder_outage" and i.ended_at is not None for i in incidents)
    assert {i.domain for i in incidents} == {"grid", "water"}, "the feeder powers meters and water works"
    _check_nothing_else(run)


async def _device_histories(system: ScenarioSystem, run: Run) -> str:
    """What the database knows of the outage's devices: their status and when it changed, when they
    were last seen, and the readings they sent after power came back."""
    victims = [i.device_id for i in run.truth if i.kind == "feeder_outage" and i.device_id is not None]
    connection = await asyncpg.connect(system.database_url)
    try:
        rows = await connection.fetch(
            "SELECT device_id, status, status_changed_at, last_seen, ts FROM device_state"
            " WHERE device_id = ANY($1::text[]) ORDER BY device_id",
            victims,
        )
    finally:
        await connection.close()
    return "device states:\n" + "\n".join(str(dict(row)) for row in rows)


async def test_bad_devices_are_dead_lettered_stored_once_or_stored_late(scenarios: ScenarioSystem) -> None:
    run = scenarios.runs["bad-devices"]
    _check_summary(run)
    truth = run.truth
    async with httpx.AsyncClient(
        base_url=scenarios.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as api:
        response = await api.get("/v1/dead-letters", params={"limit": 1000})
        assert response.status_code == 200, response.text
        letters = [letter for letter in response.json()["items"] if f"/{run.city}/" in letter["topic"]]
        problems = []
        dead = [incident for incident in truth if incident.expected == "dead_letter"]
        for incident in dead:
            found = [
                letter
                for letter in letters
                if letter["topic"] == incident.topic and letter["reason"] == incident.reason
            ]
            if len(found) < (incident.count or 1):
                problems.append(
                    f"{incident.kind}: {len(found)} dead letters {incident.reason} on {incident.topic}"
                )
        assert not problems, (
            "\n".join(problems) + f"\nall dead letters: {[(d['reason'], d['topic']) for d in letters]}"
        )
        # Nothing the devices sent properly was turned away.
        expected = {(i.topic, i.reason) for i in dead}
        assert {(d["topic"], d["reason"]) for d in letters} <= expected

        stored = [incident for incident in truth if incident.expected in ("stored_once", "stored_late")]
        assert {i.kind for i in stored} == {"duplicate", "out_of_order"}
        connection = await asyncpg.connect(scenarios.database_url)
        try:
            for incident in stored:
                assert incident.ts is not None and incident.device_id is not None
                count = await connection.fetchval(
                    f"SELECT count(*) FROM readings_{incident.domain} WHERE device_id = $1 AND ts = $2",
                    incident.device_id,
                    datetime.fromisoformat(incident.ts),
                )
                assert count == 1, f"{incident.kind}: {count} readings at {incident.ts}"
                if incident.expected == "stored_late":
                    device = (await api.get(f"/v1/devices/{incident.device_id}")).json()
                    assert datetime.fromisoformat(device["latest"]["ts"]) > datetime.fromisoformat(
                        incident.ts
                    )
        finally:
            await connection.close()
    kinds = {incident.kind for incident in dead}
    assert {
        "malformed_payload",
        "out_of_range",
        "not_finite",
        "unknown_metric",
        "bad_timestamp",
        "future_timestamp",
        "payload_too_large",
        "device_mismatch",
        "unknown_device",
        "bad_status",
        "clock_skew",
    } <= kinds, kinds
    _check_nothing_else(run)


async def test_normal_raises_no_alarm(scenarios: ScenarioSystem) -> None:
    run = scenarios.runs["normal"]
    _check_summary(run)
    assert run.truth == []
    assert run.summary["sent"] >= 0.95 * RUNS["normal"][2] * RUNS["normal"][3]
    _check_nothing_else(run)


async def test_registering_stores_the_maps_approximate_areas_under_each_city(
    scenarios: ScenarioSystem,
) -> None:
    """`--register` stores the map's generated wards under the run's own city (in the database,
    and for bad-devices through the API), and every device lies in one of them."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=scenarios.api_url, headers=headers, timeout=10) as api:
        for scenario, run in scenarios.runs.items():
            wards = (await api.get("/v1/areas", params={"city": run.city, "kind": "ward"})).json()
            expected = [f["id"] for f in city_areas(run.city, places=RUNS[scenario][0])]
            assert sorted(f["id"] for f in wards["features"]) == sorted(i for i in expected if ".ward." in i)
            devices = (await api.get("/v1/devices", params={"city": run.city, "limit": 1000})).json()
            for device in devices["items"]:
                in_wards = [area for area in device["areas"] if ".ward." in area]
                assert in_wards == [f"{run.city}.ward.{slug(device['district'])}"], device


class _Proxy:
    """A TCP relay to the broker whose connections the test can cut, as a flaky network does."""

    def __init__(self) -> None:
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(harness.MQTT_HOST, harness.MQTT_PORT)
        self.pairs.append((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        for downstream, upstream in self.pairs:
            downstream.transport.abort()
            upstream.transport.abort()
        self.pairs.clear()


async def test_devices_reconnect_by_themselves_and_their_wills_tell_the_drop() -> None:
    city = unique("scn-link")[:32]
    fleet = build_fleet(city, 3, places="ha-noi")
    heard: list[tuple[str, bytes]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("test-watch"))
    watcher.on_message = lambda client, userdata, message: heard.append((message.topic, message.payload))
    watcher.connect(harness.MQTT_HOST, harness.MQTT_PORT, 30)
    watcher.subscribe(f"ioc/v1/{city}/#", qos=1)
    watcher.loop_start()
    try:
        async with _Proxy() as proxy:
            settings = load_settings(mqtt_url=f"mqtt://127.0.0.1:{proxy.port}")
            run = ScenarioRun(settings, fleet, Scenario(fleet, interval_s=0.5), rate=6, duration=8)
            try:
                await run.open()
                publishing = asyncio.create_task(run.publish())
                await asyncio.sleep(2.5)
                proxy.cut()
                summary = await publishing
            finally:
                await run.close()
        await asyncio.sleep(0.5)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    for device in fleet:
        statuses = [payload for topic, payload in heard if topic == device.status_topic]
        # Online, the will when the connection was cut, online again, and cleared at the clean stop.
        assert statuses == [b"online", b"offline", b"online", b""], (device.id, statuses)
        readings = [payload for topic, payload in heard if topic == device.topic]
        assert len(readings) >= 10, (device.id, len(readings))
    assert summary.acknowledged >= summary.sent - len(fleet)
