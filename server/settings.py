"""Server settings, read once at start-up: environment (BATON_*) > config/baton.yaml > defaults.

Unknown keys are errors, not silently dropped. Nested keys use `__` in the
environment, e.g. `BATON_LIMITS__MAX_BODY_BYTES=2000000`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from ruamel.yaml import YAML, YAMLError

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_", env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path(".baton")
    db: str | None = None  # SQLite file path; default <data_dir>/baton.db
    sqlite_sync: Literal["normal", "full"] = "normal"
    workflows: list[Path] = [Path("config/workflows")]
    handler_modules: list[str] = []
    url: str = "http://127.0.0.1:8080"  # where CLI client commands reach the server
    log_level: str = "INFO"
    limits: Limits = Limits()

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else self.data_dir / "baton.db"

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
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
