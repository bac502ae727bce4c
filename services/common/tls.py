"""TLS and mutual TLS for servers and internal channels (``[tls]`` config).

A process configures TLS once at start-up (:func:`configure`); every
:class:`~runyard.common.server.ServiceServer` and every channel from
:func:`~runyard.common.clients.internal_channel` then uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from runyard.common.config import Config, ConfigError

__all__ = ["TlsSettings", "channel_credentials", "channel_options", "configure", "current", "server_credentials"]


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Loaded key material (PEM bytes)."""

    cert: bytes
    key: bytes
    ca: bytes
    client_cert: bytes
    client_key: bytes
    require_client_cert: bool
    gateway_require_client_cert: bool
    server_name: str


_current: TlsSettings | None = None


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError([(f"tls.{field}", f"cannot read {path}: {exc.strerror}")]) from None


def configure(config: Config) -> TlsSettings | None:
    """Load ``config.tls`` for this process (None when TLS is off).

    Raises:
        ConfigError: a file cannot be read (the path names the setting).
    """
    global _current
    tls = config.tls
    if not tls.enabled:
        _current = None
        return None
    cert, key = _read(tls.cert_file, "cert_file"), _read(tls.key_file, "key_file")
    _current = TlsSettings(
        cert=cert,
        key=key,
        ca=_read(tls.ca_file, "ca_file"),
        client_cert=_read(tls.client_cert_file, "client_cert_file") if tls.client_cert_file else cert,
        client_key=_read(tls.client_key_file, "client_key_file") if tls.client_key_file else key,
        require_client_cert=tls.require_client_cert,
        gateway_require_client_cert=tls.gateway_require_client_cert,
        server_name=tls.server_name,
    )
    return _current


def current() -> TlsSettings | None:
    """The settings :func:`configure` loaded, if any."""
    return _current


def server_credentials(*, public: bool = False) -> grpc.ServerCredentials | None:
    """Credentials for a server (None: plaintext). ``public`` is the gateway."""
    settings = _current
    if settings is None:
        return None
    require = settings.gateway_require_client_cert if public else settings.require_client_cert
    return grpc.ssl_server_credentials(
        [(settings.key, settings.cert)], root_certificates=settings.ca, require_client_auth=require
    )


def channel_credentials() -> grpc.ChannelCredentials | None:
    """Credentials for an internal channel (None: plaintext)."""
    settings = _current
    if settings is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.ca, private_key=settings.client_key, certificate_chain=settings.client_cert
    )


def channel_options() -> list[tuple[str, Any]]:
    """Extra channel options (target name override) for TLS channels."""
    settings = _current
    if settings is None or not settings.server_name:
        return []
    return [("grpc.ssl_target_name_override", settings.server_name)]
