"""docker-compose.yml and the Dockerfile, checked against what the server really reads.

Docker does not run in CI, so nothing here starts a container. Instead the files are
parsed and their settings fed to the code that reads them in the container: the
`BATON_*` variables to `load_settings` (they must name real settings and land as
given), the `OTEL_*` ones to the tracing set-up, and the URLs are matched against
the services and ports they point at. Each check returns the problems it finds; the
last tests break the files on purpose and expect the check to say so.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk import environment_variables
from pydantic import BaseModel, SecretStr
from ruamel.yaml import YAML

from server.cli import app as cli_app
from server.errors import ConfigError
from server.settings import Settings, load_settings
from server.telemetry import tracing

REPO = Path(__file__).resolve().parent.parent
NOT_FIELDS = {"BATON_CONFIG"}  # read by the settings loader itself: the settings file's name
OTLP_PORTS = {"http/protobuf": 4318, "grpc": 4317}  # the OTLP defaults Jaeger listens on
NATS_PORT = 4222  # nats-server's client port unless `-p` says otherwise
HEALTHY = "service_healthy"


def load_compose() -> dict[str, Any]:
    return YAML(typ="safe").load((REPO / "docker-compose.yml").read_text())


def load_dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


# --- the Dockerfile, read the way docker reads it (enough of it for these checks) ----------


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def dockerfile_value(dockerfile: str, keyword: str) -> str | None:
    found = [rest for k, rest in instructions(dockerfile) if k == keyword]
    return found[-1] if found else None  # the last one wins


def container_env(compose: dict[str, Any], dockerfile: str, name: str = "baton") -> dict[str, str]:
    """What a Baton container's environment holds: the image's ENV, then compose's `environment`."""
    return {**dockerfile_env(dockerfile), **{k: str(v) for k, v in compose["services"][name]["environment"].items()}}


# --- BATON_* and OTEL_* ------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (`Nats`, `Auth | None`, ...), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_path(name: str) -> list[str] | None:
    """BATON_NATS__STREAM__NAME -> ["nats", "stream", "name"] when each part is a settings field."""
    model: type[BaseModel] | None = Settings
    path = name.removeprefix("BATON_").lower().split("__")
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = _model_of(model.model_fields[part].annotation)
    return path


def _lands(value: Any, text: str) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return text.strip().lower() in (("true", "1", "yes", "on") if value else ("false", "0", "no", "off"))
    if isinstance(value, (list, dict)):
        return value == json.loads(text)
    return str(value) == text


def baton_problems(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every BATON_* variable names a setting, and loading the settings as the container
    does (its environment, its working directory with config/baton.yaml) gives that value."""
    problems = [f"{name} is not a setting (no field {name.removeprefix('BATON_').lower().replace('__', '.')!r} "
                f"in server.settings.Settings)"
                for name in env if name.startswith("BATON_") and name not in NOT_FIELDS and field_path(name) is None]
    if problems:
        return problems
    settings = container_settings(env, monkeypatch)
    if isinstance(settings, str):
        return [settings]
    for name, text in env.items():
        if name.startswith("BATON_") and name not in NOT_FIELDS:
            value: Any = settings
            for part in field_path(name) or []:
                value = getattr(value, part)
            if not _lands(value, text):
                problems.append(f"{name}={text!r} loads as {value!r}")
    return problems


def container_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings | str:
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith(("BATON_", "OTEL_"))]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        m.chdir(REPO)  # the image's working directory holds the repository's config/
        try:
            return load_settings()
        except ConfigError as exc:
            return exc.message


def honoured_otel_names() -> set[str]:
    """OTEL_* names the tracing set-up acts on: those server/telemetry/tracing.py reads itself,
    and the SDK's standard ones for what it builds (the OTLP span exporter, the batch span
    processor, the sampler, the resource, span limits); not those of logs, metrics or other exporters."""
    own = {n for n in re.findall(r"OTEL_[A-Z_]+", inspect.getsource(tracing)) if not n.endswith("_")}
    sdk = {v for k, v in vars(environment_variables).items() if k.startswith("OTEL_")}
    unrelated = ("LOGS", "LOGRECORD", "LOG_LEVEL", "METRIC", "BLRP", "PROMETHEUS", "ZIPKIN", "PYTHON_",
                 "CONFIG_FILE", "EXPERIMENTAL")
    return own | {n for n in sdk if not any(u in n for u in unrelated)}


def otel_problems(env: dict[str, str]) -> list[str]:
    honoured = honoured_otel_names()
    return [f"{name} is not an OpenTelemetry variable the tracing set-up honours"
            for name in env if name.startswith("OTEL_") and name not in honoured]


# --- the services and how they are wired ------------------------------------------------------


def container_ports(service: dict[str, Any]) -> set[int]:
    """The container side of `ports` ("127.0.0.1:8080:8080" -> 8080) and of `expose`."""
    ports = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports | {int(str(p).split("/")[0]) for p in service.get("expose", [])}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert parts and "".join(a + u for a, u in parts) == str(duration), f"not a compose duration: {duration!r}"
    return sum(float(amount) * units[unit] for amount, unit in parts)


def api_url_problems(services: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The example handlers' services (SHOP_API_URL, ...) are a service's published port."""
    problems = []
    for name, value in env.items():
        if name.endswith("_API_URL"):
            where = urlsplit(value)
            target = services.get(where.hostname or "")
            ports = [str(p).rsplit(":", 1)[-1] for p in (target or {}).get("ports", [])]
            if target is None or str(where.port) not in ports:
                problems.append(f"{name}={value!r} is not the port of a service in this file")
    return problems


def wiring_problems(compose: dict[str, Any], env: dict[str, str]) -> list[str]:
    services = compose.get("services", {})
    missing = [name for name in ("nats", "jaeger", "baton") if name not in services]
    if missing:
        return [f"no service {name!r}" for name in missing]
    problems: list[str] = []
    nats, jaeger, baton = services["nats"], services["jaeger"], services["baton"]

    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"service {name!r} has no health check")
        for port in service.get("ports", []):  # auth is off: nothing may be reachable beyond this machine
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"service {name!r} publishes {port!r} beyond the host's loopback")

    problems += api_url_problems(services, env)

    command = [str(a) for a in nats.get("command", [])]
    if "-js" not in command and "--jetstream" not in command:
        problems.append("nats runs without JetStream (-js)")
    for flag in ("-p", "--port"):
        if flag in command and int(command[command.index(flag) + 1]) != NATS_PORT:
            problems.append(f"nats listens on {command[command.index(flag) + 1]}, not {NATS_PORT}")

    nats_url = urlsplit(env.get("BATON_NATS_URL", ""))
    if nats_url.scheme != "nats" or nats_url.hostname != "nats" or (nats_url.port or NATS_PORT) != NATS_PORT:
        problems.append(f"BATON_NATS_URL={env.get('BATON_NATS_URL')!r} is not the nats service's client port "
                        f"(nats://nats:{NATS_PORT})")

    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    endpoint = urlsplit(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    if endpoint.hostname != "jaeger":
        problems.append(f"OTEL_EXPORTER_OTLP_ENDPOINT points at {endpoint.hostname!r}, not the jaeger service")
    if endpoint.port != OTLP_PORTS.get(protocol):
        problems.append(f"OTEL_EXPORTER_OTLP_ENDPOINT port {endpoint.port} is not Jaeger's OTLP port for "
                        f"{protocol} ({OTLP_PORTS.get(protocol)})")
    elif endpoint.port not in container_ports(jaeger):
        problems.append(f"the jaeger service does not expose {endpoint.port}")

    for dependency in ("nats", "jaeger"):
        condition = (baton.get("depends_on") or {}).get(dependency, {}).get("condition")
        if condition != HEALTHY:
            problems.append(f"baton starts before {dependency} is healthy (depends_on condition {condition!r})")
    return problems


def image_problems(compose: dict[str, Any], dockerfile: str, settings: Settings, name: str = "baton") -> list[str]:
    """The image and a Baton service agree: the port it listens on, the one it exposes and
    publishes, the command, the health checks, and a stop timeout beyond the shutdown grace."""
    baton = compose["services"][name]
    problems: list[str] = []
    exposed = {int(p.split("/")[0]) for p in (dockerfile_value(dockerfile, "EXPOSE") or "").split()}
    if exposed != {settings.port}:
        problems.append(f"the Dockerfile exposes {sorted(exposed)}, the server listens on {settings.port} (BATON_PORT)")
    if container_ports(baton) != {settings.port}:
        problems.append(f"the baton service publishes {sorted(container_ports(baton))}, the server listens on {settings.port}")
    if settings.host != "0.0.0.0":
        problems.append(f"the server binds {settings.host}: unreachable from outside its container")
    command = json.loads(dockerfile_value(dockerfile, "CMD") or "null")
    if command != ["baton", "serve"] or baton.get("command") not in (None, command):
        problems.append(f"the image runs {command!r} and compose {baton.get('command')!r}, not `baton serve`")
    if settings.auth.enabled and not settings.auth.tokens:
        problems.append("`baton serve` refuses to start: auth is on and no tokens are configured")
    grace = seconds(baton.get("stop_grace_period", "10s"))
    if grace <= settings.limits.shutdown_grace_s:
        problems.append(f"stop_grace_period {grace:g}s does not cover limits.shutdown_grace_s "
                        f"({settings.limits.shutdown_grace_s:g}s): Docker would kill it mid-shutdown")
    checks = [("compose", baton["healthcheck"]["test"])]
    healthcheck = dockerfile_value(dockerfile, "HEALTHCHECK") or ""
    if "CMD" in healthcheck:
        checks.append(("Dockerfile", ["CMD", *json.loads(healthcheck.split("CMD", 1)[1])]))
    for where, test in checks:
        text = " ".join(test)
        if not re.search(r"/(healthz|readyz)\b", text):
            problems.append(f"the {where} health check probes neither /healthz nor /readyz: {text}")
        if "BATON_PORT" not in text and str(settings.port) not in text:
            problems.append(f"the {where} health check does not probe the server's port")
        if test[1:3] == ["python", "-c"]:
            try:  # a typo fails here, not in Docker
                compile(test[3], f"{where} health check", "exec")
            except SyntaxError as exc:
                problems.append(f"the {where} health check's Python does not compile: {exc.msg}")
    return problems


# --- the files as they are ----------------------------------------------------------------------


def test_the_baton_variables_are_settings_and_land_as_given(monkeypatch):
    env = container_env(load_compose(), load_dockerfile())
    assert baton_problems(env, monkeypatch) == []
    settings = container_settings(env, monkeypatch)
    assert isinstance(settings, Settings), settings
    assert settings.nats_servers == ["nats://nats:4222"]
    assert settings.host == "0.0.0.0" and settings.port == 8080 and settings.data_dir == Path("/data")
    assert settings.db_path == Path("/data/baton.db")  # the store is on the volume
    assert "/data" in [v.split(":")[1] for v in load_compose()["services"]["baton"]["volumes"]]
    assert settings.jaeger_url == "http://localhost:16686"
    assert settings.auth.enabled is False  # on purpose: see the warning in docker-compose.yml


def test_the_otel_variables_are_standard_and_set_up_tracing(monkeypatch):
    env = container_env(load_compose(), load_dockerfile())
    assert otel_problems(env) == []
    settings = container_settings(env, monkeypatch)
    assert isinstance(settings, Settings), settings
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        assert tracing.tracing_enabled(settings.tracing.enabled)
        exporter = tracing.make_exporter()
        provider, _ = tracing.make_provider(exporter)
        try:
            assert isinstance(exporter, HttpExporter)
            assert exporter._endpoint == "http://jaeger:4318/v1/traces"  # what the exporter will POST to
            assert provider.resource.attributes["service.name"] == "baton"
        finally:
            provider.shutdown()


def test_the_services_are_wired_to_each_other():
    compose = load_compose()
    assert wiring_problems(compose, container_env(compose, load_dockerfile())) == []


def test_the_image_and_the_baton_service_agree(monkeypatch):
    compose, dockerfile = load_compose(), load_dockerfile()
    settings = container_settings(container_env(compose, dockerfile), monkeypatch)
    assert isinstance(settings, Settings), settings
    assert image_problems(compose, dockerfile, settings) == []
    commands = {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    assert "serve" in commands  # the CMD names a real command


def test_the_image_installs_what_pyproject_needs():
    """The Dockerfile installs pyproject's dependencies (from the file itself, so the lists cannot
    drift), then the package, which puts the `baton` script on the PATH."""
    import tomllib

    dockerfile = load_dockerfile()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["baton"] == "server.cli:main"
    runs = " ".join(rest for keyword, rest in instructions(dockerfile) if keyword == "RUN")
    assert "['project']['dependencies']" in runs and "pip install --no-deps ." in runs
    copied = {rest.split()[0] for keyword, rest in instructions(dockerfile) if keyword == "COPY"}
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= copied  # every package it installs is in the image
    assert {"pyproject.toml", "README.md", "config"} <= copied  # the build reads the README; the server, config/


# --- the checks catch what they are for ---------------------------------------------------------


def _env_with(change) -> dict[str, str]:
    env = container_env(load_compose(), load_dockerfile())
    change(env)
    return env


def _rename(old: str, new: str):
    return lambda env: env.__setitem__(new, env.pop(old))


@pytest.mark.parametrize(("change", "expected"), [
    (_rename("BATON_NATS_URL", "BATON_NATS_URI"), "BATON_NATS_URI is not a setting (no field 'nats_uri'"),
    (_rename("BATON_AUTH__ENABLED", "BATON_AUTH__ENABLE"), "BATON_AUTH__ENABLE is not a setting"),
    (_rename("BATON_PORT", "BATON_LIMITS__PORT"), "BATON_LIMITS__PORT is not a setting (no field 'limits.port'"),
    (lambda env: env.__setitem__("BATON_PORT", "80a"), "invalid settings: port"),
])
def test_a_baton_variable_the_server_does_not_read_is_caught(monkeypatch, change, expected):
    problems = baton_problems(_env_with(change), monkeypatch)
    assert any(p.startswith(expected) for p in problems), problems


def test_an_otel_name_the_sdk_does_not_know_is_caught():
    env = _env_with(_rename("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPIONT"))
    assert otel_problems(env) == ["OTEL_EXPORTER_OTLP_ENDPIONT is not an OpenTelemetry variable the tracing set-up honours"]
    env = _env_with(lambda e: e.__setitem__("OTEL_METRICS_EXPORTER", "otlp"))  # real, but not tracing's
    assert otel_problems(env) == ["OTEL_METRICS_EXPORTER is not an OpenTelemetry variable the tracing set-up honours"]


def _compose_with(change) -> dict[str, Any]:
    compose = copy.deepcopy(load_compose())
    change(compose["services"])
    return compose


@pytest.mark.parametrize(("change", "env_change", "expected"), [
    (None, lambda e: e.__setitem__("BATON_NATS_URL", "nats://natz:4222"), "BATON_NATS_URL='nats://natz:4222' is not"),
    (None, lambda e: e.__setitem__("SHOP_API_URL", "http://standins:8091/shop"),
     "SHOP_API_URL='http://standins:8091/shop' is not the port of a service"),
    (None, lambda e: e.__setitem__("DEPLOY_API_URL", "http://127.0.0.1:8090/deploy"), "DEPLOY_API_URL="),
    (None, lambda e: e.__setitem__("BATON_NATS_URL", "nats://nats:4223"), "BATON_NATS_URL='nats://nats:4223' is not"),
    (None, lambda e: e.__setitem__("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
     "OTEL_EXPORTER_OTLP_ENDPOINT port 4317 is not Jaeger's OTLP port for http/protobuf (4318)"),
    (None, lambda e: e.__setitem__("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4318"),
     "OTEL_EXPORTER_OTLP_ENDPOINT points at 'tempo'"),
    (lambda s: s["jaeger"].__setitem__("ports", ["127.0.0.1:16686:16686"]), None, "the jaeger service does not expose 4318"),
    (lambda s: s["nats"].__setitem__("command", ["-sd", "/data"]), None, "nats runs without JetStream"),
    (lambda s: s["jaeger"].pop("healthcheck"), None, "service 'jaeger' has no health check"),
    (lambda s: s["baton"]["depends_on"].__setitem__("nats", {"condition": "service_started"}), None,
     "baton starts before nats is healthy"),
    (lambda s: s["baton"].__setitem__("ports", ["8080:8080"]), None, "service 'baton' publishes '8080:8080' beyond"),
    (lambda s: s.pop("nats"), None, "no service 'nats'"),
])
def test_miswiring_is_caught(change, env_change, expected):
    compose = _compose_with(change or (lambda s: None))
    env = container_env(compose, load_dockerfile()) if "baton" in compose["services"] else {}
    if env_change:
        env_change(env)
    problems = wiring_problems(compose, env)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(("dockerfile_change", "service_change", "expected"), [
    (("EXPOSE 8080", "EXPOSE 8081"), None, "the Dockerfile exposes [8081]"),
    (('CMD ["baton", "serve"]', 'CMD ["baton", "dev"]'), None, "the image runs ['baton', 'dev']"),
    (None, lambda s: s["baton"].__setitem__("stop_grace_period", "5s"), "stop_grace_period 5s does not cover"),
    (None, lambda s: s["baton"]["healthcheck"].__setitem__("test", ["CMD", "python", "-c", "print(1)"]),
     "the compose health check probes neither /healthz nor /readyz"),
    (None, lambda s: s["baton"]["healthcheck"]["test"].__setitem__(3, "urlopen('http://127.0.0.1:8080/readyz'"),
     "the compose health check's Python does not compile"),
    (None, lambda s: s["baton"].__setitem__("ports", ["127.0.0.1:8080:9090"]), "the baton service publishes [9090]"),
])
def test_an_image_at_odds_with_the_service_is_caught(monkeypatch, dockerfile_change, service_change, expected):
    dockerfile = load_dockerfile()
    if dockerfile_change:
        assert dockerfile_change[0] in dockerfile
        dockerfile = dockerfile.replace(*dockerfile_change)
    compose = _compose_with(service_change or (lambda s: None))
    settings = container_settings(container_env(compose, dockerfile), monkeypatch)
    assert isinstance(settings, Settings), settings
    problems = image_problems(compose, dockerfile, settings)
    assert any(p.startswith(expected) for p in problems), problems


def test_auth_on_without_tokens_is_caught(monkeypatch):
    compose = _compose_with(lambda s: s["baton"]["environment"].pop("BATON_AUTH__ENABLED"))
    dockerfile = load_dockerfile()
    settings = container_settings(container_env(compose, dockerfile), monkeypatch)
    assert isinstance(settings, Settings), settings
    assert "`baton serve` refuses to start: auth is on and no tokens are configured" in image_problems(compose, dockerfile, settings)


# --- the `cluster` profile: replicas on PostgreSQL and a NATS cluster ----------------------------

CLUSTER = "cluster"
# `docker compose up` without a profile starts these, and only these: the laptop stack as it was
# before the profile. Jaeger and the stand-ins stay here, shared with the cluster's replicas.
DEFAULT_SERVICES = {"nats", "jaeger", "standins", "baton"}
CLUSTER_SERVICES = {"postgres", "nats-1", "nats-2", "nats-3", "baton-1", "baton-2"}
POSTGRES_PORT = 5432
NATS_CLUSTER_PORT = 6222  # nats-server's cluster (route) port


def profile_of(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles") or [])


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def nats_node_problems(services: dict[str, Any], nodes: list[str]) -> list[str]:
    """Each node runs JetStream under its own name, stores on a volume of its own, and routes
    to every other node of one cluster on the cluster port."""
    problems: list[str] = []
    cluster_names, stores = set(), {}
    for name in nodes:
        command = [str(a) for a in services[name].get("command", [])]
        if "-js" not in command and "--jetstream" not in command:
            problems.append(f"{name} runs without JetStream (-js)")
        if flag(command, "--server_name") != name:  # JetStream in a cluster needs distinct server names
            problems.append(f"{name} has server name {flag(command, '--server_name')!r}, not its own")
        cluster_names.add(flag(command, "--cluster_name"))
        listen = urlsplit(flag(command, "--cluster") or "")
        if listen.port != NATS_CLUSTER_PORT:
            problems.append(f"{name} does not listen for routes on {NATS_CLUSTER_PORT} (--cluster)")
        routes = [urlsplit(r) for r in (flag(command, "--routes") or "").split(",") if r]
        others = set(nodes) - {name}
        if {r.hostname for r in routes} != others or {r.port for r in routes} != {NATS_CLUSTER_PORT}:
            problems.append(f"{name} routes to {flag(command, '--routes')!r}, not to "
                            f"{sorted(others)} on {NATS_CLUSTER_PORT}")
        store = flag(command, "-sd")
        volumes = {str(v).split(":")[1]: str(v).split(":")[0] for v in services[name].get("volumes", [])}
        if store not in volumes:
            problems.append(f"{name} keeps its JetStream store {store!r} off a volume")
        else:
            stores[name] = volumes[store]
    if len(cluster_names) != 1 or None in cluster_names:
        problems.append(f"the NATS nodes name {sorted(map(str, cluster_names))} as their cluster, not one name")
    if len(set(stores.values())) != len(stores):
        problems.append(f"NATS nodes share a store volume: {stores}")
    return problems


def replica_problems(services: dict[str, Any], replicas: dict[str, dict[str, str]], nodes: list[str]) -> list[str]:
    """Every replica (its container environment given) is on the postgres service's database
    and on every NATS node, waits for both to be healthy, and differs from the others only
    in its name and its published port."""
    problems: list[str] = []
    postgres = services.get("postgres", {}).get("environment", {})
    for name, env in replicas.items():
        db = urlsplit(env.get("BATON_DB", ""))
        on_postgres = db.hostname == "postgres" and (db.port or POSTGRES_PORT) == POSTGRES_PORT
        if db.scheme not in ("postgresql", "postgres") or not on_postgres:
            problems.append(f"{name}: BATON_DB={env.get('BATON_DB')!r} is not the postgres service's database")
        elif (db.username, db.password, db.path.lstrip("/")) != (
                postgres.get("POSTGRES_USER", "postgres"), postgres.get("POSTGRES_PASSWORD"),
                postgres.get("POSTGRES_DB", postgres.get("POSTGRES_USER", "postgres"))):
            problems.append(f"{name}: BATON_DB's user, password or database is not the one postgres creates")
        urls = [urlsplit(u.strip()) for u in env.get("BATON_NATS_URL", "").split(",")]
        if sorted(u.hostname or "" for u in urls) != sorted(nodes) or {u.port or NATS_PORT for u in urls} != {NATS_PORT}:
            problems.append(f"{name}: BATON_NATS_URL={env.get('BATON_NATS_URL')!r} does not name every NATS node")
        if int(env.get("BATON_NATS__STREAM__REPLICAS", "1")) != len(nodes):
            problems.append(f"{name}: the event stream has {env.get('BATON_NATS__STREAM__REPLICAS', '1')} "
                            f"replica(s) on {len(nodes)} NATS nodes")
        depends_on = services[name].get("depends_on") or {}
        for dependency in ("postgres", *nodes, "jaeger"):
            if (depends_on.get(dependency) or {}).get("condition") != HEALTHY:
                problems.append(f"{name} starts before {dependency} is healthy")
        if urlsplit(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")).hostname != "jaeger":
            problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT does not point at the jaeger service")
        problems += [f"{name}: {p}" for p in api_url_problems(services, env)]
    names = [env.get("BATON_CLUSTER__REPLICA") for env in replicas.values()]
    if None in names or len(set(names)) != len(names):
        problems.append(f"the replicas are named {names}: each needs a name of its own (BATON_CLUSTER__REPLICA)")
    host_ports = [str(p).rsplit(":", 1)[0] for name in replicas for p in services[name].get("ports", [])]
    if len(set(host_ports)) != len(host_ports):
        problems.append(f"the replicas publish on the same host port: {host_ports}")
    secrets = {env.get("BATON_APPROVALS__SECRET") for env in replicas.values()}
    if len(secrets) != 1 or None in secrets:  # a link made by one replica is opened on another
        problems.append("the replicas do not share one approval link key (BATON_APPROVALS__SECRET)")
    return problems


def cluster_problems(compose: dict[str, Any], dockerfile: str) -> list[str]:
    services = compose.get("services", {})
    missing = sorted(CLUSTER_SERVICES - set(services))
    if missing:
        return [f"no service {name!r}" for name in missing]
    problems = [f"service {name!r} is not in the {CLUSTER} profile only (profiles {profile_of(services[name])})"
                for name in sorted(CLUSTER_SERVICES) if profile_of(services[name]) != [CLUSTER]]
    postgres = services["postgres"]
    if not str(postgres.get("image", "")).startswith("postgres:"):
        problems.append(f"postgres runs {postgres.get('image')!r}, not the postgres image")
    if "pg_isready" not in (postgres.get("healthcheck") or {}).get("test", []):
        problems.append("postgres has no pg_isready health check")
    if not any(str(v).split(":")[1] == "/var/lib/postgresql/data" and str(v).split(":")[0] in (compose.get("volumes") or {})
               for v in postgres.get("volumes", [])):
        problems.append("postgres keeps its data off a named volume")
    nodes = sorted(n for n in CLUSTER_SERVICES if n.startswith("nats-"))
    replicas = {n: container_env(compose, dockerfile, n) for n in sorted(CLUSTER_SERVICES) if n.startswith("baton-")}
    return problems + nats_node_problems(services, nodes) + replica_problems(services, replicas, nodes)


def test_the_default_services_are_the_laptop_stack():
    """`docker compose up` without a profile starts what it did before the cluster profile came."""
    services = load_compose()["services"]
    assert {name for name, service in services.items() if not profile_of(service)} == DEFAULT_SERVICES
    assert {name for name, service in services.items() if CLUSTER in profile_of(service)} == CLUSTER_SERVICES
    assert set(services) == DEFAULT_SERVICES | CLUSTER_SERVICES  # no other profile


def test_the_cluster_profile_is_wired():
    compose = load_compose()
    assert cluster_problems(compose, load_dockerfile()) == []
    assert wiring_problems(compose, container_env(compose, load_dockerfile())) == []  # health checks, loopback


@pytest.mark.parametrize("name", sorted(n for n in CLUSTER_SERVICES if n.startswith("baton-")))
def test_each_replica_is_a_replica_of_one_cluster(monkeypatch, name):
    compose, dockerfile = load_compose(), load_dockerfile()
    env = container_env(compose, dockerfile, name)
    assert baton_problems(env, monkeypatch) == [] and otel_problems(env) == []
    settings = container_settings(env, monkeypatch)
    assert isinstance(settings, Settings), settings
    assert settings.db_is_postgres and settings.cluster.replica == name
    assert settings.nats_servers == [f"nats://nats-{i}:{NATS_PORT}" for i in (1, 2, 3)]
    assert settings.nats.stream.replicas == 3
    assert image_problems(compose, dockerfile, settings, name) == []


def test_the_image_installs_the_postgresql_driver():
    """The replicas' store is PostgreSQL (asyncpg); the image installs pyproject's dependencies
    and nothing else (test_the_image_installs_what_pyproject_needs), so it must be one."""
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"asyncpg\b", d) for d in dependencies), "asyncpg is not in pyproject's dependencies"


def _cluster_with(change) -> list[str]:
    compose = _compose_with(change)
    return cluster_problems(compose, load_dockerfile())


def _nats_command(node: str, old: str, new: str):
    return lambda s: s[node].__setitem__("command", [new if a == old else a for a in s[node]["command"]])


def _replica_env(name: str, key: str, value: str | None):
    def change(services):
        env = services[name]["environment"]
        env.pop(key) if value is None else env.__setitem__(key, value)
    return change


@pytest.mark.parametrize(("change", "expected"), [
    (lambda s: s["postgres"].pop("profiles"), "service 'postgres' is not in the cluster profile only"),
    (lambda s: s["nats-2"].__setitem__("profiles", ["cluster", "debug"]), "service 'nats-2' is not in the cluster"),
    (lambda s: s.pop("nats-3"), "no service 'nats-3'"),
    (lambda s: s["postgres"].__setitem__("image", "mysql:8"), "postgres runs 'mysql:8'"),
    (lambda s: s["postgres"].pop("healthcheck"), "postgres has no pg_isready health check"),
    (lambda s: s["postgres"].__setitem__("volumes", []), "postgres keeps its data off a named volume"),
    (_nats_command("nats-1", "-js", "-V"), "nats-1 runs without JetStream"),
    (_nats_command("nats-2", "nats-2", "nats-1"), "nats-2 has server name 'nats-1'"),
    (_nats_command("nats-3", "nats://nats-1:6222,nats://nats-2:6222", "nats://nats-1:6222"), "nats-3 routes to"),
    (_nats_command("nats-1", "nats://0.0.0.0:6222", "nats://0.0.0.0:6223"), "nats-1 does not listen for routes"),
    (_nats_command("nats-2", "baton", "other"), "the NATS nodes name"),
    (lambda s: s["nats-2"].__setitem__("volumes", ["nats-1-data:/data"]), "NATS nodes share a store volume"),
    (_replica_env("baton-1", "BATON_DB", None), "baton-1: BATON_DB=None is not"),
    (_replica_env("baton-2", "BATON_DB", "postgresql://baton:baton@db:5432/baton"), "baton-2: BATON_DB="),
    (_replica_env("baton-1", "BATON_DB", "postgresql://baton:wrong@postgres:5432/baton"),
     "baton-1: BATON_DB's user, password or database"),
    (_replica_env("baton-1", "BATON_NATS_URL", "nats://nats-1:4222,nats://nats-2:4222"),
     "baton-1: BATON_NATS_URL='nats://nats-1:4222,nats://nats-2:4222' does not name every NATS node"),
    (_replica_env("baton-2", "BATON_NATS_URL", "nats://nats:4222"), "baton-2: BATON_NATS_URL="),
    (_replica_env("baton-1", "BATON_NATS__STREAM__REPLICAS", None), "baton-1: the event stream has 1 replica(s)"),
    (_replica_env("baton-2", "BATON_CLUSTER__REPLICA", "baton-1"), "the replicas are named ['baton-1', 'baton-1']"),
    (_replica_env("baton-1", "BATON_APPROVALS__SECRET", "other"), "the replicas do not share one approval link key"),
    (_replica_env("baton-2", "SHOP_API_URL", "http://standins:8091/shop"), "baton-2: SHOP_API_URL="),
    (_replica_env("baton-1", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4318"), "baton-1: OTEL_EXPORTER_OTLP_ENDPOINT"),
    (lambda s: s["baton-2"].__setitem__("ports", ["127.0.0.1:8081:8080"]), "the replicas publish on the same host port"),
    (lambda s: s["baton-1"].__setitem__("depends_on", {"postgres": {"condition": "service_started"}}),
     "baton-1 starts before postgres is healthy"),
])
def test_cluster_miswiring_is_caught(change, expected):
    problems = _cluster_with(change)
    assert any(p.startswith(expected) for p in problems), problems
