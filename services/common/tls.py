"""TLS and mutual TLS for servers and internal channels (``[tls]`` config).

:func:`load` reads the key material of a config; servers and channels take
the result explicitly (``tls=``). A service process also keeps it as the
process default (:func:`configure`, ``runyard serve``) for the servers and
internal channels built without ``tls=`` (:data:`PROCESS`); that default
goes once the services' composition roots pass it (issue 15).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from runyard.common.config import Config, ConfigError

__all__ = [
    "PROCESS",
    "TlsSettings",
    "channel_credentials",
    "channel_options",
    "configure",
    "current",
    "load",
    "resolve",
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


_current: TlsSettings | None = None


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


def configure(config: Config) -> TlsSettings | None:
    """:func:`load` ``config.tls`` and keep it as this process's default (``runyard serve``).

    Raises:
        ConfigError: a file cannot be read (the path names the setting).
    """
    global _current
    _current = load(config)
    return _current


class _Process:
    """The type of :data:`PROCESS`."""

    def __repr__(self) -> str:
        return "runyard.common.tls.PROCESS"


#: ``tls=PROCESS``: what :func:`configure` loaded in this process.
PROCESS: Final = _Process()


def resolve(settings: TlsSettings | None | object) -> TlsSettings | None:
    """``settings``, or the process default for :data:`PROCESS`."""
    if settings is PROCESS:
        return _current
    if settings is None or isinstance(settings, TlsSettings):
        return settings
    raise TypeError(f"tls must be TlsSettings, None or PROCESS, not {type(settings).__name__}")


def current() -> TlsSettings | None:
    """The settings :func:`configure` loaded, if any."""
    return _current


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
