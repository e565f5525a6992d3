"""The schema: storage tiers, versioned migrations and the per-domain readings tables."""

from __future__ import annotations

import enum
import re

from ioc_core.alarms import EXCURSION_KEY_PREFIX
from ioc_core.domains import Domain
from ioc_core.storage.severity import kind_rank_sql, reason_rank_sql

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# One lock id for every migrating process, so concurrent `ioc migrate` runs apply each step once.
MIGRATION_LOCK_ID = 0x10C_0001


class StorageTier(enum.StrEnum):
    """What the database offers, best first; the schema and queries adapt to it."""

    COMMUNITY = "timescaledb-community"
    APACHE = "timescaledb-apache"
    POSTGRES = "postgresql"

    @property
    def has_hypertables(self) -> bool:
        return self is not StorageTier.POSTGRES


def ident(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{name!r} is not a safe SQL identifier")
    return name


def area_size_sql(alias: str) -> str:
    """An area's size as the stores compare areas by it (the smaller, the more local): its bounding
    box in square degrees, rounded to 1e-8 so that boxes alike tie (and the id decides)."""
    return f"round((({alias}.max_lon - {alias}.min_lon) * ({alias}.max_lat - {alias}.min_lat))::numeric, 8)"


# The area a flood station is correlated in (processors.detection.district): the catchment that
# contains it, else its ward; of several, the one with the smallest bounding box (a sub-catchment
# within a river basin is the more local picture; boxes alike to 1e-8 square degrees tie), then
# by id. `{device}` names the device's id.
FLOOD_ZONE_AREA_SQL = (
    """(
    SELECT za.id FROM device_areas zm JOIN areas za ON za.id = zm.area_id
    WHERE zm.device_id = {device} AND za.kind IN ('catchment', 'ward')
    ORDER BY za.kind = 'catchment' DESC, """
    + area_size_sql("za")
    + """, za.id
    LIMIT 1)"""
)

# Versioned schema steps; each runs once, in order, inside the migration lock.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE devices (
            id          text PRIMARY KEY,
            city        text NOT NULL,
            domain      text NOT NULL,
            name        text,
            district    text,
            lat         double precision NOT NULL,
            lon         double precision NOT NULL,
            thresholds  jsonb NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX devices_city_domain ON devices (city, domain);

        CREATE TABLE device_state (
            device_id          text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
            ts                 timestamptz,
            seq                bigint,
            metrics            jsonb NOT NULL DEFAULT '{}',
            last_seen          timestamptz,
            status             text NOT NULL DEFAULT 'unknown'
                               CHECK (status IN ('online', 'offline', 'unknown')),
            status_changed_at  timestamptz,
            updated_at         timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        2,
        """
        -- Readings without a device timestamp are stamped with their receive time, which
        -- changes on every redelivery; their (device, seq) pairs are remembered for a window.
        CREATE TABLE reading_seqs (
            device_id  text NOT NULL,
            seq        bigint NOT NULL,
            ts         timestamptz NOT NULL,
            PRIMARY KEY (device_id, seq)
        );
        CREATE INDEX reading_seqs_ts ON reading_seqs (ts);

        -- The Kafka partition a device's records arrive on, so that each processor judges
        -- silence only for the devices whose partitions it owns and has caught up with.
        ALTER TABLE device_state ADD COLUMN bus_partition integer;
        CREATE INDEX device_state_online_last_seen ON device_state (last_seen) WHERE status = 'online';

        CREATE TABLE dead_letters (
            id            bigserial PRIMARY KEY,
            source        text NOT NULL UNIQUE,
            received_at   timestamptz NOT NULL,
            topic         text NOT NULL,
            reason        text NOT NULL,
            detail        text NOT NULL,
            payload       text NOT NULL,
            payload_size  integer NOT NULL,
            stored_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX dead_letters_reason ON dead_letters (reason, id);

        -- Events are recorded in the transaction that causes them and relayed to Kafka after.
        CREATE TABLE outbox (
            id            bigserial PRIMARY KEY,
            event_id      uuid NOT NULL UNIQUE,
            topic         text NOT NULL,
            key           text,
            payload       jsonb NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            published_at  timestamptz
        );
        CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
        """,
    ),
    (
        3,
        """
        -- One open (active or acknowledged) alarm per subject and rule, whatever the concurrency:
        -- the partial unique index is what concurrent processors race on.
        CREATE TABLE alarms (
            id                 bigserial PRIMARY KEY,
            subject            text NOT NULL,
            device_id          text,
            city               text NOT NULL,
            domain             text NOT NULL,
            district           text,
            rule               text NOT NULL,
            metric             text,
            severity           text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
            previous_severity  text,
            state              text NOT NULL DEFAULT 'active'
                               CHECK (state IN ('active', 'acknowledged', 'resolved')),
            started_at         timestamptz NOT NULL,
            last_seen_at       timestamptz NOT NULL,
            acknowledged_at    timestamptz,
            resolved_at        timestamptz,
            value              double precision,
            threshold          double precision,
            count              integer NOT NULL DEFAULT 1,
            message_vi         text NOT NULL,
            message_en         text NOT NULL,
            escalated          boolean NOT NULL DEFAULT false,
            updated_at         timestamptz NOT NULL DEFAULT now()
        );
        CREATE UNIQUE INDEX alarms_one_open ON alarms (subject, rule) WHERE state <> 'resolved';
        CREATE INDEX alarms_open_by_place ON alarms (city, domain, severity) WHERE state <> 'resolved';
        CREATE INDEX alarms_by_device ON alarms (device_id, id);

        CREATE TABLE alarm_audit (
            id        bigserial PRIMARY KEY,
            alarm_id  bigint NOT NULL REFERENCES alarms (id) ON DELETE CASCADE,
            action    text NOT NULL,
            actor     text,
            note      text,
            at        timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX alarm_audit_by_alarm ON alarm_audit (alarm_id, id);

        -- Detector state per device (EWMA, windows, rule trackers), written in the transaction
        -- that stores the readings it has seen, so a new owner after a rebalance, or a restarted
        -- processor, carries on where the last one stopped. A flood station's signal is kept
        -- beside it for district correlation across processors.
        CREATE TABLE detector_state (
            device_id     text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
            state         jsonb NOT NULL,
            flood_signal  jsonb,
            updated_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX devices_city_district ON devices (city, district);
        """,
    ),
    (
        4,
        """
        -- API keys, kept only as SHA-256 digests: a key is shown once, when it is made.
        CREATE TABLE api_keys (
            id          text PRIMARY KEY,
            name        text,
            role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
            cities      text[],
            domains     text[],
            key_hash    bytea NOT NULL UNIQUE,
            created_by  text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        );

        -- A number per (city, domain) that changes with every committed change of what screens
        -- show there (latest state, status, registry, open alarms): polled views are cached and
        -- answered 304 by it without looking at the devices.
        CREATE SEQUENCE state_version_seq;
        CREATE TABLE state_versions (
            city        text NOT NULL,
            domain      text NOT NULL,
            version     bigint NOT NULL,
            changed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (city, domain)
        );
        INSERT INTO state_versions (city, domain, version)
        SELECT p.city, p.domain, nextval('state_version_seq')
        FROM (SELECT DISTINCT city, domain FROM devices) AS p;
        CREATE INDEX devices_lon_lat ON devices (lon, lat);
        """,
    ),
    (
        5,
        """
        -- Agencies' webhook endpoints. The secret must be kept to sign with; the API shows it once.
        CREATE TABLE webhook_endpoints (
            id                 text PRIMARY KEY,
            url                text NOT NULL,
            description        text,
            secret             text NOT NULL,
            cities             text[],
            domains            text[],
            types              text[],
            min_severity       text CHECK (min_severity IN ('low', 'medium', 'high', 'critical')),
            min_severity_rank  smallint,
            escalated_only     boolean NOT NULL DEFAULT false,
            created_by         text,
            created_at         timestamptz NOT NULL DEFAULT now(),
            disabled_at        timestamptz,
            disabled_reason    text
        );

        -- One row per (endpoint, event), made in the transaction that records the event: the
        -- deliveries' own outbox. `webhook-id` is the same on every attempt.
        CREATE TABLE webhook_deliveries (
            id                 bigserial PRIMARY KEY,
            endpoint_id        text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
            message_id         text NOT NULL,
            event_type         text NOT NULL,
            body               text NOT NULL,
            state              text NOT NULL DEFAULT 'pending'
                               CHECK (state IN ('pending', 'delivered', 'failed')),
            created_at         timestamptz NOT NULL DEFAULT now(),
            window_started_at  timestamptz NOT NULL DEFAULT now(),
            next_attempt_at    timestamptz NOT NULL DEFAULT now(),
            attempts           integer NOT NULL DEFAULT 0,
            lease_owner        text,
            lease_until        timestamptz,
            last_status        integer,
            last_error         text,
            delivered_at       timestamptz,
            failed_at          timestamptz,
            failure_reason     text,
            UNIQUE (endpoint_id, message_id)
        );
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at)
            WHERE state = 'pending';
        CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
        CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (created_at)
            WHERE state <> 'pending';

        CREATE TABLE webhook_attempts (
            id               bigserial PRIMARY KEY,
            delivery_id      bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
            attempted_at     timestamptz NOT NULL,
            status_code      integer,
            latency_ms       double precision NOT NULL,
            error            text,
            response         text,
            next_attempt_at  timestamptz
        );
        CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, id);

        -- Escalation counts from when an alarm became high or critical, not from when it was
        -- raised: a warning that turns into a danger gives operators their full time again.
        ALTER TABLE alarms ADD COLUMN serious_since timestamptz, ADD COLUMN escalated_at timestamptz;
        UPDATE alarms SET serious_since = started_at
            WHERE severity IN ('high', 'critical') AND state <> 'resolved';
        CREATE INDEX alarms_unescalated ON alarms (serious_since)
            WHERE state = 'active' AND NOT escalated AND serious_since IS NOT NULL;
        """,
    ),
    (
        6,
        """
        -- A device that restarts its seq after a reboot sends new readings under seqs it used
        -- before; a copy of a message carries the same values. The remembered seqs keep a digest
        -- of the values, so only the same seq with the same values is a repeat. Entries from
        -- before this step have digest 0, which stands for any values until they expire.
        ALTER TABLE reading_seqs ADD COLUMN digest bigint NOT NULL DEFAULT 0;
        ALTER TABLE reading_seqs DROP CONSTRAINT reading_seqs_pkey;
        ALTER TABLE reading_seqs ADD PRIMARY KEY (device_id, seq, digest);
        ALTER TABLE reading_seqs ALTER COLUMN digest DROP DEFAULT;

        -- Readings with neither a device time nor a seq (SenML packs with relative times, objects
        -- without ts and seq) are stamped with their receive time. A copy that the broker
        -- redelivers (DUP flag) comes under the packet id of the first delivery, with the same
        -- values; the MQTT deliveries of such readings are remembered for a window to know it by.
        CREATE TABLE reading_deliveries (
            device_id    text NOT NULL,
            packet_id    integer NOT NULL,
            digest       bigint NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (device_id, packet_id, digest)
        );
        CREATE INDEX reading_deliveries_received_at ON reading_deliveries (received_at);
        """,
    ),
    (
        7,
        """
        -- Keys for scrapers: a metrics key reads /metrics of every component and nothing else.
        ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_role_check;
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check
            CHECK (role IN ('viewer', 'operator', 'admin', 'metrics'));
        """,
    ),
    (
        8,
        """
        -- Admin and operator actions, and refused attempts on objects outside a key's scope;
        -- written in the transaction of the change they record. `cities`/`domains` are the
        -- object's (NULL: every one), so admins limited to a scope see only entries within it.
        CREATE TABLE audit_log (
            id              bigserial PRIMARY KEY,
            at              timestamptz NOT NULL DEFAULT now(),
            event_id        uuid NOT NULL UNIQUE,
            actor_key_id    text,
            actor_name      text NOT NULL,
            client_address  text,
            action          text NOT NULL,
            object_type     text NOT NULL,
            object_id       text NOT NULL,
            outcome         text NOT NULL CHECK (outcome IN ('done', 'refused')),
            cities          text[],
            domains         text[],
            detail          jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_at ON audit_log (at);
        CREATE INDEX audit_log_by_object ON audit_log (object_type, object_id, id);
        CREATE INDEX audit_log_by_actor ON audit_log (actor_key_id, id);
        CREATE INDEX audit_log_by_action ON audit_log (action, id);
        """,
    ),
    (
        9,
        """
        -- A device's latest state and its detector state are rewritten by every batch that
        -- carries its readings. The index on last_seen made each rewrite a new row version in two
        -- indexes; without it, and with room kept free on each page, PostgreSQL rewrites the row
        -- on its page without touching an index (a HOT update). The silence sweep finds the
        -- online devices of its partitions by the partition instead, which rarely changes.
        DROP INDEX IF EXISTS device_state_online_last_seen;
        CREATE INDEX device_state_online_by_partition ON device_state (bus_partition)
            WHERE status = 'online';
        ALTER TABLE device_state SET (fillfactor = 70);
        ALTER TABLE detector_state SET (fillfactor = 70);

        -- District flood correlation reads a district's flood stations, a fifth of its devices.
        CREATE INDEX devices_flood_by_district ON devices (city, district) WHERE domain = 'flood';
        """,
    ),
    (
        10,
        f"""
        -- One excursion, one alarm: a threshold, a rate and a statistical finding about one
        -- device's metric are one open alarm (keyed by `alarm_key`, see ioc_core.alarms) whose
        -- `reasons` hold each rule it broke, by rule. `reason_joined` tells the statement that
        -- bumps an alarm whether the finding's rule was new to it (or back), for its event.
        -- The key follows from the rule and metric, so every writer agrees on it; an alarm's rule
        -- changes only between kinds that share the key.
        ALTER TABLE alarms
            ADD COLUMN alarm_key text NOT NULL GENERATED ALWAYS AS (
                CASE WHEN metric IS NOT NULL AND {kind_rank_sql("rule")} > 0
                     THEN '{EXCURSION_KEY_PREFIX}' || metric ELSE rule END) STORED,
            ADD COLUMN reasons jsonb NOT NULL DEFAULT '{{}}',
            ADD COLUMN reason_joined boolean NOT NULL DEFAULT false;
        UPDATE alarms SET
            reasons = jsonb_build_object(rule, jsonb_build_object(
                'severity', severity, 'active', state <> 'resolved', 'value', value,
                'threshold', threshold, 'count', count, 'first_seen_at', started_at,
                'last_seen_at', last_seen_at, 'cleared_at', resolved_at,
                'message_vi', message_vi, 'message_en', message_en));

        -- Open alarms that are now one excursion merge into the most severe of them; the others
        -- are resolved with a note in their audit trail that names the alarm they joined.
        WITH ranked AS (
            SELECT id, reasons, count, started_at, last_seen_at,
                   first_value(id) OVER w AS survivor, row_number() OVER w AS n
            FROM alarms WHERE state <> 'resolved'
            WINDOW w AS (PARTITION BY subject, alarm_key
                         ORDER BY {reason_rank_sql("severity", "rule")} DESC, id)
        ), absorbed AS (
            SELECT * FROM ranked WHERE n > 1
        ), folded AS (
            SELECT b.survivor, jsonb_object_agg(r.key, r.value) AS reasons, max(b.count) AS count,
                   min(b.started_at) AS started_at, max(b.last_seen_at) AS last_seen_at
            FROM absorbed b, jsonb_each(b.reasons) r
            GROUP BY b.survivor
        ), closed AS (
            UPDATE alarms a SET state = 'resolved', resolved_at = now(), updated_at = now()
            FROM absorbed b WHERE a.id = b.id
            RETURNING a.id, b.survivor
        ), noted AS (
            INSERT INTO alarm_audit (alarm_id, action, actor, note)
            SELECT id, 'resolved', NULL, 'merged into alarm ' || survivor || ', the same excursion'
            FROM closed
        )
        UPDATE alarms a SET reasons = f.reasons || a.reasons, count = greatest(a.count, f.count),
                            started_at = least(a.started_at, f.started_at),
                            last_seen_at = greatest(a.last_seen_at, f.last_seen_at), updated_at = now()
        FROM folded f WHERE a.id = f.survivor;

        DROP INDEX alarms_one_open;
        CREATE UNIQUE INDEX alarms_one_open ON alarms (subject, alarm_key) WHERE state <> 'resolved';
        """,
    ),
    (
        11,
        """
        -- Areas on the map (see ioc_core.areas): the GeoJSON MultiPolygon as sent, normalised,
        -- with its bounding box, which the shapely path filters by; where PostGIS is enabled a
        -- `geom` column and GiST indexes join them (migrations.enable_postgis).
        CREATE TABLE areas (
            id          text PRIMARY KEY,
            city        text NOT NULL,
            kind        text NOT NULL CHECK (kind IN ('province', 'ward', 'catchment', 'pressure_zone',
                                                      'feeder_zone', 'custom')),
            name_vi     text NOT NULL,
            name_en     text,
            code        text,
            parent      text REFERENCES areas (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED,
            geometry    jsonb NOT NULL,
            min_lon     double precision NOT NULL,
            min_lat     double precision NOT NULL,
            max_lon     double precision NOT NULL,
            max_lat     double precision NOT NULL,
            vertices    integer NOT NULL,
            extra       jsonb NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX areas_by_city_kind ON areas (city, kind, id);
        CREATE INDEX areas_by_parent ON areas (parent) WHERE parent IS NOT NULL;

        -- Which areas each device lies in, kept by the stores whenever a device or an area
        -- changes; what the API's `areas` and `area=` read.
        CREATE TABLE device_areas (
            device_id  text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            area_id    text NOT NULL REFERENCES areas (id) ON DELETE CASCADE,
            PRIMARY KEY (device_id, area_id)
        );
        CREATE INDEX device_areas_by_area ON device_areas (area_id, device_id);
        -- The shapely path finds an area's devices by its bounding box.
        CREATE INDEX devices_by_location ON devices (lat, lon);
        """,
    ),
    (
        12,
        """
        -- Networks of cities: a region groups cities, so a regional centre sees the chain at a
        -- glance (GET /v1/summary?region=) and a key may be scoped to a region, following its
        -- cities as they change. Seeded with the Red River delta's growth triangle.
        CREATE TABLE regions (
            id          text PRIMARY KEY,
            name_vi     text NOT NULL,
            name_en     text,
            cities      text[] NOT NULL CHECK (cardinality(cities) > 0),
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO regions (id, name_vi, name_en, cities) VALUES (
            'red-river-delta-triangle', 'Tam giác tăng trưởng Hà Nội – Hải Phòng – Quảng Ninh',
            'Hà Nội – Hải Phòng – Quảng Ninh growth triangle', ARRAY['ha-noi', 'hai-phong', 'quang-ninh']);
        ALTER TABLE api_keys ADD COLUMN regions text[];
        -- A ward office's key: it sees the devices (and their alarms) in these areas only.
        ALTER TABLE api_keys ADD COLUMN areas text[];

        -- A ward office's endpoint gets the events of its ward's devices only.
        ALTER TABLE webhook_endpoints ADD COLUMN areas text[];
        """,
    ),
    (
        13,
        f"""
        -- Flood correlation by area (processors.detection.district): a station is judged with the
        -- other stations of its zone, the catchment that contains it or else its ward (a device
        -- in no such area keeps its registered `district`). The zone is kept beside the signal
        -- so that a zone's signals are read by one index, as the processor saw them.
        ALTER TABLE detector_state ADD COLUMN flood_zone text;
        CREATE INDEX detector_state_by_flood_zone ON detector_state (flood_zone)
            WHERE flood_zone IS NOT NULL;
        UPDATE detector_state s
        SET flood_zone = coalesce('area:' || {FLOOD_ZONE_AREA_SQL.format(device="d.id")},
                                  'district:' || d.city || ':' || d.district)
        FROM devices d
        WHERE d.id = s.device_id AND d.domain = 'flood' AND s.flood_signal IS NOT NULL;
        -- The areas of an alarm with no device (a zone's flood alarm): the zone and the areas its
        -- stations lie in, so a ward office sees the catchment alarm over its ward.
        ALTER TABLE alarms ADD COLUMN areas text[];
        CREATE INDEX alarms_open_by_area ON alarms USING gin (areas)
            WHERE state <> 'resolved' AND areas IS NOT NULL;
        DROP INDEX IF EXISTS devices_flood_by_district;
        """,
    ),
    (
        14,
        """
        -- Replayable dead letters: the payload byte for byte (up to the 64 KiB payload limit), the
        -- device the topic names (registered or not), how the broker delivered the message, and
        -- the replay: when it went back into the pipeline (once), or why it was refused again.
        ALTER TABLE dead_letters
            ADD COLUMN raw                  bytea,
            ADD COLUMN device_id            text,
            ADD COLUMN mqtt                 jsonb,
            ADD COLUMN replayed_at          timestamptz,
            ADD COLUMN replay_attempted_at  timestamptz,
            ADD COLUMN replay_reason        text,
            ADD COLUMN replay_detail        text;
        -- Letters stored before kept only a UTF-8 excerpt: where it is the whole payload without a
        -- replacement character, it is the payload exactly; the others cannot be replayed.
        UPDATE dead_letters
        SET device_id = substring(
                topic FROM '^ioc/v1/[^/]*/[^/]*/([A-Za-z0-9_.-]{1,64})/(?:telemetry|status)$'),
            raw = CASE WHEN topic LIKE 'ioc/v1/%' AND strpos(payload, chr(65533)) = 0
                            AND octet_length(payload) = payload_size
                       THEN convert_to(payload, 'UTF8') END;
        CREATE INDEX dead_letters_by_device ON dead_letters (device_id, id) WHERE device_id IS NOT NULL;
        -- Retention deletes by receive time; replay filters by it.
        CREATE INDEX dead_letters_by_received_at ON dead_letters (received_at);
        """,
    ),
    (
        15,
        """
        -- Maintenance windows (ioc_core.maintenance): a planned outage of one device, an area, a
        -- city's domain or a whole city. `city`/`domain` are also kept for a device's or an area's
        -- window, for scope checks; `target` says which columns select the devices.
        CREATE TABLE maintenance_windows (
            id          text PRIMARY KEY,
            target      text NOT NULL CHECK (target IN ('device', 'area', 'domain', 'city')),
            device_id   text,
            area_id     text,
            city        text,
            domain      text,
            starts_at   timestamptz NOT NULL,
            ends_at     timestamptz NOT NULL CHECK (ends_at > starts_at),
            rrule       text,
            reason      text NOT NULL,
            owner       text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            -- Removed: kept, with its occurrences cut short, until the processor has handled their
            -- end (devices still offline raise their alarm then), and purged after.
            deleted_at  timestamptz,
            CHECK ((target = 'device') = (device_id IS NOT NULL)),
            CHECK ((target = 'area') = (area_id IS NOT NULL))
        );
        -- Every occurrence, expanded once when the window is stored (rules are bounded), so that
        -- "is this device in a window at t" is one indexed lookup inside the processor's batch.
        -- `closed_at`: when the processor handled the occurrence's end (raising what persists).
        CREATE TABLE maintenance_occurrences (
            window_id   text NOT NULL REFERENCES maintenance_windows (id) ON DELETE CASCADE,
            starts_at   timestamptz NOT NULL,
            ends_at     timestamptz NOT NULL,
            closed_at   timestamptz,
            PRIMARY KEY (window_id, starts_at)
        );
        CREATE INDEX maintenance_occurrences_by_end ON maintenance_occurrences (ends_at, starts_at);
        CREATE INDEX maintenance_occurrences_to_close ON maintenance_occurrences (ends_at)
            WHERE closed_at IS NULL;
        -- An alarm raised inside a window: recorded, but sent to no agency, never escalated and
        -- left out of the screens' open-alarm figures until its window ends.
        ALTER TABLE alarms ADD COLUMN suppressed boolean NOT NULL DEFAULT false;
        CREATE INDEX alarms_open_suppressed ON alarms (id) WHERE suppressed AND state <> 'resolved';
        """,
    ),
    (
        16,
        """
        -- Rules at run time (ioc_core.rules, storage.rules): a domain's default rules overridden
        -- for a city, an area or a device, key by key, as {metric: {key: value}} like a device's
        -- thresholds. `version` is the rules version the override last changed at.
        CREATE TABLE rule_overrides (
            level       text NOT NULL CHECK (level IN ('city', 'area', 'device')),
            scope_id    text NOT NULL,
            domain      text NOT NULL,
            rules       jsonb NOT NULL,
            version     bigint NOT NULL,
            updated_by  text NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            -- An area's or a device's overrides go with it.
            area_id     text REFERENCES areas (id) ON DELETE CASCADE,
            device_id   text REFERENCES devices (id) ON DELETE CASCADE,
            PRIMARY KEY (level, scope_id, domain),
            CHECK ((level = 'area') = (area_id IS NOT NULL)),
            CHECK (area_id IS NULL OR area_id = scope_id),
            CHECK ((level = 'device') = (device_id IS NOT NULL)),
            CHECK (device_id IS NULL OR device_id = scope_id)
        );
        CREATE INDEX rule_overrides_by_area ON rule_overrides (area_id) WHERE area_id IS NOT NULL;
        CREATE INDEX rule_overrides_by_device ON rule_overrides (device_id) WHERE device_id IS NOT NULL;
        -- One counter for every change of any override: processors compare it every few seconds
        -- (IOC_RULES_REFRESH_S) and read their devices' rules again when it moved. A counter row,
        -- not max(version) of a sequence: its row lock orders the writers, so a change that
        -- commits late cannot carry a smaller number than one already seen.
        CREATE TABLE rules_version (
            only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            version   bigint NOT NULL
        );
        INSERT INTO rules_version (only_row, version) VALUES (true, 0);
        -- Overrides removed with their area or device move the counter as well.
        CREATE FUNCTION rule_overrides_removed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE rules_version SET version = version + 1;
            RETURN NULL;
        END $$;
        CREATE TRIGGER rule_overrides_removed AFTER DELETE ON rule_overrides
            FOR EACH STATEMENT EXECUTE FUNCTION rule_overrides_removed();
        """,
    ),
    (
        17,
        """
        -- Incidents and agencies (ioc_core.incidents). An agency is a record the incidents are
        -- assigned to; its webhook endpoints hear of the assignment, its escalation endpoint of
        -- an assignment left unacknowledged.
        CREATE TABLE agencies (
            id                     text PRIMARY KEY,
            name_vi                text NOT NULL,
            name_en                text,
            domains                text[],
            cities                 text[],
            areas                  text[],
            webhook_ids            text[] NOT NULL DEFAULT '{}',
            escalation_webhook_id  text,
            escalation_contact     text,
            created_by             text,
            created_at             timestamptz NOT NULL DEFAULT now(),
            updated_at             timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE incidents (
            id                bigserial PRIMARY KEY,
            city              text NOT NULL,
            kind              text NOT NULL,
            domain            text NOT NULL,
            -- The area the incident's alarms were grouped by; NULL: the city as a whole.
            area_id           text,
            title_vi          text NOT NULL,
            title_en          text NOT NULL,
            severity          text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
            state             text NOT NULL DEFAULT 'open' CHECK (
                                  state IN ('open', 'acknowledged', 'in_progress', 'resolved', 'closed')),
            automatic         boolean NOT NULL,
            agency_id         text REFERENCES agencies (id) ON DELETE SET NULL,
            assigned_at       timestamptz,
            escalated_at      timestamptz,
            escalate_after_s  double precision NOT NULL,
            checklist         jsonb NOT NULL DEFAULT '[]',
            areas             text[] NOT NULL DEFAULT '{}',
            opened_at         timestamptz NOT NULL DEFAULT now(),
            last_alarm_at     timestamptz NOT NULL DEFAULT now(),
            acknowledged_at   timestamptz,
            resolved_at       timestamptz,
            closed_at         timestamptz,
            updated_at        timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX incidents_open_by_place ON incidents (city, kind, area_id)
            WHERE state NOT IN ('resolved', 'closed');
        CREATE INDEX incidents_unacknowledged ON incidents (assigned_at)
            WHERE state = 'open' AND agency_id IS NOT NULL AND escalated_at IS NULL;
        -- An alarm belongs to one incident at most.
        CREATE TABLE incident_alarms (
            alarm_id     bigint PRIMARY KEY REFERENCES alarms (id) ON DELETE CASCADE,
            incident_id  bigint NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
            joined_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX incident_alarms_by_incident ON incident_alarms (incident_id, alarm_id);
        CREATE TABLE incident_timeline (
            id           bigserial PRIMARY KEY,
            incident_id  bigint NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
            at           timestamptz NOT NULL DEFAULT now(),
            actor        text,
            action       text NOT NULL,
            note         text,
            detail       jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX incident_timeline_by_incident ON incident_timeline (incident_id, id);
        -- A city's own version of a kind's standard operating procedure.
        CREATE TABLE incident_procedures (
            city              text NOT NULL,
            kind              text NOT NULL,
            title_vi          text NOT NULL,
            title_en          text NOT NULL,
            escalate_after_s  double precision NOT NULL,
            checklist         jsonb NOT NULL,
            updated_by        text,
            updated_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (city, kind)
        );
        """,
    ),
    (
        18,
        """
        -- Detector state as the JSON text the processor writes and reads whole, not jsonb: nothing
        -- queries inside it, and as jsonb every save parsed each number of a daily profile into a
        -- numeric and grew the document past the 2 KB at which PostgreSQL compresses a row (2.6 KB
        -- as jsonb for a median 1.4 KB of text), so each update of each device was compressed
        -- with pglz: over half the database's time at 100,000 devices. What still passes 2 KB is
        -- compressed with lz4, many times faster, where the server has it.
        ALTER TABLE detector_state ALTER COLUMN state TYPE text USING state::text;
        DO $$
        BEGIN
            ALTER TABLE detector_state ALTER COLUMN state SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
            NULL;  -- a server built without lz4 keeps its default
        END
        $$;
        """,
    ),
    (
        19,
        """
        -- A counter that moves whenever anything a processor reads of a registered device for
        -- detection may have changed: the device's row (thresholds, name, district, place), or
        -- any area (which areas a device lies in, and so a flood station's zone and its area
        -- overrides). Processors compare it with the rules version every IOC_RULES_REFRESH_S and
        -- read their devices' profiles again only when one moved: re-reading every profile every
        -- IOC_REGISTRY_REFRESH_S was 3,300 profile rows a second at 100,000 devices. A device
        -- registered anew needs no move: no processor holds its profile yet.
        CREATE TABLE device_profiles_version (
            only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            version   bigint NOT NULL
        );
        INSERT INTO device_profiles_version (only_row, version) VALUES (true, 0);
        CREATE FUNCTION device_profiles_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE device_profiles_version SET version = version + 1;
            RETURN NULL;
        END $$;
        CREATE TRIGGER device_profiles_changed AFTER UPDATE OR DELETE ON devices
            FOR EACH STATEMENT EXECUTE FUNCTION device_profiles_changed();
        CREATE TRIGGER device_profiles_changed AFTER INSERT OR UPDATE OR DELETE ON areas
            FOR EACH STATEMENT EXECUTE FUNCTION device_profiles_changed();
        """,
    ),
)


def domain_table_ddl(domain: Domain, tier: StorageTier) -> list[str]:
    """Create or extend a domain's readings table; safe to run at every migration."""
    table = ident(domain.table)
    columns = [f"{ident(m.column)} double precision" for m in domain.metrics]
    statements = [
        f"""
        CREATE TABLE IF NOT EXISTS {table} (
            ts           timestamptz NOT NULL,
            device_id    text NOT NULL,
            seq          bigint,
            received_at  timestamptz NOT NULL,
            {", ".join(columns)},
            PRIMARY KEY (device_id, ts)
        )
        """,
        *(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}" for column in columns),
    ]
    if tier.has_hypertables:
        statements.append(
            f"SELECT create_hypertable('{table}', 'ts', chunk_time_interval => INTERVAL '1 day', "
            "if_not_exists => TRUE, migrate_data => TRUE)"
        )
    return statements
