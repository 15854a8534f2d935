"""Every setting of lookalike, read from ``LOOKALIKE_*`` environment variables.

The groups (model, gallery, storage, broker, api) are nested models, but each field keeps a
flat, documented variable name (``LOOKALIKE_MODEL``, ``LOOKALIKE_REDIS_URL``...), because that
is what users type. Validators refuse nonsense at start with a message naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.errors import ConfigError

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
RANDOM_MODEL_PREFIX = "random:"
DEFAULT_GALLERY_SIZE = 2000
FASHION_MNIST_SIZE = 70_000
FASHION_MNIST = "fashion-mnist"
MAX_K = 50  # the most matches a job may ask for
# Gallery names travel in URLs, Redis keys and folder names: keep them plain.
GALLERY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def data_home() -> Path:
    explicit = os.environ.get("LOOKALIKE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "lookalike"


class _AliasOnlyEnv(EnvSettingsSource):
    """The environment, read through the LOOKALIKE_* aliases only.

    ``populate_by_name`` (so code can write ``ModelSettings(name=...)``) would otherwise make
    pydantic-settings read bare variables such as ``NAME`` or ``DEVICE`` too.
    """

    def _extract_field_info(
        self, field: FieldInfo, field_name: str, model_config: Mapping[str, Any] | None = None
    ) -> list[tuple[str, str, bool]]:
        found = super()._extract_field_info(field, field_name, model_config)
        return [item for item in found if item[0] != field_name]


class _Group(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _AliasOnlyEnv(settings_cls))


class ModelSettings(_Group):
    name: str = Field(DEFAULT_MODEL, validation_alias="LOOKALIKE_MODEL")
    device: str = Field("auto", validation_alias="LOOKALIKE_DEVICE")
    # Images per batch when building an index; unset: 256 on a GPU, 32 on a CPU.
    batch_size: int | None = Field(None, ge=1, le=4096, validation_alias="LOOKALIKE_BATCH_SIZE")
    threads: int = Field(0, ge=0, le=512, validation_alias="LOOKALIKE_THREADS")
    # auto: int8, else bf16, if it passes the start check; int8 or bf16: that one; off: fp32.
    fast_cpu: Literal["auto", "int8", "bf16", "off"] = Field(
        "auto", validation_alias="LOOKALIKE_FAST_CPU"
    )
    # How images become the model's input (worker.preprocess): auto is torch; a fast path is
    # used only if it matches the processor at start.
    preprocess: Literal["auto", "processor", "pil+torch", "torch"] = Field(
        "auto", validation_alias="LOOKALIKE_PREPROCESS"
    )
    # auto: on a GPU, small batches replay CUDA graphs if they match the eager pass at start.
    cuda_graphs: Literal["auto", "off"] = Field("auto", validation_alias="LOOKALIKE_CUDA_GRAPHS")
    # The text tower (and tokenizer) is loaded only when text search is on.
    text_search: Literal["on", "off"] = Field("on", validation_alias="LOOKALIKE_TEXT_SEARCH")

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("LOOKALIKE_MODEL is empty: give a hub id or a local directory")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(
                f"LOOKALIKE_DEVICE={value!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
            )
        return value

    @property
    def is_random(self) -> bool:
        return self.name.startswith(RANDOM_MODEL_PREFIX)


class GallerySettings(_Group):
    name: str = Field(FASHION_MNIST, validation_alias="LOOKALIKE_GALLERY")
    size: int = Field(
        DEFAULT_GALLERY_SIZE,
        ge=1,
        validation_alias="LOOKALIKE_GALLERY_SIZE",
    )
    data_dir: Path | None = Field(None, validation_alias="LOOKALIKE_DATA_DIR")
    index_dir: Path = Field(
        default_factory=lambda: data_home() / "index",
        validation_alias="LOOKALIKE_INDEX_DIR",
    )
    top_k: int = Field(5, validation_alias="LOOKALIKE_TOP_K")

    @field_validator("name")
    @classmethod
    def _plain_gallery_name(cls, value: str) -> str:
        if GALLERY_NAME.fullmatch(value) is None:
            raise ValueError(
                f"LOOKALIKE_GALLERY={value!r} is not a gallery name: use lower-case letters, "
                "digits, '.', '_' and '-' (at most 64), e.g. fashion-mnist"
            )
        return value

    @field_validator("size")
    @classmethod
    def _size_fits(cls, value: int) -> int:
        if value > FASHION_MNIST_SIZE:
            raise ValueError(
                f"LOOKALIKE_GALLERY_SIZE={value} is larger than Fashion-MNIST "
                f"({FASHION_MNIST_SIZE} images)"
            )
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if not 1 <= value <= MAX_K:
            raise ValueError(f"LOOKALIKE_TOP_K={value} must be between 1 and {MAX_K}")
        return value


class StorageSettings(_Group):
    job_ttl_s: int = Field(86_400, ge=1, validation_alias="LOOKALIKE_JOB_TTL")
    max_upload_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        validation_alias="LOOKALIKE_MAX_UPLOAD_BYTES",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        validation_alias="LOOKALIKE_MAX_IMAGE_PIXELS",
    )
    key_prefix: str = Field("lookalike", validation_alias="LOOKALIKE_KEY_PREFIX")


class BrokerSettings(_Group):
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="LOOKALIKE_REDIS_URL")
    queue: str = Field("lookalike", validation_alias="LOOKALIKE_QUEUE")
    task_time_limit_s: int = Field(120, ge=5, validation_alias="LOOKALIKE_TASK_TIME_LIMIT")
    visibility_timeout_s: int = Field(300, ge=10, validation_alias="LOOKALIKE_VISIBILITY_TIMEOUT")
    max_attempts: int = Field(3, ge=1, le=20, validation_alias="LOOKALIKE_MAX_ATTEMPTS")
    max_queued: int = Field(1000, ge=1, validation_alias="LOOKALIKE_MAX_QUEUED")
    stuck_after_s: float = Field(60.0, ge=1, validation_alias="LOOKALIKE_STUCK_AFTER")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"LOOKALIKE_REDIS_URL={value!r} must start with redis://, rediss:// or unix://"
            )
        return value


class WorkerSettings(_Group):
    # Jobs waiting together are embedded in one forward pass, up to this many; a worker
    # holds (prefetches) as many unacknowledged messages, all redelivered if it dies.
    batch: int = Field(16, ge=1, le=1024, validation_alias="LOOKALIKE_WORKER_BATCH")
    batch_wait_ms: float = Field(5.0, gt=0, le=1000, validation_alias="LOOKALIKE_BATCH_WAIT_MS")


class ApiSettings(_Group):
    max_wait_s: float = Field(30.0, gt=0, le=300, validation_alias="LOOKALIKE_MAX_WAIT")
    body_timeout_s: float = Field(60.0, gt=0, validation_alias="LOOKALIKE_BODY_TIMEOUT")
    max_batch_files: int = Field(16, ge=1, le=256, validation_alias="LOOKALIKE_MAX_BATCH_FILES")
    # Comma-separated; empty means no keys are required (the default, for loopback use).
    api_keys: str = Field("", validation_alias="LOOKALIKE_API_KEYS", repr=False)
    # The edge of each API process (api/edge.py). Connections served at once: one more is
    # answered 503; 1,000 clients long-polling one job must fit well under it.
    max_connections: int = Field(4096, validation_alias="LOOKALIKE_MAX_CONNECTIONS")
    # Seconds a connection has to send a complete request line and headers (slowloris).
    header_timeout_s: float = Field(10.0, validation_alias="LOOKALIKE_HEADER_TIMEOUT")
    # Seconds an idle keep-alive connection is kept after a response. Longer than clients' own
    # idle expiry (httpx: 5 s), so that the client closes an idle connection first: a request
    # sent just as the server closes its connection fails. Behind a load balancer set it
    # longer than the balancer's idle timeout.
    keepalive_timeout_s: float = Field(15.0, validation_alias="LOOKALIKE_KEEPALIVE_TIMEOUT")

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, value: str) -> str:
        keys = [k.strip() for k in value.split(",") if k.strip()]
        if any(len(k) < 16 for k in keys):
            raise ValueError("LOOKALIKE_API_KEYS: every key must be at least 16 characters")
        return ",".join(keys)

    @field_validator("max_connections")
    @classmethod
    def _connections_range(cls, value: int) -> int:
        if not 1 <= value <= 1_000_000:
            raise ValueError(f"LOOKALIKE_MAX_CONNECTIONS={value} must be between 1 and 1000000")
        return value

    @field_validator("header_timeout_s")
    @classmethod
    def _header_timeout_range(cls, value: float) -> float:
        if not 0 < value <= 300:
            raise ValueError(
                f"LOOKALIKE_HEADER_TIMEOUT={value} must be more than 0 and at most 300"
            )
        return value

    @field_validator("keepalive_timeout_s")
    @classmethod
    def _keepalive_timeout_range(cls, value: float) -> float:
        if not 0 < value <= 3600:
            raise ValueError(
                f"LOOKALIKE_KEEPALIVE_TIMEOUT={value} must be more than 0 and at most 3600"
            )
        return value

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.api_keys.split(",") if k)


class LogSettings(_Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias="LOOKALIKE_LOG_LEVEL"
    )
    # text: one readable line per event; json: one JSON object per line (for log shippers).
    format: Literal["text", "json"] = Field("text", validation_alias="LOOKALIKE_LOG_FORMAT")

    @field_validator("level", "format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if value.strip().upper() in _LEVELS else value.strip().lower()


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Settings(BaseModel):
    """The whole configuration; build it with :func:`load_settings`."""

    model: ModelSettings = Field(default_factory=lambda: ModelSettings())
    gallery: GallerySettings = Field(default_factory=lambda: GallerySettings())
    storage: StorageSettings = Field(default_factory=lambda: StorageSettings())
    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings())
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings())
    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    log: LogSettings = Field(default_factory=lambda: LogSettings())


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        where = ".".join(str(p) for p in item.get("loc", ()))
        if "LOOKALIKE_" not in message:
            message = f"{where}: {message}"
        lines.append(message)
    return "invalid settings: " + "; ".join(lines)


def load_settings() -> Settings:
    """Read the environment; raise :class:`ConfigError` naming the variable on nonsense."""
    try:
        settings = Settings()
    except ValidationError as error:
        raise ConfigError(_explain(error)) from error
    broker = settings.broker
    if broker.visibility_timeout_s <= broker.task_time_limit_s:
        raise ConfigError(
            "invalid settings: LOOKALIKE_VISIBILITY_TIMEOUT "
            f"({broker.visibility_timeout_s}s) must exceed LOOKALIKE_TASK_TIME_LIMIT "
            f"({broker.task_time_limit_s}s), or running jobs would be delivered twice"
        )
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
