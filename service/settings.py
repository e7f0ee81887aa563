"""One Settings object for the API, the workers and the CLI (environment prefix `PONDER_`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SECRET = "change-me"
VAR_DIR = Path("var")
# Seconds before each webhook retry: roughly 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 24 h (8 attempts, ~41 h).
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 86400.0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PONDER_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"

    # storage and queue
    database_url: str = f"sqlite:///{VAR_DIR / 'ponder.db'}"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # the model and its engine
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_num_seqs: int = Field(16, ge=1, le=1024)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_memory: int | None = Field(None, gt=0)

    # job limits
    default_max_tokens: int = Field(2048, ge=1)
    max_tokens_limit: int = Field(32768, ge=1)
    max_request_bytes: int = Field(1 << 20, ge=1024)
    job_ttl_seconds: int = Field(24 * 3600, ge=1)  # a job not finished by then expires
    lease_seconds: int = Field(60, ge=5)  # a running job's claim; renewed while it runs
    progress_interval_seconds: float = Field(2.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    resend_queued_after_seconds: int = Field(120, ge=1)  # a queued job untouched this long is sent again
    maintenance_interval_seconds: float = Field(15.0, gt=0)  # how often beat runs the maintenance tasks
    stream_ttl_seconds: int = Field(3600, ge=1)  # how long a finished job's deltas stay in Redis
    worker_heartbeat_seconds: float = Field(5.0, gt=0)  # workers refresh their liveness key this often

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None  # the base URL clients use (Location headers, links)
    api_key_cache_seconds: float = Field(5.0, ge=0)  # a revoked key stops working within this long

    # webhooks
    # Targets on loopback and private networks: handy in development, an SSRF hole in production.
    webhook_allow_private: bool | None = None  # unset: on, except in production
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    webhook_retry_jitter: float = Field(0.2, ge=0, lt=1)  # each delay is scaled by 1 +- this, at random
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_sweep_interval_seconds: float = Field(5.0, gt=0)  # how often beat sends due deliveries
    webhook_resend_after_seconds: float = Field(60.0, gt=0)  # a due delivery's message counts as lost after this
    webhook_secret_grace_seconds: int = Field(24 * 3600, ge=0)  # a rotated-out secret still signs this long
    webhook_concurrency: int = Field(8, ge=1, le=256)  # deliveries in flight per webhooks worker

    # operators: Prometheus metrics and Flower
    metrics_enabled: bool = True  # the API's /metrics (no API key: keep it off the public internet)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9101, ge=0, le=65535)  # one per worker process on a host; 0 = none
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_url_prefix: str = ""  # behind a reverse proxy at https://ops.example.com/flower: "flower"
    flower_user: str = Field("admin", min_length=1, pattern=r"^[^:,]+$")
    flower_password: str = Field(DEFAULT_SECRET, min_length=1, pattern=r"^[^,]+$")  # commas split Flower's list
    flower_db: Path = VAR_DIR / "flower"  # Flower's saved task and worker history

    # secrets
    secret_key: str = DEFAULT_SECRET

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        """A JSON list or comma-separated seconds: PONDER_WEBHOOK_RETRY_SCHEDULE=1,2,4."""
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            value = [part for part in text.replace(" ", "").split(",") if part]
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule_values(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value) or len(value) > 50:
            raise ValueError("webhook_retry_schedule: at most 50 delays, each >= 0 seconds")
        return value

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET:
            raise ValueError("PONDER_SECRET_KEY is left at its default; set a secret for production")
        return self

    @model_validator(mode="after")
    def _webhook_defaults(self) -> Settings:
        if self.webhook_allow_private is None:
            self.webhook_allow_private = self.environment != "production"
        return self

    def flower_basic_auth(self) -> str:
        """`user:password` for Flower's basic auth; the default password only in development."""
        if self.environment != "development" and self.flower_password == DEFAULT_SECRET:
            raise ValueError("PONDER_FLOWER_PASSWORD is left at its default; set one (Flower shows every task)")
        return f"{self.flower_user}:{self.flower_password}"

    @property
    def webhook_require_https(self) -> bool:
        return self.environment == "production"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def visibility_timeout(self) -> int:
        """Redis redelivers an unacknowledged task after this long: above the longest job."""
        return self.job_ttl_seconds + 3600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
