"""Small conversions between protobuf well-known types and Python values."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from google.protobuf import timestamp_pb2

from runyard.common.errors import InvalidArgument

__all__ = ["now", "parse_uuid", "timestamp", "to_datetime"]


def now() -> timestamp_pb2.Timestamp:
    """The current time as a Timestamp (from ``time.time_ns()``: a quarter
    of the cost of ``Timestamp.GetCurrentTime``, which goes through a
    datetime; every run event gets one)."""
    ns = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for an aware datetime (None stays None)."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_datetime(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.UTC)


def parse_uuid(value: str, field: str, *, what: str = "id") -> uuid.UUID:
    """Parse an id field.

    Raises:
        InvalidArgument: empty or not a UUID (reason MISSING_FIELD / INVALID_ID).
    """
    if not value:
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD", field=field)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a valid {what}: {value[:64]!r}", reason="INVALID_ID", field=field
        ) from None
