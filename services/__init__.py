"""runyard: a self-hosted runtime for LLM agent conversations over gRPC.

The public Python surface is small:

* :mod:`runyard.v1` - the wire contract (generated protobuf messages and
  gRPC stubs, re-exported from the private ``runyard._proto``);
* :class:`runyard.Client` - a thin async client of the gateway;
* :func:`runyard.load_config` / :class:`runyard.Config` - configuration;
* :class:`runyard.RunyardError` and its subclasses - errors as raised by the
  services and rebuilt on the client side.
"""

from __future__ import annotations

from runyard._version import __version__
from runyard.client import Client
from runyard.common.config import Config, ConfigError, load_config
from runyard.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RunyardError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "Client",
    "Config",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RunyardError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "load_config",
]
