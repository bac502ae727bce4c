"""Type aliases for the generic ``grpc.aio`` types (for annotations).

The generated servicer bases and stubs in ``runyard._proto`` carry no types,
so a servicer method's context is not checked against its request and
response types: one alias says so once instead of ``[Any, Any]`` everywhere.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

__all__ = ["ServicerContext"]

#: The context handed to a servicer method (``grpc.aio.ServicerContext``).
ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
