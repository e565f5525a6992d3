"""Settings from the environment (`IOC_` prefix), with secrets kept as `SecretStr`."""

from __future__ import annotations

import ipaddress
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ioc_core.bus import Topics
from ioc_core.domains import DOMAINS
from ioc_core.errors import ConfigurationError
from ioc_core.sealing import SecretSealer
from ioc_core.telemetry import CITY_PATTERN

# The placeholders of example files (`change-me`, `changeme`, `CHANGE_ME-admin`, ...): a secret
# that still holds one was never set, and anyone who read the example knows it.
PLACEHOLDER = re.compile(r"change[-_ ]?me", re.IGNORECASE)


class MqttEndpoint(BaseModel):
    host: str
    port: int
    tls: bool
    username: str | None
    password: SecretStr | None


class RateLimit(BaseModel):
    """A token bucket: `burst` requests at once, refilled at `rate` requests a second."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = Field(gt=0, le=1_000_000, description="requests a second, sustained")
    burst: int = Field(ge=1, le=1_000_000, description="requests at once, after a quiet spell")


class Settings(BaseSettings):
    """Every setting of every component; each component reads the ones it needs."""

    model_config = SettingsConfigDict(env_prefix="IOC_", extra="ignore", frozen=True)

    mqtt_url: SecretStr = Field(
        default=SecretStr("mqtt://127.0.0.1:1883"),
        description="MQTT broker; credentials may be in the URL (mqtt:// or mqtts://).",
    )
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="copies of each partition in the topics the system creates; unset, 3 on a cluster"
        " of three or more brokers, else one per broker",
    )
    kafka_min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="copies a write must reach before Kafka acknowledges it (the topics'"
        " min.insync.replicas); unset, 2 when there are three copies or more, else 1",
    )
    kafka_linger_ms: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="how long a producer waits to fill a batch before sending it",
    )
    kafka_compression: Literal["none", "gzip", "lz4", "zstd"] = Field(
        default="none",
        description="compression of the batches producers send (none on one machine; lz4 or zstd"
        " across a network)",
    )
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/ioc")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    admin_api_key: SecretStr | None = None
    secrets_key: SecretStr | None = Field(
        default=None,
        description="the key webhook signing secrets are sealed with at rest (Fernet: 32 random bytes in"
        " URL-safe base64; `ioc secrets-key` makes one). Needed by `ioc api`, `ioc webhooks` and"
        " `ioc processor` with its webhook worker; `ioc up` makes and keeps its own",
    )
    secrets_old_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="earlier values of IOC_SECRETS_KEY, comma-separated: what they sealed still opens,"
        " and `ioc migrate` re-seals it with the current key",
    )
    api_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of the API; with IOC_API_TLS_KEY_FILE the API serves HTTPS",
    )
    api_tls_key_file: Path | None = Field(
        default=None, description="PEM private key of the API's certificate"
    )
    mqtt_admin_url: SecretStr | None = Field(
        default=None,
        description="the broker's dynamic-security admin as mqtt://user:password@host:port; when set,"
        " registering a device creates its own MQTT account",
    )
    webhook_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="networks (CIDRs, comma-separated or a JSON list) that webhook URLs may reach"
        " besides globally routable addresses: on-premise agencies, tests; cloud metadata addresses"
        " stay refused",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="deprecated (one release): true adds RFC 1918 and loopback to"
        " IOC_WEBHOOK_ALLOWED_NETWORKS",
    )
    webhook_worker: bool = Field(
        default=True,
        description="run the webhook delivery worker inside `ioc processor` (and `ioc up`); turn off"
        " where `ioc webhooks` runs it on its own",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120, description="one attempt's time limit")
    webhook_concurrency: int = Field(
        default=4, ge=1, le=100, description="requests in flight to one endpoint, across all workers"
    )
    webhook_retry_window_s: float = Field(
        default=86_400,
        gt=0,
        description="how long a failing delivery is retried before it is marked failed",
    )
    webhook_backoff_initial_s: float = Field(
        default=2.0, gt=0, description="wait after the first failed attempt; doubles after each"
    )
    webhook_backoff_max_s: float = Field(default=900.0, gt=0, description="longest wait between attempts")
    webhook_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="how often a worker looks for due retries (new deliveries wake it at once)",
    )
    webhook_log_days: float = Field(
        default=30, gt=0, description="days delivered and failed webhook deliveries stay in the log"
    )
    cap_sender: str | None = Field(
        default=None,
        pattern=r"^[^\s,&<]{1,255}$",
        description="the `sender` of public CAP warnings (e.g. ioc@hai-phong.gov.vn); unset, ioc@ and"
        " the host name the feed was asked for",
    )
    escalate_after_s: dict[str, float] = Field(
        default_factory=dict,
        description="per-domain seconds after which an unacknowledged high or critical alarm is"
        " escalated (overrides the domains' defaults)",
    )

    gateway_client_id: str = Field(
        default="ioc-gateway",
        description="MQTT client id of the gateway; fixed so the broker keeps its session across restarts.",
    )
    gateway_share_group: str = Field(
        default="ioc-gateway",
        description="MQTT shared-subscription group; gateways in one group split the telemetry.",
    )
    gateway_cities: list[str] = Field(
        default_factory=list,
        description="cities this gateway takes telemetry for (JSON list); empty means every city",
    )
    gateway_health_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        description="port of the gateway's /health, /ready and /metrics; 0 turns it off",
    )
    database_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="longest a database statement may take (server statement_timeout, and the client's"
        " wait on a server that hangs); past it the work is retried",
    )
    processor_health_port: int = Field(
        default=8082,
        ge=0,
        le=65535,
        description="port of the processor's /health, /ready and /metrics (lag by partition); 0 is off",
    )
    mqtt_session_expiry_s: int = Field(default=86_400, ge=0)
    gateway_queue_size: int = Field(default=10_000, ge=1)
    registry_refresh_s: float = Field(default=30.0, gt=0)
    # -- rules at run time (ioc_core.rules, storage.rules) --
    rules_refresh_s: float = Field(
        default=3.0,
        gt=0,
        description="how often processors compare the rules version, reading their devices' rules again"
        " when an override was stored or removed (how soon a rule change is in force)",
    )

    processor_group_id: str = "ioc-processor"
    processor_batch_max: int = Field(default=5_000, ge=1)
    processor_state_cache_mb: int = Field(
        default=64,
        ge=0,
        description="memory a processor keeps its devices' detector state in (0.4-3.4 KB each);"
        " past it, devices not held have theirs read from the database with their readings",
    )
    processor_state_write_s: float = Field(
        default=60.0,
        ge=0,
        description="how long a held detector state whose alarms did not change may go unwritten"
        " (0: every batch writes it); a processor that dies loses at most this much of its devices'"
        " baseline learning, never a reading or an alarm",
    )
    topic_partitions: int = Field(default=6, ge=1)
    topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]{0,100}$",
        description="prepended to every Kafka topic name, for several deployments on one cluster",
    )
    seq_window_s: float = Field(
        default=3600,
        gt=0,
        description="how long a (device, seq) pair counts as a repeat when the payload has no ts",
    )
    offline_after_s: dict[str, float] = Field(
        default_factory=dict,
        description="per-domain seconds of silence after which a device is offline (overrides)",
    )
    silence_check_s: float = Field(
        default=10.0, gt=0, description="how often processors look for silent devices"
    )
    outbox_poll_s: float = Field(
        default=1.0, gt=0, description="how often recorded events are relayed at the latest"
    )
    # -- maintenance windows (ioc_core.maintenance) --
    maintenance_check_s: float = Field(
        default=2.0,
        gt=0,
        description="how often processors look for maintenance windows that ended, to raise what"
        " outlived them (suppressed alarms still open, devices still offline)",
    )
    # -- incidents (ioc_core.incidents) --
    incident_window_s: float = Field(
        default=7200.0,
        gt=0,
        description="an alarm joins the open incident of its place and kind whose last alarm came"
        " within this many seconds; else it opens one",
    )
    incident_check_s: float = Field(
        default=2.0, gt=0, description="how often processors group new alarms and escalate assignments"
    )

    fault_exit_after_batches: int = Field(
        default=0,
        ge=0,
        description="fault injection for tests: a processor exits abruptly after writing this many"
        " batches, before committing the last one's offsets; 0 (the default) never",
    )

    log_level: str = "INFO"

    data_dir: Path = Field(
        default=Path(".ioc-data"),
        description="where `ioc up` keeps the data of its embedded services and its admin key",
    )
    embedded_mqtt_port: int = Field(
        default=1883,
        ge=0,
        le=65535,
        description="port of the broker `ioc up` embeds when IOC_MQTT_URL is unset",
    )
    embedded_postgres_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of the PostgreSQL `ioc up` embeds when IOC_DATABASE_URL is unset; 0 picks a free"
        " one on the first run and keeps it",
    )
    simulator_city: str = Field(
        default="ha-noi", pattern=r"^[a-z0-9-]{1,32}$", description="the city `ioc up` simulates"
    )
    simulator_devices: int = Field(
        default=50, ge=0, le=100_000, description="devices `ioc up` simulates; 0 runs no simulator"
    )

    retention_days: int = Field(
        default=90, gt=0, description="days readings are kept; aggregates are kept several times longer"
    )
    compress_after_days: int = Field(
        default=7,
        gt=0,
        description="days after which a day's readings are compressed (community TimescaleDB: about a"
        " tenth of the disk; late readings still go in)",
    )
    reader_db_password: SecretStr | None = Field(
        default=None,
        description="password `ioc migrate` gives the database's read-only role ioc_reader (Grafana"
        " connects as it); unset, the role cannot log in",
    )
    postgis: bool = Field(
        default=True,
        description="`ioc migrate` enables PostGIS for areas where the server has it (else, and when"
        " false, areas are computed with shapely: the same answers, slower for big cities)",
    )
    area_max_vertices: int = Field(
        default=100_000, ge=4, le=10_000_000, description="vertices one area's geometry may have"
    )
    retention_check_s: float = Field(
        default=3600, gt=0, description="how often a processor drops readings older than the retention"
    )
    audit_retention_days: float = Field(
        default=365, gt=0, description="days entries stay in the audit log of admin and operator actions"
    )
    # -- dead letters (ioc_core.storage.dead_letters, api.replay) --
    dead_letter_retention_days: float = Field(
        default=14,
        gt=0,
        description="days dead letters are kept (replayed or not); processors prune older ones every"
        " IOC_RETENTION_CHECK_S",
    )
    dead_letter_replay_batch: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="the most dead letters one replay request sends back into the pipeline; the answer's"
        " `next` continues after them",
    )

    api_max_streams: int = Field(
        default=100, ge=1, description="concurrent /v1/stream connections one API process serves"
    )
    stream_heartbeat_s: float = Field(
        default=15.0, gt=0, description="seconds between SSE heartbeat comments on an idle stream"
    )
    state_event_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="processors send a device's changed latest state on ioc.events at most this often",
    )
    api_max_series_points: int = Field(
        default=10_000, ge=10, description="the most buckets one series request may ask for"
    )
    api_key_cache_s: float = Field(
        default=5.0, ge=0, description="how long the API trusts a looked-up API key (revocation delay)"
    )
    api_max_series_rows: int = Field(
        default=1_000_000,
        ge=100,
        description="the most stored rows one series request may read (readings, or rollup rows"
        " where a continuous aggregate serves it)",
    )
    api_max_exports: int = Field(
        default=2,
        ge=1,
        description="history exports (/v1/export) one API process runs at once; each holds a database"
        " connection until its last row is sent (429 beyond)",
    )
    api_max_export_days: int = Field(
        default=366, ge=1, description="the longest range one history export may span, in days (400 beyond)"
    )
    api_max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="the largest request body the API takes (413 beyond)"
    )
    api_client_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="how long the API waits on a client: to send a request's head (the connection"
        " closes beyond), then its body (408 beyond), and to take in an answer it stopped reading"
        " (the connection is dropped beyond)",
    )
    api_max_header_bytes: int = Field(
        default=16_384,
        ge=1024,
        le=1_048_576,
        description="the largest request line and headers the API reads (431 beyond)",
    )
    api_max_in_flight: int = Field(
        default=100,
        ge=1,
        description="requests one API process works on at once, event streams aside (503 beyond)",
    )
    api_max_connections: int = Field(
        default=1000,
        ge=2,
        description="open connections one API process serves, idle and streaming ones included; past"
        " it the HTTP server itself answers a plain 503",
    )
    api_statement_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="longest a database statement of the API may take (at most IOC_DATABASE_TIMEOUT_S);"
        " past it the request answers 503",
    )
    stream_resume_window_s: float = Field(
        default=900.0,
        gt=0,
        description="how far back a Last-Event-ID may resume the event stream; older ones answer 409",
    )
    api_rate_limit_viewer: RateLimit = Field(
        default=RateLimit(rate=20, burst=100),
        description="requests a viewer key may make, per API process (JSON {rate, burst})",
    )
    api_rate_limit_operator: RateLimit = Field(
        default=RateLimit(rate=20, burst=100),
        description="requests an operator key may make, per API process (JSON {rate, burst})",
    )
    api_rate_limit_admin: RateLimit = Field(
        default=RateLimit(rate=50, burst=200),
        description="requests an admin key may make, per API process (JSON {rate, burst})",
    )
    api_rate_limit_anonymous: RateLimit = Field(
        default=RateLimit(rate=10, burst=100),
        description="requests without a valid key (health, public feed, the page), per client address"
        " (IPv6: per /64) and API process (JSON {rate, burst})",
    )
    api_rate_limit_buckets: int = Field(
        default=100_000,
        ge=100,
        description="rate-limit buckets (keys and client addresses) one API process keeps; past it the"
        " least recently seen are dropped",
    )
    map_tiles_url: str | None = Field(
        default=None,
        description="XYZ tile URL template for the operations page's map (e.g. a city's own tile"
        " server); unset, the map draws devices on a plain background and fetches nothing outside",
    )
    map_tiles_attribution: str = Field(default="", description="attribution shown under the tiles")

    @field_validator("secrets_old_keys", mode="before")
    @classmethod
    def _split_old_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.api_tls_cert_file is None) != (self.api_tls_key_file is None):
            raise ValueError(
                "IOC_API_TLS_CERT_FILE and IOC_API_TLS_KEY_FILE go together: set both or neither"
            )
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError("IOC_MQTT_URL must look like mqtt://[user:password@]host[:port]")
        return value

    @field_validator("mqtt_admin_url")
    @classmethod
    def _check_mqtt_admin_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname or not parts.username:
            raise ValueError("IOC_MQTT_ADMIN_URL must look like mqtt://user:password@host[:port]")
        return value

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                networks.append(ipaddress.ip_network(item) if isinstance(item, str) else item)
            except ValueError as exc:
                # Strict: 10.20.0.1/16 is a typo for a host or for a network, not a guess to make.
                raise ValueError(f"IOC_WEBHOOK_ALLOWED_NETWORKS: {exc}") from exc
        return networks

    @field_validator("kafka_min_insync_replicas")
    @classmethod
    def _check_min_insync(cls, value: int | None, info: ValidationInfo) -> int | None:
        copies = info.data.get("kafka_replication_factor")
        if value is not None and copies is not None and value > copies:
            # Kafka would accept such a topic, and then refuse every write to it.
            raise ValueError(
                f"IOC_KAFKA_MIN_INSYNC_REPLICAS ({value}) exceeds IOC_KAFKA_REPLICATION_FACTOR ({copies})"
            )
        return value

    @field_validator("api_max_connections")
    @classmethod
    def _check_max_connections(cls, value: int, info: ValidationInfo) -> int:
        in_flight = info.data.get("api_max_in_flight")
        streams = info.data.get("api_max_streams")
        if in_flight is not None and streams is not None and value <= in_flight + streams:
            # Below that the HTTP server's own plain 503 would come before the API's answers.
            raise ValueError(
                f"IOC_API_MAX_CONNECTIONS ({value}) must exceed IOC_API_MAX_IN_FLIGHT ({in_flight})"
                f" + IOC_API_MAX_STREAMS ({streams})"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("IOC_DATABASE_URL must look like postgresql://user@host:port/database")
        return value

    @field_validator("gateway_cities")
    @classmethod
    def _check_cities(cls, value: list[str]) -> list[str]:
        for city in value:
            if not CITY_PATTERN.fullmatch(city):
                raise ValueError(f"IOC_GATEWAY_CITIES: {city!r} is not a city slug")
        return value

    @field_validator("offline_after_s", "escalate_after_s")
    @classmethod
    def _check_per_domain_seconds(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for domain, seconds in value.items():
            if domain not in DOMAINS or not seconds > 0:
                raise ValueError(
                    f"IOC_{(info.field_name or '').upper()}: {domain!r}={seconds!r} is not a domain and a"
                    " positive number"
                )
        return value

    def escalate_after(self) -> dict[str, float]:
        """Seconds an active high or critical alarm of each domain may wait for acknowledgement."""
        return {
            name: self.escalate_after_s.get(name, d.escalate_after.total_seconds())
            for name, d in DOMAINS.items()
        }

    def offline_after(self) -> dict[str, float]:
        """Seconds of silence after which a device of each domain counts as offline."""
        return {
            name: self.offline_after_s.get(name, d.offline_after.total_seconds())
            for name, d in DOMAINS.items()
        }

    @property
    def api_timeout_s(self) -> float:
        """The statement timeout of the API's database connections: the API's own, never longer
        than any component's."""
        return min(self.api_statement_timeout_s, self.database_timeout_s)

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @cached_property
    def mqtt(self) -> MqttEndpoint:
        return mqtt_endpoint(self.mqtt_url.get_secret_value(), "IOC_MQTT_URL")

    def sealer(self) -> SecretSealer:
        """What seals and opens webhook signing secrets; refuses when no key is configured."""
        found = self.sealer_if_configured()
        if found is None:
            raise ConfigurationError(
                "IOC_SECRETS_KEY is not set: webhook signing secrets are kept sealed with it; make one"
                " with `ioc secrets-key` and give the same to every component"
            )
        return found

    def sealer_if_configured(self) -> SecretSealer | None:
        """The sealer when a key is set; a key that is not one is refused here (after the check for
        placeholders, so that `change-me` is named as such)."""
        if self.secrets_key is None:
            return None
        return SecretSealer(
            self.secrets_key.get_secret_value(), [k.get_secret_value() for k in self.secrets_old_keys]
        )

    @property
    def api_tls(self) -> tuple[Path, Path] | None:
        """The API's certificate and key files, when it serves HTTPS."""
        if self.api_tls_cert_file is None or self.api_tls_key_file is None:
            return None
        return self.api_tls_cert_file, self.api_tls_key_file

    def placeholder_secrets(self) -> list[str]:
        """The secret settings (by variable name) whose value still holds a placeholder."""
        found = []
        for name, value in self.model_dump().items():
            values = value if isinstance(value, list) else [value]
            secrets = [v.get_secret_value() for v in values if isinstance(v, SecretStr)]
            if any(PLACEHOLDER.search(secret) for secret in secrets):
                found.append(f"IOC_{name.upper()}")
        return found

    def masked(self) -> dict[str, Any]:
        """The settings as printed in logs and by the CLI: secrets never appear in clear."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                shown[name] = _mask_url(value.get_secret_value()) if name.endswith("_url") else "**********"
            elif isinstance(value, list) and any(isinstance(v, SecretStr) for v in value):
                shown[name] = ["**********" for _ in value]
            elif isinstance(value, Path):
                shown[name] = str(value)
            elif (
                isinstance(value, list)
                and value
                and isinstance(value[0], (ipaddress.IPv4Network, ipaddress.IPv6Network))
            ):
                shown[name] = [str(network) for network in value]
            else:
                shown[name] = value
        return shown


def mqtt_endpoint(url: str, setting: str) -> MqttEndpoint:
    """Where and as whom to connect, from an mqtt:// (or mqtts://) URL named by `setting`."""
    parts = urlsplit(url)
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigurationError(f"{setting} has a bad port: {exc}") from exc
    return MqttEndpoint(
        host=parts.hostname or "127.0.0.1",
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password else None,
    )


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**********@", 1)
    return parts._replace(netloc=netloc).geturl()


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, turning a validation failure into one clear configuration error.

    A secret that still holds an example file's placeholder (`change-me…`) is refused here, so
    that no component of any deployment starts with a password everyone knows."""
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        raise ConfigurationError(f"invalid settings: {exc}".replace("\n", " ")) from exc
    placeholders = settings.placeholder_secrets()
    if placeholders:
        raise ConfigurationError(
            f"{', '.join(placeholders)} still {'holds' if len(placeholders) == 1 else 'hold'} a placeholder"
            " secret (change-me…): set a real one before starting"
        )
    return settings
