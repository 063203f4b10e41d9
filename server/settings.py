"""Server settings, read once at start-up: environment (BATON_*) > config/baton.yaml > defaults.

Unknown keys are errors, not silently dropped. Nested keys use `__` in the
environment, e.g. `BATON_LIMITS__MAX_BODY_BYTES=2000000`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from ruamel.yaml import YAML, YAMLError

from server.definitions.calendars import CalendarSpec, check_calendars
from server.errors import ConfigError

DEFAULT_CONFIG = Path("config/baton.yaml")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # 1 MiB: enough for any sane run input; larger payloads belong in object storage.
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # handlers running at once in this process, across all workflows
    max_concurrent_tasks: int = Field(256, ge=1)
    # per workflow (name) unless the workflow sets its own `concurrency`
    max_concurrent_tasks_per_workflow: int = Field(128, ge=1)
    # seconds that SIGTERM waits for running handlers before it stops anyway
    shutdown_grace_s: float = Field(10.0, ge=0)


class NatsTLS(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    hostname: str | None = None  # the name to verify, when it differs from the URL's host


class EventStream(BaseModel):
    """The JetStream stream that captures the subjects of event triggers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("BATON_EVENTS", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    # a week: enough to survive a long outage of Baton; events older than this are dropped
    max_age_s: float = Field(7 * 86400.0, ge=0)  # 0 = keep until the limits below
    max_bytes: int = Field(-1, ge=-1)  # -1 = no limit
    replicas: int = Field(1, ge=1, le=5)


class Nats(BaseModel):
    """NATS settings; the server URL itself is `nats_url` (BATON_NATS_URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # off: no NATS at all (no event triggers, remote queues or lifecycle events)
    enabled: bool = True
    credentials: Path | None = None  # a .creds file (JWT + nkey)
    token: SecretStr | None = None
    tls: NatsTLS | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    # at start-up, a broker not reachable yet (starting beside Baton, a compose stack) is
    # tried again every reconnect_wait_s for this long before Baton gives up
    startup_wait_s: float = Field(60.0, gt=0, le=3600)
    # nats-py waits this long between reconnect attempts, forever: a broker outage
    # must not stop Baton, and the outbox catches up once it is back
    reconnect_wait_s: float = Field(2.0, gt=0, le=60)
    # a broker that stops answering without closing the socket (a stalled process, a
    # network partition) is noticed after this many unanswered pings, one per interval:
    # nats-py's own default (2 minutes, 2 pings) left /readyz saying "connected" for minutes
    ping_interval_s: float = Field(10.0, gt=0, le=600)
    max_outstanding_pings: int = Field(3, ge=1, le=100)
    # where `baton dev` keeps the embedded server's JetStream store; default <data_dir>/nats
    embedded_dir: Path | None = None
    # NATS's standard port, so `nats pub ...` reaches the embedded server with no flags;
    # if it is taken, the server picks a free port and Baton logs the URL
    embedded_port: int = Field(4222, ge=-1, le=65535)
    stream: EventStream = EventStream()
    # event messages being processed at once (the consumer's max_ack_pending): the
    # rest wait in the stream, not in memory
    max_inflight_events: int = Field(256, ge=1, le=100_000)
    # how long a processed event id is remembered for dedupe (beyond JetStream's own
    # 2 minute window); a run started by an event also dedupes it for as long as it is stored
    dedupe_window_s: float = Field(7 * 86400.0, gt=0)
    # publish run and step lifecycle CloudEvents (baton.run.*, baton.step.*)
    lifecycle_events: bool = True


class Worker(BaseModel):
    """`baton worker`: a process that runs the handlers of remote task queues."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # handlers one worker process runs at once; more processes (or machines) scale out
    concurrency: int = Field(16, ge=1, le=10_000)
    # seconds SIGTERM lets running handlers finish; the rest are cancelled, and Baton
    # retries them when their heartbeats stop
    shutdown_grace_s: float = Field(30.0, ge=0)
    # reported when it starts a task (history shows who ran an attempt); default host:pid
    name: str | None = Field(None, min_length=1, max_length=128)


class Approvals(BaseModel):
    """Approval links and notifications (workflow steps with `wait_for_signal.approval`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # signs approval links; default: a random key made once and kept in
    # <data_dir>/approval.key, so links survive restarts. Changing it voids every link.
    secret: SecretStr | None = None
    # how long a link works when its step has no approval timeout (a week: long enough
    # for a weekend, short enough that a forwarded link does not live forever)
    link_ttl_s: float = Field(7 * 86400.0, gt=0)
    # a Slack-compatible incoming webhook: POST {"text": ...} with the link, best effort
    notify_url: str | None = Field(None, pattern=r"^https?://")
    notify_timeout_s: float = Field(5.0, gt=0, le=60)


class Audit(BaseModel):
    """The audit log and the CSV / JSON Lines exports."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Reverse proxies in front of Baton that append the client's address to
    # X-Forwarded-For. 0: the audit log records the TCP peer and ignores the header,
    # which any client can forge. N: it records the N-th address from the right, the one
    # the outermost trusted proxy saw.
    trusted_proxies: int = Field(0, ge=0, le=10)
    # runs read from the store per page of an export: memory per export stays at about one page
    export_page_size: int = Field(500, ge=1, le=10_000)


class Schedules(BaseModel):
    """Cron and interval triggers (server/triggers/scheduler.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # a fire further behind than this when Baton gets to it was missed (Baton was down
    # or stalled) and follows the trigger's on_missed; a fire less late simply runs
    misfire_grace_s: float = Field(60.0, gt=0)
    # fire records (started / skipped, with the reason) kept per schedule; older ones are pruned
    keep_fires: int = Field(1000, ge=10, le=1_000_000)


class Cluster(BaseModel):
    """Several replicas on one PostgreSQL database (BATON_DB=postgresql://...) and one NATS
    cluster (server/cluster.py). Unused with SQLite."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # this replica's name in leases and logs; default host:pid
    replica: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
    # a replica silent this long is taken for dead: the time leader's lease, each replica's
    # liveness lease and the heartbeat deadline of in-process steps all expire after it
    lease_s: float = Field(10.0, ge=1.0, le=300.0)
    # the JetStream work queue that in-process steps go through, shared by every replica
    queue: str = Field("baton", pattern=r"^[A-Za-z0-9_-]{1,64}$")


class Tracing(BaseModel):
    """OpenTelemetry traces (server/telemetry/tracing.py). The exporter itself is set up by
    the standard OTEL_* variables: OTEL_EXPORTER_OTLP_ENDPOINT, _PROTOCOL, _HEADERS, ..."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # None: on when OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set; OTEL_SDK_DISABLED=true always wins
    enabled: bool | None = None
    # the trigger's trace context (traceparent of a NATS message, webhook or API call):
    # `child` makes the run span its child, in the caller's trace; `link` starts the run's
    # own trace and records the trigger's span as an attribute
    trigger: Literal["child", "link"] = "child"


ROLES = ("viewer", "operator", "approver", "admin")
Role = Literal["viewer", "operator", "approver", "admin"]


class ApiToken(BaseModel):
    """One bearer token, stored as the SHA-256 of the token (`baton token create` prints both)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # who, in the audit log and history
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: list[Role] = Field(min_length=1)


class Auth(BaseModel):
    """API authentication: bearer tokens with roles. `baton dev` turns it off (and says so);
    `baton serve` refuses to start with it on and no tokens, rather than lock everyone out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    tokens: list[ApiToken] = []

    @model_validator(mode="after")
    def _unique(self) -> "Auth":
        names = [t.name for t in self.tokens]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"token names must be unique; repeated: {', '.join(dupes)}")
        hashes = [t.sha256 for t in self.tokens]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two tokens have the same sha256: each token needs its own secret")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_", env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path(".baton")
    # a SQLite file path (default <data_dir>/baton.db), or a postgresql:// URL
    db: str | None = None
    sqlite_sync: Literal["normal", "full"] = "normal"
    workflows: list[Path] = [Path("config/workflows")]
    handler_modules: list[str] = []
    url: str = "http://127.0.0.1:8080"  # where CLI client commands reach the server
    # the bearer token CLI client commands send (BATON_TOKEN); the server never reads it
    token: SecretStr | None = None
    # where people reach Baton, for links in approval notifications; default `url`
    public_url: str | None = None
    # the Jaeger UI (BATON_JAEGER_URL, e.g. http://localhost:16686): `baton show` links a
    # run's trace there; like `url` and `token`, only the CLI reads it
    jaeger_url: str | None = Field(None, pattern=r"^https?://")
    auth: Auth = Auth()
    audit: Audit = Audit()
    log_level: str = "INFO"
    # json: one JSON object per line (for a log pipeline); console: readable lines.
    # Unset: json for `baton serve` and `baton worker`, console for `baton dev`
    log_format: Literal["json", "console"] | None = None
    limits: Limits = Limits()
    # NATS server URLs, comma-separated; none means `baton dev`/`serve` start an
    # embedded nats-server on a loopback port
    nats_url: str | None = None
    nats: Nats = Nats()
    worker: Worker = Worker()
    approvals: Approvals = Approvals()
    schedules: Schedules = Schedules()
    tracing: Tracing = Tracing()
    cluster: Cluster = Cluster()
    # named days and windows that schedule triggers `exclude` or keep to (`only_within`)
    calendars: dict[str, CalendarSpec] = {}

    @model_validator(mode="after")
    def _calendars_refer_to_each_other_sanely(self) -> "Settings":
        try:
            check_calendars(self.calendars)
        except ValueError as exc:
            raise ValueError(f"calendars: {exc}") from None
        return self

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else self.data_dir / "baton.db"

    @property
    def db_is_postgres(self) -> bool:
        return (self.db or "").startswith(("postgresql://", "postgres://"))

    @property
    def db_display(self) -> str:
        """The database for a log line: the SQLite path, or the URL with its password masked."""
        if not self.db_is_postgres:
            return str(self.db_path)
        parts = urlsplit(self.db or "")
        if parts.password is None:
            return self.db or ""
        userinfo, _, host = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in (self.nats_url or "").split(",") if u.strip()]

    @property
    def nats_embedded_dir(self) -> Path:
        return self.nats.embedded_dir or self.data_dir / "nats"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """config/baton.yaml (or the file named by BATON_CONFIG)."""

    def __call__(self) -> dict[str, Any]:
        import os

        path = Path(os.environ.get("BATON_CONFIG", DEFAULT_CONFIG))
        if not path.exists():
            if "BATON_CONFIG" in os.environ:
                raise ConfigError(f"{path}: config file not found (BATON_CONFIG)")
            return {}
        try:
            data = YAML(typ="safe").load(path.read_text())
        except YAMLError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        return data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
