"""Process plumbing shared by the four services: logging, database start-up."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from runyard.common import db
from runyard.common.config import Config, ConfigError, mcp_environment_problems

__all__ = ["check_service_config", "database_url", "instance_id", "open_database", "setup_logging"]

log = logging.getLogger(__name__)


class _RedactingFormatter(logging.Formatter):
    """Formatter that masks configured secrets wherever they appear."""

    def __init__(self, fmt: str, secrets: list[str]):
        super().__init__(fmt)
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


#: Libraries that log every request at INFO (httpx: ``HTTP Request: POST
#: ... "HTTP/1.1 200 OK"``, one line per model call): their lines show only
#: at DEBUG. The router logs what an operator needs of a model call itself
#: (failovers, cooldowns) and counts the rest in its metrics.
_PER_REQUEST_LOGGERS = ("httpx", "httpcore")


def setup_logging(service: str, config: Config) -> None:
    """Log lines ``time level service logger: message`` to stderr, secrets
    masked; per-request lines of HTTP libraries only at DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    secrets = [config.auth.internal_secret, config.auth.run_token_private_key]
    for provider in config.providers.values():
        if provider.api_key_env:
            secrets.append(os.environ.get(provider.api_key_env, ""))
    # The keys and tokens the agents' MCP servers get (issue 13); short values are not masked.
    for agent in config.agents.values():
        for server in agent.mcp_servers.values():
            secrets.extend(
                v for v in (os.environ.get(n, "") for n in server.environment_names) if len(v) >= 8
            )
    handler.setFormatter(
        _RedactingFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s", secrets)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    for name in _PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if config.log_level == "DEBUG" else logging.WARNING)


def instance_id(service: str) -> str:
    """A unique id for this process: ``service-host-pid-random``."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def database_url(config: Config) -> str:
    """The configured database URL.

    Raises:
        ConfigError: none configured (services started on their own need one).
    """
    if not config.database.url:
        raise ConfigError(
            [
                (
                    "database.url",
                    "required to start a service on its own (set RUNYARD_DATABASE_URL); "
                    "`runyard up` starts an embedded PostgreSQL instead",
                )
            ]
        )
    return config.database.url


def check_service_config(config: Config, service: str | None = None) -> None:
    """What a service process needs beyond a valid file: a database, the
    internal secret and its half of the run-token key pair.

    Every service refuses to start without an internal secret of at least
    32 bytes: its internal listener would otherwise accept anyone (``runyard
    up`` generates one and passes it to every service). The gateway needs
    ``auth.run_token_private_key``; the others need
    ``auth.run_token_public_key`` and must NOT hold the private key (only the
    gateway signs run tokens). A worker also needs every environment variable
    its agents' MCP servers name (:func:`mcp_environment_problems`).

    Args:
        config: the loaded configuration.
        service: ``gateway``, ``router``, ``sessions`` or ``worker`` (None:
            either half of the key pair will do).

    Raises:
        ConfigError: listing every missing or misplaced setting.
    """
    from runyard.common.auth import MIN_INTERNAL_SECRET_BYTES

    problems: list[tuple[str, str]] = []
    auth = config.auth
    if not config.database.url:
        problems.append(
            (
                "database.url",
                "required to start a service on its own (set RUNYARD_DATABASE_URL); "
                "`runyard up` starts an embedded PostgreSQL instead",
            )
        )
    if len(auth.internal_secret.encode()) < MIN_INTERNAL_SECRET_BYTES:
        problems.append(
            (
                "auth.internal_secret",
                f"required, at least {MIN_INTERNAL_SECRET_BYTES} bytes (set RUNYARD_INTERNAL_SECRET, e.g. "
                "`openssl rand -base64 48`): without it the internal listener would accept anyone; "
                "`runyard up` generates one",
            )
        )
    if service == "gateway":
        if not auth.run_token_private_key:
            problems.append(
                (
                    "auth.run_token_private_key",
                    "required on the gateway, which signs run tokens (set RUNYARD_RUN_TOKEN_PRIVATE_KEY; "
                    "`runyard keys run-token` makes a key pair, `runyard up` generates one)",
                )
            )
    elif service is not None:
        if auth.run_token_private_key:
            problems.append(
                (
                    "auth.run_token_private_key",
                    f"must not be given to the {service}: only the gateway signs run tokens; give this "
                    "service auth.run_token_public_key (RUNYARD_RUN_TOKEN_PUBLIC_KEY) instead",
                )
            )
        if not auth.run_token_public_key:
            problems.append(
                (
                    "auth.run_token_public_key",
                    "required: the gateway's Ed25519 public key, to verify run tokens "
                    "(set RUNYARD_RUN_TOKEN_PUBLIC_KEY; `runyard keys run-token` makes a key pair)",
                )
            )
    elif not (auth.run_token_private_key or auth.run_token_public_key):
        problems.append(
            (
                "auth.run_token_public_key",
                "required (or auth.run_token_private_key on the gateway); "
                "`runyard keys run-token` makes a key pair",
            )
        )
    if service == "worker":
        # The variables the agents' MCP servers name (their keys and tokens) must be set (issue 13).
        problems.extend(mcp_environment_problems(config))
    if problems:
        raise ConfigError(problems)


async def open_database(config: Config, schema: str | None) -> asyncpg.Pool:
    """Wait for PostgreSQL (bounded retries), apply ``schema``'s migrations, open a pool."""
    url = database_url(config)
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(config.database.connect_timeout_s * 3),
        wait=wait_exponential(multiplier=0.1, max=2),
        retry=retry_if_exception_type(
            (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
        ),
        reraise=True,
    ):
        with attempt:
            if schema:
                applied = await db.migrate(url, schema)
                if applied:
                    log.info("applied %s migrations: %s", schema, ", ".join(applied))
            pool = await db.create_pool(
                url,
                min_size=config.database.pool_min_size,
                max_size=config.database.pool_max_size,
                timeout_s=config.database.connect_timeout_s,
            )
    return pool
