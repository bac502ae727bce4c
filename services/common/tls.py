"""TLS and mutual TLS for servers and internal channels (``[tls]`` config).

:func:`load` reads the key material of a config; servers and channels take
the result explicitly (``tls=``): ``runyard serve`` loads it once and passes
it to the service's composition root (:mod:`runyard.common.lifecycle`), the
CLI's client commands load it for the channels they open. Nothing here keeps
it as a process default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from runyard.common.config import Config, ConfigError

__all__ = [
    "TlsSettings",
    "channel_credentials",
    "channel_options",
    "load",
    "server_credentials",
]


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


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError([(f"tls.{field}", f"cannot read {path}: {exc.strerror}")]) from None


def load(config: Config) -> TlsSettings | None:
    """The key material ``config.tls`` names (None when TLS is off).

    Raises:
        ConfigError: a file cannot be read (the path names the setting).
    """
    tls = config.tls
    if not tls.enabled:
        return None
    cert, key = _read(tls.cert_file, "cert_file"), _read(tls.key_file, "key_file")
    return TlsSettings(
        cert=cert,
        key=key,
        ca=_read(tls.ca_file, "ca_file"),
        client_cert=_read(tls.client_cert_file, "client_cert_file") if tls.client_cert_file else cert,
        client_key=_read(tls.client_key_file, "client_key_file") if tls.client_key_file else key,
        require_client_cert=tls.require_client_cert,
        gateway_require_client_cert=tls.gateway_require_client_cert,
        server_name=tls.server_name,
    )


def server_credentials(
    settings: TlsSettings | None, *, public: bool = False
) -> grpc.ServerCredentials | None:
    """Credentials for a server (None: plaintext). ``public`` is the gateway."""
    if settings is None:
        return None
    require = settings.gateway_require_client_cert if public else settings.require_client_cert
    return grpc.ssl_server_credentials(
        [(settings.key, settings.cert)], root_certificates=settings.ca, require_client_auth=require
    )


def channel_credentials(settings: TlsSettings | None) -> grpc.ChannelCredentials | None:
    """Credentials for a channel (None: plaintext)."""
    if settings is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.ca, private_key=settings.client_key, certificate_chain=settings.client_cert
    )


def channel_options(settings: TlsSettings | None) -> list[tuple[str, Any]]:
    """Extra channel options (target name override) for TLS channels."""
    if settings is None or not settings.server_name:
        return []
    return [("grpc.ssl_target_name_override", settings.server_name)]
