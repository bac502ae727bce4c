"""Configuration: one TOML file plus ``RUNYARD_*`` environment overrides.

Every section is a small frozen pydantic model; durations carry their unit in
the field name (``*_ms``, ``*_s``). :func:`load_config` reads the file (the
``--config`` argument, else ``$RUNYARD_CONFIG``, else built-in defaults),
applies environment overrides and validates the result. Any problem raises
:class:`ConfigError`, which lists *every* bad field with its dotted path and,
when the value came from the environment, the variable's name.

Environment overrides:

* ``RUNYARD_<SECTION>__<FIELD>`` (double underscore between levels), e.g.
  ``RUNYARD_GATEWAY__LISTEN=0.0.0.0:50051`` or
  ``RUNYARD_AGENTS__DEFAULT__MODEL=openai/gpt-4o-mini``. Values that start
  with ``[`` or ``{`` are parsed as JSON (lists, tables).
* Short aliases for the settings operators touch most: see :data:`ENV_ALIASES`.

Secrets (provider API keys) are never read from the file: a provider names
the environment variable that holds its key (``api_key_env``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AgentConfig",
    "AuthConfig",
    "CompactionConfig",
    "ClassifierConfig",
    "ClassifierRule",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "ENV_ALIASES",
    "EndpointsConfig",
    "GatewayConfig",
    "HOOK_EVENT_TYPES",
    "HookHandlerConfig",
    "HookPluginConfig",
    "HooksConfig",
    "LIFECYCLE_EVENT_TYPES",
    "MaintenanceConfig",
    "McpServerConfig",
    "ProviderConfig",
    "RouterConfig",
    "SessionsConfig",
    "TaskConcurrencyConfig",
    "TasksConfig",
    "TlsConfig",
    "WorkerConfig",
    "did_you_mean",
    "load_config",
    "mcp_environment_problems",
    "merge_tree",
]

#: Environment variables that set one field directly (variable -> dotted path).
ENV_ALIASES: dict[str, str] = {
    "RUNYARD_DATABASE_URL": "database.url",
    "RUNYARD_DATA_DIR": "database.data_dir",
    "RUNYARD_HANDSHAKE_TIMEOUT_MS": "gateway.handshake_timeout_ms",
    "RUNYARD_INTERNAL_SECRET": "auth.internal_secret",
    # Retired (HS256); kept so a leftover variable gets a clear error instead of being ignored.
    "RUNYARD_RUN_TOKEN_SECRET": "auth.run_token_secret",
    "RUNYARD_RUN_TOKEN_PRIVATE_KEY": "auth.run_token_private_key",
    "RUNYARD_RUN_TOKEN_PUBLIC_KEY": "auth.run_token_public_key",
    "RUNYARD_LOG_LEVEL": "log_level",
}

_RESERVED_ENV = {"RUNYARD_CONFIG", "RUNYARD_TEST_DATABASE_URL", "RUNYARD_HOME", "RUNYARD_MODEL"}

HANDSHAKE_TIMEOUT_MIN_MS = 1_000
HANDSHAKE_TIMEOUT_MAX_MS = 120_000

_MODEL_REF = re.compile(r"^[A-Za-z0-9_.-]+/.+$")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TASK_CLASS = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_env_name(value: str) -> str:
    """``value`` must name an environment variable (keys never go in the file)."""
    if not _ENV_NAME.match(value):
        # Never echo the value: it may be a key pasted in by mistake.
        raise ValueError(
            "expected the name of an environment variable holding the key (letters, digits, '_'); "
            "the value given is not one, and keys never go in the configuration"
        )
    return value


def _check_refs(value: list[str]) -> list[str]:
    for ref in value:
        if not _MODEL_REF.match(ref):
            raise ValueError(f"expected 'provider/model' entries, got {ref!r}")
    return value


class ConfigError(Exception):
    """Invalid configuration.

    ``problems`` is a list of ``(path, message)`` pairs, one per bad field;
    ``str(error)`` renders them one per line as ``path: message``.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {message}" for path, message in problems))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseConfig(_Section):
    """Where PostgreSQL is.

    ``url`` empty means the embedded server (``pgserver``) in ``data_dir``,
    started by ``runyard up``; services started on their own need a URL.
    ``data_dir`` empty means ``$RUNYARD_HOME/pgdata`` (``RUNYARD_HOME``
    defaults to ``~/.local/share/runyard``), beside the logs and secrets.
    """

    url: str = ""
    data_dir: str = ""
    pool_min_size: int = Field(default=1, ge=0, le=100)
    # Connections per service process (the gateway and the router hold one
    # more, for LISTEN). One asyncio process keeps only a few statements in
    # flight; more connections add runnable backends that compete for the
    # database server's CPUs. The usual bound for all clients together is
    # about 2 x the server's cores (HikariCP's "About Pool Sizing", after
    # the PostgreSQL project's formula). On 2 cores, 4 per service instead
    # of 10 took about 8% (0.2 ms) of PostgreSQL's CPU off each run and
    # most of its backends' wait for a CPU (docs/benchmarks.md, stop 24).
    pool_max_size: int = Field(default=4, ge=1, le=500)
    connect_timeout_s: float = Field(default=10.0, gt=0)


class EndpointsConfig(_Section):
    """Addresses at which the services reach each other (``host:port``).

    ``gateway`` is the public API (clients, the CLI); ``gateway_internal`` is
    the gateway's internal listener (``gateway.internal_listen``): workers'
    hub and task tools, and AdminService for ``runyard status``.
    """

    gateway: str = "127.0.0.1:50051"
    gateway_internal: str = "127.0.0.1:50055"
    router: str = "127.0.0.1:50052"
    sessions: str = "127.0.0.1:50053"


class _ServerSection(_Section):
    listen: str
    # 0 disables the /metrics endpoint.
    metrics_port: int = Field(ge=0, le=65535)
    # How long in-flight work may take to finish after SIGTERM.
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {value!r}")
        return value


class GatewayConfig(_ServerSection):
    """The public API, runs queue and worker hub."""

    # Public listener: GatewayService (plus health and reflection) only.
    listen: str = "127.0.0.1:50051"
    # Internal listener: WorkerHubService, TaskService, AdminService; every
    # call needs the internal secret (and a client certificate with mutual TLS).
    internal_listen: str = "127.0.0.1:50055"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # A worker must send its hello within this; clamped to 1000-120000.
    handshake_timeout_ms: int = 15_000
    # A claimed run's lease; worker heartbeats renew it.
    run_lease_ms: int = Field(default=15_000, ge=1_000, le=600_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, le=60_000)
    # Executions of one run before it fails (worker deaths count).
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Queue polling fallback when LISTEN/NOTIFY is quiet.
    poll_interval_ms: int = Field(default=1_000, ge=10, le=60_000)
    # Run events reach this gateway's clients at once; they are stored (for
    # JoinRun on other replicas and after restarts) in chunks, at the latest
    # this long after they arrive, and with the run's end.
    event_flush_interval_ms: int = Field(default=100, ge=1, le=10_000)
    # Per-message and per-request limits.
    max_text_bytes: int = Field(default=65_536, ge=1, le=16 * 1024 * 1024)
    max_session_key_length: int = Field(default=256, ge=1, le=4096)
    max_metadata_entries: int = Field(default=32, ge=0, le=1024)
    max_metadata_bytes: int = Field(default=8_192, ge=0, le=1024 * 1024)
    max_queued_runs_per_session: int = Field(default=100, ge=1, le=100_000)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Requests per second per API key (token bucket, per gateway replica); 0 = unlimited.
    rate_limit_rps: float = Field(default=50.0, ge=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    # Open streams (SendMessage, Chat, JoinRun, WatchEvents) per API key per replica.
    max_streams_per_key: int = Field(default=64, ge=1, le=100_000)
    # Runs one Chat stream may follow at once (its sends and joins).
    max_follows_per_chat: int = Field(default=16, ge=1, le=10_000)
    # Failed authentications (a bad, unknown or revoked key) allowed per
    # source address and per key id: a token bucket refilled at this rate
    # per second, holding at most the burst. Beyond it, RESOURCE_EXHAUSTED
    # AUTH_RATE_LIMITED before any database lookup; 0 = unlimited.
    auth_failure_rate_per_s: float = Field(default=1.0, ge=0)
    auth_failure_burst: int = Field(default=10, ge=1, le=100_000)
    # Client-side tools (RunOptions.client_tools): a run waiting for their
    # results (RUN_STATUS_REQUIRES_ACTION) fails with TOOL_RESULTS_TIMEOUT
    # after this long; each result's content may be this large.
    tool_results_timeout_s: float = Field(default=600.0, ge=1.0, le=7 * 24 * 3600.0)
    max_tool_result_bytes: int = Field(default=1024 * 1024, ge=1, le=16 * 1024 * 1024)

    @field_validator("internal_listen")
    @classmethod
    def _check_internal_listen(cls, value: str) -> str:
        return cls._check_listen(value)

    # The agent used when a request names none.
    default_agent: str = "default"

    @field_validator("handshake_timeout_ms", mode="before")
    @classmethod
    def _check_handshake(cls, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be a number of milliseconds")
        if isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"must be a whole number of milliseconds, got {value!r}")
            value = int(text)
        if not isinstance(value, int):
            raise ValueError(f"must be a whole number of milliseconds, got {value!r}")
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return min(max(value, HANDSHAKE_TIMEOUT_MIN_MS), HANDSHAKE_TIMEOUT_MAX_MS)


class RouterConfig(_ServerSection):
    """Model choice and failover."""

    listen: str = "127.0.0.1:50052"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # Default time budget of a run (RunOptions.timeout_ms, then
    # agents.<id>.timeout_ms, override it): every attempt, retry, fallback and
    # tool-loop call of the run shares it, end to end.
    request_timeout_ms: int = Field(default=120_000, ge=100, le=3_600_000)
    # No first token within this -> TIMEOUT, next model.
    ttft_timeout_ms: int = Field(default=30_000, ge=10, le=600_000)
    # No token within this after the first -> TIMEOUT.
    idle_timeout_ms: int = Field(default=30_000, ge=10, le=600_000)
    connect_timeout_ms: int = Field(default=5_000, ge=10, le=120_000)
    # Same-model retries before the first token (OVERLOADED, SERVER_ERROR,
    # TIMEOUT, NETWORK; RATE_LIMIT only with a short Retry-After), with
    # exponential backoff plus jitter; always within the request's deadline.
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_initial_ms: int = Field(default=200, ge=1, le=60_000)
    retry_backoff_max_ms: int = Field(default=2_000, ge=1, le=600_000)
    # RATE_LIMIT: wait for Retry-After and retry the same model only if it is
    # at most this long; otherwise rotate the auth profile / move on.
    max_retry_after_ms: int = Field(default=2_000, ge=0, le=600_000)
    # Cooldown schedules: initial * multiplier^(n-1) after the n-th failure,
    # capped. "cooldown": RATE_LIMIT (that model on that profile), AUTH (the
    # profile), MODEL_NOT_FOUND (that model on the provider). "transient":
    # OVERLOADED, SERVER_ERROR, TIMEOUT, NETWORK (the profile). "disable":
    # BILLING, AUTH_PERMANENT (the profile).
    cooldown_initial_ms: int = Field(default=30_000, ge=1, le=86_400_000)
    cooldown_max_ms: int = Field(default=300_000, ge=1, le=86_400_000)
    transient_cooldown_initial_ms: int = Field(default=5_000, ge=1, le=86_400_000)
    transient_cooldown_max_ms: int = Field(default=60_000, ge=1, le=86_400_000)
    disable_initial_s: int = Field(default=5 * 3600, ge=1, le=30 * 86_400)
    disable_max_s: int = Field(default=24 * 3600, ge=1, le=30 * 86_400)
    cooldown_multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    # A key that has been out of cooldown this long starts counting afresh.
    failure_window_s: int = Field(default=3_600, ge=1, le=30 * 86_400)
    # When every candidate is cooling, one request probes the one whose
    # cooldown ends soonest; other requests may probe the same key again only
    # after this interval.
    probe_interval_ms: int = Field(default=2_000, ge=0, le=3_600_000)
    # A cooling primary is probed (throttled as above) when its cooldown ends
    # within this margin; 0 disables early probing of the primary.
    primary_probe_margin_ms: int = Field(default=2_000, ge=0, le=3_600_000)
    # Full reload of the shared cooldown table (LISTEN/NOTIFY carries changes
    # in between; this is the safety net).
    cooldown_sync_interval_ms: int = Field(default=30_000, ge=100, le=3_600_000)
    # Cooldown rows untouched this long (and not cooling) are deleted.
    cooldown_retention_s: int = Field(default=7 * 86_400, ge=60, le=365 * 86_400)

    @model_validator(mode="after")
    def _check_schedules(self) -> RouterConfig:
        for low, high in (
            ("retry_backoff_initial_ms", "retry_backoff_max_ms"),
            ("cooldown_initial_ms", "cooldown_max_ms"),
            ("transient_cooldown_initial_ms", "transient_cooldown_max_ms"),
            ("disable_initial_s", "disable_max_s"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{low} ({getattr(self, low)}) must not exceed {high} ({getattr(self, high)})"
                )
        return self


class SessionsConfig(_ServerSection):
    """Conversation state."""

    listen: str = "127.0.0.1:50053"
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    max_snapshot_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    # Purge (false) or keep as archived (true) the snapshots of a reset session.
    archive_on_reset: bool = False
    # Liveness lease of this instance, renewed every third of it. Once it has
    # lapsed, another instance (or the next start) ends the activations this
    # instance owned with session.end CRASH_RECOVERED.
    instance_lease_s: float = Field(default=15.0, ge=1, le=3_600)
    # Period of idle expiry and crash recovery.
    sweep_interval_s: float = Field(default=10.0, gt=0, le=3_600)
    # An activation whose session saw no run for this long ends with
    # session.end IDLE (the next message resumes it); 0 = never.
    idle_timeout_s: float = Field(default=1_800.0, ge=0, le=365 * 86_400)
    # One total bound on in-process hook handlers during a shutdown drain;
    # the session.end events are durable before it starts.
    drain_timeout_ms: int = Field(default=2_000, ge=0, le=600_000)
    # How this instance ends its activations when it stops: "shutdown" or
    # "restart" (also: SIGUSR1, `--restart-expected`, SetShutdownMode RPC).
    shutdown_mode: Literal["shutdown", "restart"] = "shutdown"


class WorkerConfig(_ServerSection):
    """Run execution."""

    listen: str = "127.0.0.1:50054"
    metrics_port: int = Field(default=9104, ge=0, le=65535)
    # Concurrent runs.
    capacity: int = Field(default=8, ge=1, le=1024)
    # Empty = hostname and pid.
    worker_id: str = ""
    # Backoff between connections to the gateway that end before its
    # welcome: reconnect_initial_ms doubling up to reconnect_max_ms, plus up
    # to reconnect_initial_ms of jitter (after a welcome it starts afresh).
    reconnect_initial_ms: int = Field(default=200, ge=10, le=60_000)
    reconnect_max_ms: int = Field(default=5_000, ge=10, le=600_000)
    # How long a run waits for an unavailable router or sessions service
    # (a restart, a deploy) before it fails.
    dependency_retry_s: float = Field(default=30.0, ge=0, le=3_600)


class AuthConfig(_Section):
    """Callers and service-to-service credentials."""

    # Accept clients without an API key (as org `default_org`).
    anonymous: bool = True
    default_org: str = "default"
    # Shared secret for service-to-service calls (at least 32 bytes): every
    # internal listener requires it, and no service starts without it
    # (`runyard up` generates one).
    internal_secret: str = ""
    # Ed25519 key pair for run tokens (JWT, EdDSA): PEM or base64 (see
    # `runyard keys run-token`). The private key goes to the gateway only
    # (it signs); every other service gets the public key (it verifies).
    run_token_private_key: str = ""
    run_token_public_key: str = ""
    # Lifetime of a run token; the gateway sends a fresh one with the lease
    # renewal once a third of it has passed.
    run_token_ttl_s: int = Field(default=30, ge=2, le=3_600)
    # Retired: run tokens are no longer HS256. Setting it is an error that says what to do.
    run_token_secret: str = ""

    @field_validator("run_token_secret")
    @classmethod
    def _retired_secret(cls, value: str) -> str:
        if value:
            raise ValueError(
                "HS256 run tokens were replaced by Ed25519: set auth.run_token_private_key on the gateway "
                "and auth.run_token_public_key on the other services (RUNYARD_RUN_TOKEN_PRIVATE_KEY / "
                "RUNYARD_RUN_TOKEN_PUBLIC_KEY; `runyard keys run-token` makes a pair), and drop this setting"
            )
        return value

    @field_validator("run_token_private_key")
    @classmethod
    def _check_private(cls, value: str) -> str:
        if value:
            from runyard.common.auth import load_private_key

            load_private_key(value)  # ValueError never repeats the key
        return value

    @field_validator("run_token_public_key")
    @classmethod
    def _check_public(cls, value: str) -> str:
        if value:
            from runyard.common.auth import load_public_key

            load_public_key(value)
        return value

    @model_validator(mode="after")
    def _check_pair(self) -> AuthConfig:
        if self.run_token_private_key and self.run_token_public_key:
            from runyard.common.auth import load_private_key, load_public_key, public_key_text

            derived = public_key_text(load_private_key(self.run_token_private_key).public_key())
            if derived != public_key_text(load_public_key(self.run_token_public_key)):
                raise ValueError("run_token_public_key is not the public half of run_token_private_key")
        return self


_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"}
)


class ProviderConfig(_Section):
    """A model provider.

    ``type``: ``openai`` (any OpenAI-compatible chat completions endpoint:
    OpenAI, vLLM, Ollama, llama.cpp server, OpenRouter), ``anthropic``
    (Messages API) or ``echo`` (built in, deterministic, no network).
    """

    type: Literal["openai", "anthropic", "echo"]
    base_url: str = ""
    # Name of the environment variable holding the API key (never the key).
    # It is the auth profile "default" unless auth_profiles is given.
    api_key_env: str = ""
    # Several credentials: profile name -> name of the environment variable
    # holding that key (never the key). The router rotates them least
    # recently used first and pins one per session until it fails.
    auth_profiles: dict[str, str] = Field(default_factory=dict)
    # Extra HTTP headers sent with every request.
    headers: dict[str, str] = Field(default_factory=dict)
    # echo: pause between streamed words.
    echo_delay_ms: int = Field(default=0, ge=0, le=60_000)
    # anthropic: the anthropic-version header, and max_tokens when neither
    # the run nor the agent sets one (the Messages API requires it).
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(default=4_096, ge=1, le=1_000_000)

    @field_validator("api_key_env")
    @classmethod
    def _check_api_key_env(cls, value: str) -> str:
        return _check_env_name(value) if value else value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Credentials never go in the file: they come from the environment
        # (api_key_env / auth_profiles). The value is not echoed.
        for name in value:
            if name.lower() in _CREDENTIAL_HEADERS:
                raise ValueError(
                    f"header {name!r} carries a credential; name the environment variable that holds "
                    "the key in api_key_env (or auth_profiles) instead"
                )
        return value

    @field_validator("auth_profiles")
    @classmethod
    def _check_auth_profiles(cls, value: dict[str, str]) -> dict[str, str]:
        for name, env in value.items():
            if not _PROFILE_NAME.match(name):
                raise ValueError(f"auth profile names use letters, digits, '_', '.', '-'; got {name!r}")
            _check_env_name(env)
        return value

    @model_validator(mode="after")
    def _check(self) -> ProviderConfig:
        if self.type in ("openai", "anthropic") and not self.base_url:
            raise ValueError(f"base_url is required for a provider of type {self.type!r}")
        if self.base_url and not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self

    @property
    def profiles(self) -> dict[str, str]:
        """Auth profiles, name -> environment variable ("" = no key)."""
        if self.auth_profiles:
            return dict(self.auth_profiles)
        return {"default": self.api_key_env}


# -- MCP servers (issue 13): an agent's tool servers -------------------------------------------------

_MCP_SERVER_NAME = re.compile(r"^[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class McpServerConfig(_Section):
    """One MCP tool server of an agent (``[agents.<id>.mcp_servers.<name>]``),
    run by the worker through the official ``mcp`` SDK (runyard.worker.mcp).

    Exactly one transport: ``command`` (stdio: the worker starts the process,
    with ``args``, in ``cwd``) or ``url`` (streamable HTTP). Secrets never go
    in the file: a stdio server gets the worker's variables named in
    ``pass_env``; an HTTP server gets headers whose values come from the
    variables named in ``env_headers`` (header -> variable) or
    ``bearer_token_env`` (``Authorization: Bearer <value>``). A variable the
    worker lacks stops the worker at start-up with its name.

    ``allow``/``deny``: the server's tool names (``fnmatch`` patterns, e.g.
    ``"read_*"``) offered to the model; empty ``allow`` = every tool; ``deny``
    wins. The model sees each tool as ``<server>__<tool>``.
    """

    command: str = ""
    args: list[str] = Field(default_factory=list)
    # Literal (non-secret) variables for the process; it also inherits HOME, PATH, SHELL, TERM, USER, LOGNAME.
    env: dict[str, str] = Field(default_factory=dict)
    # Names of the worker's environment variables the process gets (its keys and tokens).
    pass_env: list[str] = Field(default_factory=list)
    cwd: str = ""
    url: str = ""
    # Static, non-secret HTTP headers.
    headers: dict[str, str] = Field(default_factory=dict)
    # HTTP header -> name of the worker's environment variable holding its value.
    env_headers: dict[str, str] = Field(default_factory=dict)
    # Name of the environment variable holding a bearer token (sent as Authorization).
    bearer_token_env: str = ""
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    # One tool call, from request to result; on expiry the model gets an is_error result.
    call_timeout_ms: int = Field(default=60_000, ge=10, le=3_600_000)
    # Text of one result kept for the model; longer results are cut with a note saying so.
    max_result_bytes: int = Field(default=65_536, ge=256, le=16 * 1024 * 1024)
    # Start (or connect), handshake and first tool listing; also how long a call waits
    # for a server that is (re)starting.
    startup_timeout_ms: int = Field(default=30_000, ge=100, le=600_000)
    enabled: bool = True

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable names use letters, digits and '_'; got {name!r}")
        return value

    @field_validator("pass_env")
    @classmethod
    def _check_pass_env(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"expected names of environment variables, got {name!r}")
        return value

    @field_validator("bearer_token_env")
    @classmethod
    def _check_bearer(cls, value: str) -> str:
        return _check_env_name(value) if value else value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() in _CREDENTIAL_HEADERS:
                # The value is not echoed: it may be a key.
                raise ValueError(
                    f"header {name!r} carries a credential; name the environment variable that holds it "
                    "in env_headers (or bearer_token_env) instead"
                )
        return value

    @field_validator("env_headers")
    @classmethod
    def _check_env_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, env in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if not _ENV_NAME.match(env):
                raise ValueError(
                    f"header {name!r}: expected the name of an environment variable holding the value "
                    "(letters, digits, '_'); values never go in the configuration"
                )
        return value

    @field_validator("allow", "deny")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("tool names and patterns must not be empty")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> McpServerConfig:
        if bool(self.command) == bool(self.url):
            raise ValueError("set exactly one of command (a stdio server) or url (a streamable HTTP server)")
        if self.url:
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"url must start with http:// or https:// and name a host, got {self.url!r}")
            stray = [n for n in ("args", "env", "pass_env", "cwd") if getattr(self, n)]
        else:
            stray = [n for n in ("headers", "env_headers", "bearer_token_env") if getattr(self, n)]
        if stray:
            kind = "an HTTP server (url)" if self.url else "a stdio server (command)"
            raise ValueError(f"{', '.join(stray)} do not apply to {kind}")
        if self.bearer_token_env and any(n.lower() == "authorization" for n in self.env_headers):
            raise ValueError(
                "bearer_token_env and env_headers.Authorization both set the Authorization header"
            )
        return self

    @property
    def transport(self) -> Literal["stdio", "http"]:
        """``stdio`` or ``http``."""
        return "stdio" if self.command else "http"

    @property
    def environment_names(self) -> list[str]:
        """Every environment variable of the worker this server needs."""
        names = [*self.pass_env, *self.env_headers.values()]
        if self.bearer_token_env:
            names.append(self.bearer_token_env)
        return list(dict.fromkeys(names))


def mcp_environment_problems(
    config: Config, environ: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """The environment variables the agents' enabled MCP servers name
    (``pass_env``, ``env_headers``, ``bearer_token_env``) that ``environ``
    (default ``os.environ``) lacks, as ``(path, message)`` problems: the
    worker refuses to start without them (``runyard serve worker``)."""
    env = os.environ if environ is None else environ
    problems: list[tuple[str, str]] = []
    for agent_id, agent in sorted(config.agents.items()):
        for name, server in sorted(agent.mcp_servers.items()):
            if not server.enabled:
                continue
            base = f"agents.{agent_id}.mcp_servers.{name}"
            fields = [
                *((f"{base}.pass_env", var) for var in server.pass_env),
                *((f"{base}.env_headers.{header}", var) for header, var in server.env_headers.items()),
                *([(f"{base}.bearer_token_env", server.bearer_token_env)] if server.bearer_token_env else []),
            ]
            for path, var in fields:
                if var not in env:
                    problems.append((path, f"environment variable {var} is not set (the worker needs it)"))
    return problems


# -- end MCP servers ---------------------------------------------------------------------------------


class AgentConfig(_Section):
    """An agent: a system prompt and a model chain (``provider/model`` refs)."""

    model: str
    fallbacks: list[str] = Field(default_factory=list)
    system_prompt: str = "You are a helpful assistant."
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_output_tokens: int = Field(default=0, ge=0)
    # Time budget of this agent's runs when RunOptions.timeout_ms is 0
    # (0 = router.request_timeout_ms).
    timeout_ms: int = Field(default=0, ge=0, le=3_600_000)
    # On CONTEXT_OVERFLOW: larger-context models to try, in order (else the
    # worker compacts the session and retries once, else abort).
    context_window_chain: list[str] = Field(default_factory=list)
    # On CONTENT_POLICY: models to try, in order (else abort).
    content_policy_chain: list[str] = Field(default_factory=list)
    # Task class (from [classifier] rules or the request) -> model to start
    # with; the agent's chain follows it.
    task_models: dict[str, str] = Field(default_factory=dict)
    # Built-in tools offered to the agent's model on every run (the model must
    # support tool calls): "spawn_task" starts a background task, "task_output"
    # reads one. A run with RunOptions.tools_enabled gets both regardless.
    tools: list[Literal["spawn_task", "task_output"]] = Field(default_factory=list)
    # MCP tool servers (issue 13), by name: the model sees their tools as "<name>__<tool>".
    mcp_servers: dict[str, McpServerConfig] = Field(default_factory=dict)

    @field_validator("mcp_servers")
    @classmethod
    def _check_mcp_names(cls, value: dict[str, McpServerConfig]) -> dict[str, McpServerConfig]:
        for name in value:
            if len(name) > 32 or not _MCP_SERVER_NAME.match(name):
                raise ValueError(
                    f"MCP server names use letters, digits, '-' and single '_' (at most 32, no '__', "
                    f"not starting or ending with '_'): they prefix tool names; got {name!r}"
                )
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not _MODEL_REF.match(value):
            raise ValueError(f"expected 'provider/model', got {value!r}")
        return value

    @field_validator("context_window_chain", "content_policy_chain")
    @classmethod
    def _check_chains(cls, value: list[str]) -> list[str]:
        return _check_refs(value)

    @field_validator("task_models")
    @classmethod
    def _check_task_models(cls, value: dict[str, str]) -> dict[str, str]:
        for task_class, ref in value.items():
            if not _TASK_CLASS.match(task_class):
                raise ValueError(f"task class names use letters, digits, '_', '.', '-'; got {task_class!r}")
            if not _MODEL_REF.match(ref):
                raise ValueError(f"task class {task_class!r}: expected 'provider/model', got {ref!r}")
        return value

    @property
    def model_refs(self) -> list[str]:
        """Every model the agent may use (chain, task models, special chains)."""
        return list(
            dict.fromkeys(
                [
                    *self.chain,
                    *self.task_models.values(),
                    *self.context_window_chain,
                    *self.content_policy_chain,
                ]
            )
        )

    @field_validator("fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not _MODEL_REF.match(ref):
                raise ValueError(f"expected 'provider/model' entries, got {ref!r}")
        return value

    @property
    def chain(self) -> list[str]:
        """The primary model followed by the fallbacks, without repeats."""
        return list(dict.fromkeys([self.model, *self.fallbacks]))


class ClassifierRule(_Section):
    """One task-classifier rule: every condition it sets must hold.

    ``keywords``: any of them, case-insensitive, as whole words or phrases.
    ``regex``: a Python regular expression searched in the text (add ``(?i)``
    for case-insensitive). ``min_chars``/``max_chars``: text length bounds
    (0 = unbounded). ``has_code``: fenced code or code-looking lines present
    (True) or absent (False). ``has_attachments``: likewise for attachments.
    """

    task_class: str
    keywords: list[str] = Field(default_factory=list)
    regex: str = ""
    min_chars: int = Field(default=0, ge=0)
    max_chars: int = Field(default=0, ge=0)
    has_code: bool | None = None
    has_attachments: bool | None = None

    @field_validator("task_class")
    @classmethod
    def _check_class(cls, value: str) -> str:
        if not _TASK_CLASS.match(value):
            raise ValueError(f"task class names use letters, digits, '_', '.', '-'; got {value!r}")
        return value

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str) -> str:
        if value:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_rule(self) -> ClassifierRule:
        if not (
            self.keywords
            or self.regex
            or self.min_chars
            or self.max_chars
            or self.has_code is not None
            or self.has_attachments is not None
        ):
            raise ValueError(f"rule for task class {self.task_class!r} sets no condition")
        if self.max_chars and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


class ClassifierConfig(_Section):
    """The router's task classifier: the first matching rule names the task
    class; ``default_class`` applies when none matches ("" = no class)."""

    rules: list[ClassifierRule] = Field(default_factory=list)
    default_class: str = ""


class TlsConfig(_Section):
    """TLS for every gRPC server and internal channel (off by default).

    With ``enabled``, each server presents ``cert_file``/``key_file`` and
    internal clients verify it against ``ca_file``. ``require_client_cert``
    makes the internal services (router, sessions, worker health) demand a
    client certificate signed by ``ca_file`` (mutual TLS); internal clients
    present ``client_cert_file``/``client_key_file`` (default: the server
    pair). The gateway also serves outside clients, so it requires client
    certificates only when ``gateway_require_client_cert`` is set.
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = True
    gateway_require_client_cert: bool = False
    client_cert_file: str = ""
    client_key_file: str = ""
    # Name to verify in server certificates when endpoints are IPs or aliases.
    server_name: str = ""

    @model_validator(mode="after")
    def _check(self) -> TlsConfig:
        if self.enabled:
            missing = [n for n in ("cert_file", "key_file", "ca_file") if not getattr(self, n)]
            if missing:
                raise ValueError(f"{', '.join(missing)} required when tls.enabled is true")
        return self


#: Lifecycle event names (DESIGN.md section 6).
LIFECYCLE_EVENT_TYPES: tuple[str, ...] = (
    "message.received",
    "message.sent",
    "run.queued",
    "run.started",
    "run.completed",
    "run.failed",
    "model.request",
    "model.response",
    "model.failover",
    "session.start",
    "session.end",
    "session.updated",
    "session.compacted",
    "task.spawned",
    "task.started",
    "task.completed",
    "tool.called",
    "tool.completed",
    "service.startup",
    "service.shutdown",
)

#: Events delivered to in-process hook handlers. Handlers run in the sessions
#: service, which emits these; the others are read with WatchEvents.
HOOK_EVENT_TYPES: tuple[str, ...] = (
    "session.start",
    "session.end",
    "session.updated",
    "session.compacted",
    "service.startup",
    "service.shutdown",
)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_HOOK_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*(:{_IDENT}(\.{_IDENT})*)?$")


def _check_hook_events(value: list[str] | None) -> list[str] | None:
    if value is None:
        return value
    if not value:
        raise ValueError("must name at least one event")
    for name in value:
        if name not in LIFECYCLE_EVENT_TYPES:
            raise ValueError(f"unknown event name {name!r}; known: {', '.join(LIFECYCLE_EVENT_TYPES)}")
        if name not in HOOK_EVENT_TYPES:
            raise ValueError(
                f"{name!r} is not delivered to in-process handlers (they run in the sessions service, "
                f"which emits {', '.join(HOOK_EVENT_TYPES)}); read it with WatchEvents / `runyard events`"
            )
    return list(dict.fromkeys(value))


class HookHandlerConfig(_Section):
    """An in-process hook handler named by a dotted path (``[[hooks.handlers]]``)."""

    # "package.module:function" (or "package.module.function"); sync or async,
    # called with one typed event (runyard.common.hooks).
    path: str
    events: list[str]
    # Each call gets this long; a timeout is logged and counted.
    timeout_ms: int = Field(default=1_000, ge=1, le=600_000)
    # Label in logs and metrics (default: the path).
    name: str = ""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not _HOOK_PATH.match(value):
            raise ValueError(f"expected 'package.module:function', got {value!r}")
        return value

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        return _check_hook_events(value) or []


class HookPluginConfig(_Section):
    """Overrides for one ``runyard.plugins`` entry point (``[hooks.plugins.NAME]``)."""

    enabled: bool = True
    # Replace the events / timeout the plugin declares.
    events: list[str] | None = None
    timeout_ms: int | None = Field(default=None, ge=1, le=600_000)

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str] | None) -> list[str] | None:
        return _check_hook_events(value)


class HooksConfig(_Section):
    """In-process hook handlers (plugins) of the sessions service."""

    # Load every plugin of the `runyard.plugins` entry-point group.
    entry_points: bool = True
    # Timeout of a plugin that declares none.
    default_timeout_ms: int = Field(default=1_000, ge=1, le=600_000)
    # Events waiting per handler; beyond it events are dropped (and counted).
    queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    handlers: list[HookHandlerConfig] = Field(default_factory=list)
    plugins: dict[str, HookPluginConfig] = Field(default_factory=dict)


class CompactionConfig(_Section):
    """Transcript compaction, done by the worker before a run's model call."""

    enabled: bool = True
    # Compact when the transcript plus the new turn is estimated above this
    # many tokens (about 4 characters per token); 0 = no fixed limit.
    max_tokens: int = Field(default=24_000, ge=0, le=10_000_000)
    # Context windows of models ("provider/model" -> tokens): compact when the
    # estimate passes context_fraction of the run's model's window.
    context_windows: dict[str, int] = Field(default_factory=dict)
    context_fraction: float = Field(default=0.8, gt=0, le=1)
    # Compact when the transcript has more turns (user messages) than this; 0 = no limit.
    max_turns: int = Field(default=0, ge=0, le=1_000_000)
    # Turns kept verbatim after the summary.
    keep_recent_turns: int = Field(default=4, ge=1, le=10_000)
    summary_max_tokens: int = Field(default=512, ge=16, le=32_000)
    # Model that writes summaries ("provider/model"); empty = the agent's chain.
    model: str = ""
    # Bound on the summary call; on failure the run goes on uncompacted.
    timeout_s: float = Field(default=60.0, gt=0, le=600)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if value and not _MODEL_REF.match(value):
            raise ValueError(f"expected 'provider/model', got {value!r}")
        return value

    @field_validator("context_windows")
    @classmethod
    def _check_windows(cls, value: dict[str, int]) -> dict[str, int]:
        for ref, tokens in value.items():
            if not _MODEL_REF.match(ref):
                raise ValueError(f"keys must be 'provider/model', got {ref!r}")
            if tokens < 256:
                raise ValueError(f"{ref}: a context window of {tokens} tokens is too small (at least 256)")
        return value


class MaintenanceConfig(_Section):
    """Session maintenance (sessions service): on a schedule and on demand
    (`runyard sessions prune`)."""

    # Run every interval_s (one instance at a time across replicas).
    enabled: bool = True
    interval_s: float = Field(default=3_600.0, ge=1, le=30 * 86_400)
    # Delete sessions (and their snapshots) with no run for this long; 0 = never.
    prune_after_s: float = Field(default=30 * 86_400.0, ge=0)
    # At most this many stored sessions per (org, agent); the least recently
    # active go first, never one with an open activation; 0 = no cap.
    max_sessions_per_agent: int = Field(default=0, ge=0)
    # Transcripts kept per compacted conversation: the current session's and
    # those of the sessions it was compacted from, newest first.
    keep_snapshots: int = Field(default=5, ge=1, le=100_000)
    # What happens to older transcripts: "drop" or "archive" (kept, never served).
    old_snapshots: Literal["drop", "archive"] = "drop"
    # Accepted for old configuration files; transcripts are appended per run
    # and nothing is ever pending, so it has no effect.
    pending_snapshot_ttl_s: float = Field(default=86_400.0, ge=60)
    # Outbox events older than this are deleted; 0 = keep forever.
    event_retention_s: float = Field(default=7 * 86_400.0, ge=0)
    # Rows per statement (memory stays flat in the number of sessions).
    batch_size: int = Field(default=500, ge=1, le=10_000)


class TaskConcurrencyConfig(_Section):
    """Slots per concurrency key for background tasks (``[tasks.concurrency]``).

    A task's key is its model (``models["provider/model"]``), else its
    provider (``providers["name"]``), else ``default``; 0 means unlimited.
    Waiters queue first-in first-out per key, across gateway replicas.
    """

    default: int = Field(default=5, ge=0, le=1_000_000)
    models: dict[str, int] = Field(default_factory=dict)
    providers: dict[str, int] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: dict[str, int]) -> dict[str, int]:
        for ref, slots in value.items():
            if not _MODEL_REF.match(ref):
                raise ValueError(f"keys must be 'provider/model', got {ref!r}")
            if slots < 0:
                raise ValueError(f"{ref}: slots must be 0 (unlimited) or more, got {slots}")
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: dict[str, int]) -> dict[str, int]:
        for name, slots in value.items():
            if slots < 0:
                raise ValueError(f"{name}: slots must be 0 (unlimited) or more, got {slots}")
        return value


class TasksConfig(_Section):
    """Background tasks (the gateway owns them; DESIGN.md section 7)."""

    concurrency: TaskConcurrencyConfig = TaskConcurrencyConfig()
    # A task still PENDING (waiting for a slot) after this long ends ERROR.
    queue_ttl_s: float = Field(default=3_600.0, ge=0.1, le=30 * 86_400)
    # A RUNNING task whose run streamed no event for this long ends ERROR.
    stale_after_s: float = Field(default=1_800.0, ge=0.1, le=30 * 86_400)
    # Parent notifications of tasks that end within this window of the first
    # one are batched into one message (sent at once when no sibling is left).
    notify_batch_window_ms: int = Field(default=2_000, ge=0, le=3_600_000)
    # A task's run that fails with a retryable error is retried (on models
    # that are not cooling down) until this many attempts of it were made.
    max_attempts: int = Field(default=2, ge=1, le=20)
    # Nesting: a task of a task of ... at most this deep (RESOURCE_EXHAUSTED beyond).
    max_depth: int = Field(default=4, ge=1, le=64)
    # Pending + running tasks one session may have (RESOURCE_EXHAUSTED beyond).
    max_active_per_parent: int = Field(default=50, ge=1, le=100_000)
    # Loop breaker of the built-in tool loop when a run sets no max_tool_calls.
    max_tool_calls: int = Field(default=25, ge=1, le=10_000)
    # Largest max_tool_calls a request may ask for.
    max_tool_calls_limit: int = Field(default=1_000, ge=1, le=100_000)
    # A run started only to deliver an "all tasks complete" notification is
    # retried this many times if it fails; after that the notification waits
    # for the parent's next run.
    max_notification_runs: int = Field(default=3, ge=1, le=100)
    # Characters of a task's result kept in Task.result / quoted in the notification.
    result_max_chars: int = Field(default=4_000, ge=100, le=1_000_000)
    notify_result_chars: int = Field(default=500, ge=20, le=100_000)
    # Period of the sweep: timeouts, slot hand-over and notification safety net.
    sweep_interval_ms: int = Field(default=1_000, ge=20, le=600_000)
    # Longest wait the task_output tool may ask for (its "wait_s").
    tool_wait_max_s: float = Field(default=30.0, ge=0, le=3_600)


def _default_providers() -> dict[str, ProviderConfig]:
    return {"echo": ProviderConfig(type="echo")}


def _default_agents() -> dict[str, AgentConfig]:
    return {"default": AgentConfig(model="echo/echo")}


class Config(_Section):
    """The whole configuration (one TOML file)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    database: DatabaseConfig = DatabaseConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    gateway: GatewayConfig = GatewayConfig()
    router: RouterConfig = RouterConfig()
    sessions: SessionsConfig = SessionsConfig()
    worker: WorkerConfig = WorkerConfig()
    auth: AuthConfig = AuthConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    tls: TlsConfig = TlsConfig()
    hooks: HooksConfig = HooksConfig()
    compaction: CompactionConfig = CompactionConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    tasks: TasksConfig = TasksConfig()
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)
    agents: dict[str, AgentConfig] = Field(default_factory=_default_agents)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems (dangling references) as ``(path, message)``."""
        return _reference_problems(self.model_dump())

    def agent(self, agent_id: str) -> AgentConfig | None:
        """The agent ``agent_id`` (empty = the default agent), or None."""
        return self.agents.get(agent_id or self.gateway.default_agent)

    def run_timeout_ms(self, agent_id: str, requested_ms: int = 0) -> int:
        """A run's time budget in ms, end to end: ``requested_ms``
        (``RunOptions.timeout_ms``), else the agent's ``timeout_ms``, else
        ``router.request_timeout_ms``."""
        agent = self.agent(agent_id)
        agent_ms = agent.timeout_ms if agent is not None else 0
        return requested_ms or agent_ms or self.router.request_timeout_ms


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the candidate closest to ``name`` (difflib,
    ratio 0.6 or more), else ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _reference_problems(tree: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Dangling references in a configuration tree (validated or not).

    Works on the raw merged data too, so that a file with other mistakes still
    gets these reported in the same pass. Entries that are not well-formed
    ``provider/model`` refs are left to field validation (reported once).
    """

    def table(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    def refs(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        return [r for r in items if isinstance(r, str) and _MODEL_REF.match(r)]

    problems: list[tuple[str, str]] = []
    providers = table(tree.get("providers"))
    known = ", ".join(sorted(providers)) or "none"

    def missing(path: str, ref: str, provider: str) -> None:
        problems.append(
            (
                path,
                f"model {ref!r} names provider {provider!r}, which is not configured (known: {known})"
                + did_you_mean(provider, providers),
            )
        )

    agents = table(tree.get("agents"))
    for agent_id, agent in agents.items():
        agent = table(agent)
        fields: list[tuple[str, Any]] = [
            ("model", agent.get("model")),
            ("fallbacks", agent.get("fallbacks")),
            ("context_window_chain", agent.get("context_window_chain")),
            ("content_policy_chain", agent.get("content_policy_chain")),
            *((f"task_models.{name}", ref) for name, ref in table(agent.get("task_models")).items()),
        ]
        for field, value in fields:
            for ref in dict.fromkeys(refs(value)):
                provider = ref.split("/", 1)[0]
                if provider not in providers:
                    missing(f"agents.{agent_id}.{field}", ref, provider)
    default_agent = table(tree.get("gateway")).get("default_agent", "default")
    if isinstance(default_agent, str) and default_agent not in agents:
        problems.append(
            (
                "gateway.default_agent",
                f"agent {default_agent!r} is not configured (known: {', '.join(sorted(agents)) or 'none'})"
                + did_you_mean(default_agent, agents),
            )
        )
    concurrency = table(table(tree.get("tasks")).get("concurrency"))
    for ref in table(concurrency.get("models")):
        provider = ref.split("/", 1)[0]
        if _MODEL_REF.match(ref) and provider not in providers:
            problems.append(
                (
                    f"tasks.concurrency.models.{ref}",
                    f"model {ref!r} names a provider that is not configured (known: {known})"
                    + did_you_mean(provider, providers),
                )
            )
    for name in table(concurrency.get("providers")):
        if name not in providers:
            problems.append(
                (
                    f"tasks.concurrency.providers.{name}",
                    f"provider {name!r} is not configured (known: {known})" + did_you_mean(name, providers),
                )
            )
    model = table(tree.get("compaction")).get("model")
    for ref in refs(model):
        provider = ref.split("/", 1)[0]
        if provider not in providers:
            problems.append(
                (
                    "compaction.model",
                    f"model {ref!r} names a provider that is not configured (known: {known})"
                    + did_you_mean(provider, providers),
                )
            )
    return problems


def _fields_at(loc: list[str]) -> list[str]:
    """The setting names allowed where ``loc``'s last part was found (for "did
    you mean" on unknown settings): walks the models from :class:`Config`
    through nested sections, tables (``dict[str, Model]``) and lists."""
    model: Any = Config
    parts = loc[:-1]
    index = 0
    while index < len(parts):
        field = getattr(model, "model_fields", {}).get(parts[index])
        if field is None:
            return []
        annotation = field.annotation
        index += 1
        origin = typing.get_origin(annotation)
        if origin in (dict, list):
            annotation = typing.get_args(annotation)[-1]
            index += 1  # the table key or list index
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(getattr(model, "model_fields", {}))


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tree of overrides from ``environ`` and a map dotted-path -> variable name."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith("RUNYARD_") or name in _RESERVED_ENV:
            continue
        if name in ENV_ALIASES:
            path = ENV_ALIASES[name].split(".")
        elif "__" in name or name[len("RUNYARD_") :].lower() in Config.model_fields:
            # Table keys (agent and provider ids) are matched in lower case.
            path = [part.lower() for part in name[len("RUNYARD_") :].split("__")]
        else:
            continue
        _set_path(tree, path, _env_value(raw))
        sources[".".join(path)] = name
    return tree, sources


def merge_tree(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two config trees (nested dicts); ``over`` wins. Neither is changed."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tree(out[key], value)
        else:
            out[key] = value
    return out


def _describe(errors: ValidationError, sources: dict[str, str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in errors.errors():
        loc = [str(part) for part in err["loc"]]
        path = ".".join(loc) or "(root)"
        message = err["msg"]
        message = message.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting" + did_you_mean(loc[-1], _fields_at(loc))
        source = sources.get(path)
        if source:
            message += f" (from environment variable {source})"
        problems.append((path, message))
    return problems


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load, override and validate the configuration.

    Args:
        path: TOML file; None means ``$RUNYARD_CONFIG`` if set, else defaults only.
        environ: environment to read overrides from (default ``os.environ``).

    Returns:
        The frozen :class:`Config`.

    Raises:
        ConfigError: with every problem found (unreadable file, TOML syntax,
            unknown settings, bad values), each with its dotted path.
    """
    env = os.environ if environ is None else environ
    file_path = path if path is not None else env.get("RUNYARD_CONFIG") or None
    data: dict[str, Any] = {}
    if file_path is not None:
        p = Path(file_path).expanduser()
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([(str(p), "config file not found")]) from None
        except OSError as exc:
            raise ConfigError([(str(p), f"cannot read config file: {exc.strerror}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([(str(p), f"invalid TOML: {exc}")]) from None
    # The built-in echo provider is always available; the built-in default
    # agent exists unless the file defines its own agents.
    base: dict[str, Any] = {"providers": {"echo": {"type": "echo"}}}
    if "agents" not in data:
        base["agents"] = {"default": {"model": "echo/echo"}}
    overrides, sources = _env_overrides(env)
    merged = merge_tree(merge_tree(base, data), overrides)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        # Every problem in one pass: field errors and dangling references alike.
        problems = _describe(exc, sources)
        reported = {path for path, _ in problems}
        problems += [p for p in _reference_problems(merged) if p[0] not in reported]
        raise ConfigError(problems) from None
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    return config
