"""Request validation in one place: the contract's protovalidate rules plus
what PostgreSQL needs.

Every request message a runyard server receives (except the worker hub's
stream, which carries model output between trusted services) passes
:func:`check_request` in the server interceptor, before any handler runs and
so before anything is written:

1. the ``buf.validate`` annotations in ``protos/`` (lengths, patterns, ids,
   enum values, cursor ranges), evaluated by ``protovalidate``
   (https://protovalidate.com), the same rules clients in other languages see;
2. rules that hold for every field and are not worth an annotation on each:
   no string may contain U+0000 (PostgreSQL's ``text`` and ``jsonb`` refuse
   it) and no 64-bit unsigned integer may exceed the int64 range (PostgreSQL's
   ``bigint``). Conversation content (``Message``, ``Transcript``, a client's
   tool result ``ToolOutput``) is exempt:
   it is stored as protobuf bytes, where a NUL is just a character a model may
   produce (and a large transcript is not walked field by field).

A violation is INVALID_ARGUMENT with a reason, the field path, and a message
that names the rule but never repeats the value (so an oversized field can
never overflow the status trailers).
"""

from __future__ import annotations

from typing import Any

import protovalidate
from google.protobuf import descriptor
from google.protobuf.message import Message

from runyard.common.errors import InvalidArgument

__all__ = ["INT64_MAX", "check_request", "validated_service"]

INT64_MAX = 2**63 - 1

#: Streams between trusted services that carry model output: not validated.
_UNVALIDATED_SERVICES = frozenset({"runyard.v1.WorkerHubService"})
#: Conversation content, stored as protobuf bytes: NUL characters are allowed.
_CONTENT_TYPES = frozenset({"runyard.v1.Message", "runyard.v1.Transcript", "runyard.v1.ToolOutput"})

#: Reason per (field name, rule id) where the API promised one before the
#: rules moved into the contract; then per rule id.
_FIELD_REASONS: dict[tuple[str, str], str] = {
    ("session_key", "string.max_len"): "SESSION_KEY_TOO_LONG",
    ("parent_session_key", "string.max_len"): "SESSION_KEY_TOO_LONG",
    ("session_key", "string.pattern"): "INVALID_SESSION_KEY",
    ("parent_session_key", "string.pattern"): "INVALID_SESSION_KEY",
    ("text", "string.max_bytes"): "TEXT_TOO_LONG",
    ("idempotency_key", "string.max_len"): "IDEMPOTENCY_KEY_TOO_LONG",
    ("page_size", "int32.gte"): "INVALID_PAGE_SIZE",
    ("page_token", "string.max_len"): "INVALID_PAGE_TOKEN",
}
_FIELD_PREFIX_REASONS: dict[str, str] = {"metadata": "METADATA_TOO_LARGE"}
_RULE_REASONS: dict[str, str] = {
    "required": "MISSING_FIELD",
    "session_ref.required": "MISSING_FIELD",
    "session_key.required": "MISSING_FIELD",
    "string.uuid_empty": "MISSING_FIELD",
    "string.uuid": "INVALID_ID",
    "enum.defined_only": "INVALID_ENUM_VALUE",
    "uint64.lte": "OUT_OF_RANGE",
    "string.max_len": "VALUE_TOO_LONG",
    "string.max_bytes": "VALUE_TOO_LONG",
    "repeated.max_items": "TOO_MANY_ITEMS",
    "repeated.min_items": "MISSING_FIELD",
    "string.min_len": "MISSING_FIELD",
    "map.max_pairs": "TOO_MANY_ITEMS",
    "string.pattern": "INVALID_FORMAT",
}
#: Field a message-level rule is reported on.
_MESSAGE_RULE_FIELDS = {"session_ref.required": "session_id", "session_key.required": "session_key"}


def validated_service(service: str) -> bool:
    """Whether requests of ``service`` (full name) go through :func:`check_request`."""
    return service.startswith("runyard.") and service not in _UNVALIDATED_SERVICES


def _path(elements: Any) -> tuple[str, str]:
    """``(dotted path, last field name)`` of a protovalidate field path; map
    keys and list indexes are shown (keys cut to 32 characters)."""
    parts: list[str] = []
    last = ""
    for element in elements:
        last = element.field_name
        part = element.field_name
        subscript = getattr(element, "subscript", None)
        value = getattr(subscript, "value", None) if subscript is not None else None
        if value is not None:
            text = str(value).replace("\x00", "\\0")
            part += f"[{text[:32]!r}]" if isinstance(value, str) else f"[{text}]"
        parts.append(part)
    return ".".join(parts), last


def _contract_violation(message: Message) -> InvalidArgument | None:
    violations = protovalidate.collect_violations(message, fail_fast=True)
    if not violations:
        return None
    proto = violations[0].proto
    rule = proto.rule_id
    path, leaf = _path(proto.field.elements if proto.field is not None else ())
    if not path:
        path = leaf = _MESSAGE_RULE_FIELDS.get(rule, "")
    reason = _FIELD_REASONS.get((leaf, rule)) or _FIELD_PREFIX_REASONS.get(
        path.split("[", 1)[0].split(".", 1)[0]
    )
    reason = reason or _RULE_REASONS.get(rule, "INVALID_ARGUMENT")
    # protovalidate's messages quote the rule (a length, a pattern), never the value.
    text = proto.message.replace("\x00", "\\0")
    return InvalidArgument(
        f"{path or 'request'}: {text}" if path else text, reason=reason, field=path or None
    )


def _walk(message: Message, prefix: str, content: bool) -> InvalidArgument | None:
    """The first NUL character or out-of-range uint64 in ``message``."""
    if content or message.DESCRIPTOR.full_name in _CONTENT_TYPES:
        return None  # conversation content: stored as protobuf bytes, any character goes
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        kind = field.type
        if kind == descriptor.FieldDescriptor.TYPE_MESSAGE:
            entry_type = field.message_type  # set for every message field
            if entry_type is not None and entry_type.GetOptions().map_entry:
                value_field = entry_type.fields_by_name["value"]
                for key, item in value.items():
                    entry = f"{name}[{str(key)[:32]!r}]"
                    if isinstance(key, str) and "\x00" in key and not content:
                        return _nul(entry)
                    if value_field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                        found = _walk(item, entry + ".", content)
                        if found is not None:
                            return found
                    else:
                        found = _scalar(entry, value_field, item, content)
                        if found is not None:
                            return found
                continue
            items = value if field.is_repeated else [value]
            for index, item in enumerate(items):
                label = f"{name}[{index}]" if field.is_repeated else name
                found = _walk(item, label + ".", content)
                if found is not None:
                    return found
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            found = _scalar(name, field, item, content)
            if found is not None:
                return found
    return None


def _nul(path: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path} contains a NUL character (U+0000), which cannot be stored",
        reason="NUL_CHARACTER",
        field=path,
    )


def _scalar(
    path: str, field: descriptor.FieldDescriptor, value: Any, content: bool
) -> InvalidArgument | None:
    kind = field.type
    if kind == descriptor.FieldDescriptor.TYPE_STRING and not content and "\x00" in value:
        return _nul(path)
    unsigned = kind in (descriptor.FieldDescriptor.TYPE_UINT64, descriptor.FieldDescriptor.TYPE_FIXED64)
    if unsigned and value > INT64_MAX:
        return InvalidArgument(
            f"{path} must be at most {INT64_MAX} (the int64 range)", reason="OUT_OF_RANGE", field=path
        )
    return None


def check_request(message: Any) -> None:
    """Validate one request message (see the module docstring).

    Raises:
        InvalidArgument: the first violation found, with its reason and field path.
    """
    if not isinstance(message, Message):
        return
    error = _contract_violation(message) or _walk(message, "", False)
    if error is not None:
        raise error
