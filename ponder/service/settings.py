"""One Settings object for the API, the workers and the CLI (environment prefix `PONDER_`)."""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ponder.engine.config import EngineConfig

DEFAULT_SECRET = "change-me"
MIN_SECRET_KEY_CHARS = 32  # PONDER_SECRET_KEY in production: 32 random bytes' worth (token_urlsafe(32) is 43)
# Relative to a process's working directory: `make run` keeps its state in the checkout's var/.
DEFAULT_DATA_DIR = Path("var")
# Seconds before each webhook retry: roughly 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 24 h (8 attempts, ~41 h).
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 86400.0)

# Threads (and so database connections) an API process gives its streams' row reads, apart from the
# requests' own (ponder/api/capacity.py): a crowd of streams never starves requests, nor the reverse.
STREAM_DB_THREADS = 4

# The service's engine defaults where they differ from EngineConfig's: each job in flight on a
# worker holds one of its threads, so fewer than the engine's 64 by default.
ENGINE_DEFAULTS: dict[str, Any] = {"max_num_seqs": 16}
# The service's bounds on top of EngineConfig's own checks (dtype, fp8_weights, positive sizes).
ENGINE_LIMITS = {"max_num_seqs": (1, 1024), "max_num_batched_tokens": (16, None), "max_model_len": (16, None)}


class EngineVariables(PydanticBaseSettingsSource):
    """`PONDER_<field>` for every EngineConfig field (PONDER_DEVICE, PONDER_MAX_NUM_SEQS,
    PONDER_BLOCK_SIZE...), as `source` reads them (the environment or the .env file), nested under
    `engine`: the engine's settings keep the flat names docs/configuration.md documents."""

    def __init__(self, settings_cls: type[BaseSettings], source: EnvSettingsSource) -> None:
        super().__init__(settings_cls)
        self.source = source

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not used: __call__ reads the variables itself

    def __call__(self) -> dict[str, Any]:
        found = {}
        for name in (f.name for f in dataclasses.fields(EngineConfig)):
            variable = self.source.env_prefix + name
            value = self.source.env_vars.get(variable if self.source.case_sensitive else variable.lower())
            if value is not None:
                found[name] = value
        return {"engine": found} if found else {}


class Settings(BaseSettings):
    # PONDER_ENV_FILE names another file than ./.env (the tests name none: a developer's .env never
    # reaches them); read when this module is imported.
    model_config = SettingsConfigDict(
        env_prefix="PONDER_", env_file=os.environ.get("PONDER_ENV_FILE", ".env"), extra="ignore"
    )

    environment: Literal["development", "production", "test"] = "development"

    # storage and queue
    # Where a process keeps its local state unless a setting below says otherwise: the SQLite
    # database, /v1/files, Flower's history, beat's schedule, and what `ponder up` writes (its
    # processes' logs, the development key, a private Redis's data, the API's shared metrics files).
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = Field(default_factory=lambda data: f"sqlite:///{data['data_dir'] / 'ponder.db'}")
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Uploaded and generated files (/v1/files: batch inputs and results), one file per id. The API
    # and the batches worker (which writes batch results) must both see it: one host, or a shared volume.
    files_dir: Path = Field(default_factory=lambda data: data["data_dir"] / "files")
    beat_schedule: Path = Field(default_factory=lambda data: data["data_dir"] / "celerybeat-schedule")

    # the model and its engine (the engine's fields from PONDER_DEVICE, PONDER_MAX_NUM_SEQS...: see EngineVariables)
    model: str = "smollm2-135m"
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(**ENGINE_DEFAULTS))

    # job limits
    default_max_tokens: int = Field(2048, ge=1)
    max_tokens_limit: int = Field(32768, ge=1)
    max_request_bytes: int = Field(1 << 20, ge=1024)
    # /v1/files and /v1/batches, with OpenAI's limits: an upload's size (413 beyond), a batch's lines
    max_file_bytes: int = Field(200 * 1000 * 1000, ge=1)
    batch_max_requests: int = Field(50_000, ge=1)
    # per API key: the bytes of its stored files (uploads and batch results) and its unfinished batches
    file_storage_per_key_bytes: int = Field(10 * 1000**3, ge=1)
    max_batches_per_key: int = Field(16, ge=1)
    # per API key: the prompt tokens of its batch lines waiting to start (OpenAI's enqueued-token
    # limit); a line beyond it is refused alone, with a 429
    batch_enqueued_tokens_per_key: int = Field(50_000_000, ge=1)
    job_ttl_seconds: int = Field(24 * 3600, ge=1)  # a job not finished by then expires
    lease_seconds: int = Field(60, ge=5)  # a running job's claim; renewed while it runs
    progress_interval_seconds: float = Field(2.0, gt=0)
    # A re-run continues from the last progress flush's token ids; off: it starts over (for
    # comparison: benchmarks/faults.py --no-resume).
    resume_from_checkpoint: bool = True
    # Prefix-cache blocks are shared only among one API key's jobs (a salt per key), so that
    # `cached_tokens` cannot reveal another tenant's prompts; on: shared by all (one organisation).
    share_prefix_cache: bool = False
    # On SIGTERM/SIGINT an inference worker releases its jobs (checkpointed, requeued at once) and
    # exits within this long, whatever a job thread is doing.
    drain_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # Scheduling (ponder/workers/job_picker.py, ponder/workers/kv_reservations.py): a free slot takes the fair pick
    # among queued jobs (off: the job its message names, first come first served), if its engine
    # can hold the prompt plus this share of each sample's max tokens beside the jobs it has;
    # else, after waiting this long for room, the job stays queued for another worker.
    fair_scheduling: bool = True
    admission_output_share: float = Field(0.25, ge=0, le=1)
    admission_wait_seconds: float = Field(1.0, ge=0)
    # Of a worker's engine slots and KV blocks, the most a batch's lines hold; the rest is kept for
    # direct jobs, which then start at once however long the batch's lines run.
    batch_engine_share: float = Field(0.875, gt=0, le=1)
    resend_queued_after_seconds: int = Field(120, ge=1)  # a queued job untouched this long is sent again
    maintenance_interval_seconds: float = Field(15.0, gt=0)  # how often beat runs the maintenance tasks
    stream_ttl_seconds: int = Field(3600, ge=1)  # how long a finished job's deltas stay in Redis
    worker_heartbeat_seconds: float = Field(5.0, gt=0)  # workers refresh their liveness key this often

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None  # the base URL clients use (Location headers, links)
    api_key_cache_seconds: float = Field(5.0, ge=0)  # a revoked key stops working within this long
    # Capacity of one process (docs/operations.md#capacity). Its database pool holds
    # db_pool_size + db_max_overflow connections; an API process admits api_max_in_flight requests
    # at once (503 + Retry-After beyond, at once) and runs their blocking parts on as many threads,
    # plus STREAM_DB_THREADS for streams' row reads, so that no thread ever
    # waits for a connection: the pool must hold them all (checked below).
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_pool_timeout: float = Field(30.0, gt=0)  # seconds to wait for a connection (then 503 in the API)
    api_max_in_flight: int = Field(16, ge=1)
    # of which one API key may hold this many (429 + Retry-After beyond): another key finds room
    api_max_in_flight_per_key: int = Field(8, ge=1)
    # A request body may take this long, then must keep arriving at api_body_min_rate bytes a second
    # (0: no rate): a 408 beyond (ponder/api/middleware.py BodyLimits)
    api_body_grace_seconds: float = Field(10.0, gt=0)
    api_body_min_rate: int = Field(16_384, ge=0)
    overload_retry_after_seconds: int = Field(1, ge=1)  # the Retry-After of a 503 (overloaded) or a 429 (in flight)
    max_streams_per_key: int = Field(64, ge=1)  # live streams and waiting calls of one API key, all API processes
    # Finished jobs' prompts and outputs are erased this many days after they finished (usage
    # stays); 0: kept until DELETE /v1/jobs/{id}.
    retention_days: float = Field(0, ge=0)
    # /docs, /redoc and /openapi.json; unset: on, except in production
    docs_enabled: bool | None = None

    # rate limits and quotas per API key (ponder/service/rate_limits.py): a key's own (ApiKey columns,
    # `ponder keys create/update`), else these deployment defaults; 0 = unlimited
    rate_limit_requests_per_minute: int = Field(0, ge=0)
    rate_limit_tokens_per_minute: int = Field(0, ge=0)  # prompt + max tokens at admission, then real usage
    rate_limit_tokens_per_day: int = Field(0, ge=0)
    rate_limit_max_concurrent_jobs: int = Field(0, ge=0)  # queued + running jobs of the key
    # The length of a "minute" and a "day" (fixed windows on Redis' clock): shorter only in tests.
    rate_limit_window_seconds: float = Field(60.0, gt=0)
    rate_limit_day_seconds: float = Field(86400.0, gt=0)

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
    # attempts in flight to one receiver (scheme, host, port) across every webhooks worker: a slow
    # receiver holds this many threads, never all of them (ponder/workers/receiver_slots.py)
    webhook_max_in_flight_per_receiver: int = Field(4, ge=1)
    # and of one API key's deliveries, whatever their receivers: a key with many slow receivers
    # holds this many, never every thread (keep it under the webhooks workers' threads)
    webhook_max_in_flight_per_key: int = Field(4, ge=1)

    # operators: Prometheus metrics and Flower
    metrics_enabled: bool = True  # the API's /metrics (no API key: keep it off the public internet)
    metrics_token: str | None = None  # set: /metrics asks for `Authorization: Bearer <token>` (401 without)
    metrics_cache_seconds: float = Field(30.0, ge=0)  # the database's numbers: counted at most this often
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9101, ge=0, le=65535)  # one per worker process on a host; 0 = none
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_url_prefix: str = ""  # behind a reverse proxy at https://ops.example.com/flower: "flower"
    flower_user: str = Field("admin", min_length=1, pattern=r"^[^:,]+$")
    flower_password: str = Field(DEFAULT_SECRET, min_length=1, pattern=r"^[^,]+$")  # commas split Flower's list
    flower_db: Path = Field(default_factory=lambda data: data["data_dir"] / "flower")  # its task and worker history

    # secrets: PONDER_SECRET_KEY encrypts webhook signing secrets at rest (ponder/service/encryption.py);
    # after a rotation, the old key(s), comma-separated, still decrypt until `ponder secrets reencrypt`
    secret_key: str = DEFAULT_SECRET
    previous_secret_keys: Annotated[tuple[str, ...], NoDecode] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual order (arguments, environment, .env, secrets), with the engine's flat variables
        read next to the others of their source."""
        # pydantic-settings passes its EnvSettingsSource and DotEnvSettingsSource (a subclass) here
        assert isinstance(env_settings, EnvSettingsSource) and isinstance(dotenv_settings, EnvSettingsSource)
        return (
            init_settings,
            EngineVariables(settings_cls, env_settings),
            env_settings,
            EngineVariables(settings_cls, dotenv_settings),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_defaults(cls, value: Any) -> Any:
        """Fields not set take the service's defaults first, then EngineConfig's."""
        return ENGINE_DEFAULTS | value if isinstance(value, dict) else value

    @field_validator("engine")
    @classmethod
    def _engine_limits(cls, engine: EngineConfig) -> EngineConfig:
        """The service's bounds (EngineConfig checked its own while it was built)."""
        for name, (low, high) in ENGINE_LIMITS.items():
            value = getattr(engine, name)
            if value is not None and (value < low or (high is not None and value > high)):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"PONDER_{name.upper()} must be {bounds}, got {value}")
        return engine

    @field_validator("previous_secret_keys", mode="before")
    @classmethod
    def _previous_keys(cls, value: Any) -> Any:
        """Comma-separated: PONDER_PREVIOUS_SECRET_KEYS=old-key-1,old-key-2."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

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
        if self.environment != "production":
            return self
        if self.secret_key == DEFAULT_SECRET:
            raise ValueError("PONDER_SECRET_KEY is left at its default; set a secret for production")
        if len(self.secret_key) < MIN_SECRET_KEY_CHARS:  # "" or a password: HKDF does not stretch a guessable one
            raise ValueError(
                f"PONDER_SECRET_KEY must be at least {MIN_SECRET_KEY_CHARS} characters of random data in production, "
                'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return self

    @model_validator(mode="after")
    def _pool_holds_the_threads(self) -> Settings:
        needed = self.api_max_in_flight + STREAM_DB_THREADS
        if self.db_pool_size + self.db_max_overflow < needed:
            raise ValueError(
                f"PONDER_DB_POOL_SIZE + PONDER_DB_MAX_OVERFLOW ({self.db_pool_size} + {self.db_max_overflow}) must be "
                f"at least PONDER_API_MAX_IN_FLIGHT + {STREAM_DB_THREADS} ({needed}): a thread each needs a connection"
            )
        return self

    @model_validator(mode="after")
    def _webhook_defaults(self) -> Settings:
        if self.webhook_allow_private is None:
            self.webhook_allow_private = self.environment != "production"
        return self

    @model_validator(mode="after")
    def _docs_default(self) -> Settings:
        if self.docs_enabled is None:  # the schema maps every route: not published in production
            self.docs_enabled = self.environment != "production"
        return self

    def check_api(self) -> None:
        """What an API process refuses to start with (a ValueError saying why): the other processes
        serve no /metrics of the API's and are not held to it."""
        if self.environment == "production" and self.metrics_enabled and self.metrics_token is None:
            raise ValueError(
                "PONDER_METRICS_TOKEN is unset in production: /metrics would be public. Set a token "
                "(Prometheus sends it as a bearer token), or PONDER_METRICS_ENABLED=false"
            )

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
