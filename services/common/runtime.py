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
from runyard.common.config import Config, ConfigError

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


def setup_logging(service: str, config: Config) -> None:
    """Log lines ``time level service logger: message`` to stderr, secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    secrets = [config.auth.internal_secret, config.auth.run_token_secret]
    for provider in config.providers.values():
        if provider.api_key_env:
            secrets.append(os.environ.get(provider.api_key_env, ""))
    handler.setFormatter(
        _RedactingFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s", secrets)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)


def instance_id(service: str) -> str:
    """A unique id for this process: ``service-host-pid-random``."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def database_url(config: Config) -> str:
    """The configured database URL.

    Raises:
        ConfigError: none configured (services started on their own need one).
    """
    if not config.database.url:
        raise ConfigError([(
            "database.url",
            "required to start a service on its own (set RUNYARD_DATABASE_URL); "
            "`runyard up` starts an embedded PostgreSQL instead",
        )])
    return config.database.url


def check_service_config(config: Config) -> None:
    """What a service process needs beyond a valid file: a database and secrets.

    Raises:
        ConfigError: listing every missing setting.
    """
    problems: list[tuple[str, str]] = []
    if not config.database.url:
        problems.append((
            "database.url",
            "required to start a service on its own (set RUNYARD_DATABASE_URL); "
            "`runyard up` starts an embedded PostgreSQL instead",
        ))
    if len(config.auth.run_token_secret.encode()) < 32:
        problems.append((
            "auth.run_token_secret",
            "required, at least 32 bytes (set RUNYARD_RUN_TOKEN_SECRET); `runyard up` generates one",
        ))
    if problems:
        raise ConfigError(problems)


async def open_database(config: Config, schema: str | None) -> asyncpg.Pool:
    """Wait for PostgreSQL (bounded retries), apply ``schema``'s migrations, open a pool."""
    url = database_url(config)
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(config.database.connect_timeout_s * 3),
        wait=wait_exponential(multiplier=0.1, max=2),
        retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)),
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
