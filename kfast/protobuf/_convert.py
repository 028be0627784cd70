"""google message -> the documented ``to_pylist`` form (used for OBJECT fields).

Fields kfast keeps as raw bytes (recursive messages, maps with message values,
...) are parsed by google's runtime after the nogil pass and converted here to
exactly the form the columnar path produces: every field is a key; unset
explicit-presence fields are ``None``; enums are symbol names (unknown numbers
stay ``int``); messages are dicts; repeated fields lists; maps dicts.
Well-known types as in the columns: ``Timestamp`` a UTC ``datetime``,
``Duration`` a ``timedelta`` (both to the microsecond, nanoseconds rounded
toward zero), wrappers their value, ``Struct``/``Value``/``ListValue`` their
JSON value (dict, list, str, float, bool or None).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_PLANS: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {}


_UTC = datetime.timezone.utc
_WRAPPERS = frozenset(
    f"google.protobuf.{w}Value"
    for w in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_JSON = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def well_known(name: str) -> Callable[[Any], Any] | None:
    """The Python value of a well-known type (the columnar path's form)."""
    if name == "google.protobuf.Timestamp":
        return lambda m: m.ToDatetime(tzinfo=_UTC)
    if name == "google.protobuf.Duration":
        return lambda m: m.ToTimedelta()
    if name in _WRAPPERS:
        return lambda m: m.value
    if name in _JSON:
        return json_format.MessageToDict
    return None


def _value_converter(fd: Any) -> Callable[[Any], Any] | None:
    if fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return well_known(fd.message_type.full_name) or message_to_dict
    if fd.type == FieldDescriptor.TYPE_ENUM:
        names = {n: v.name for n, v in fd.enum_type.values_by_number.items()}
        return lambda v: names.get(v, v)
    return None


def _is_map(fd: Any) -> bool:
    return (
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.message_type is not None
        and fd.message_type.GetOptions().map_entry
    )


def _handler(fd: Any) -> Callable[[Any], Any]:
    name = fd.name
    if _is_map(fd):
        vconv = _value_converter(fd.message_type.fields_by_number[2])
        if vconv is None:
            return lambda m: dict(getattr(m, name).items())
        return lambda m: {k: vconv(v) for k, v in getattr(m, name).items()}
    conv = _value_converter(fd)
    if fd.is_repeated:
        if conv is None:
            return lambda m: list(getattr(m, name))
        return lambda m: [conv(v) for v in getattr(m, name)]
    if fd.has_presence:
        if conv is None:
            return lambda m: getattr(m, name) if m.HasField(name) else None
        return lambda m: conv(getattr(m, name)) if m.HasField(name) else None
    if conv is None:
        return lambda m: getattr(m, name)
    return lambda m: conv(getattr(m, name))


def _plan(desc: Descriptor) -> list[tuple[str, Callable[[Any], Any]]]:
    plan = _PLANS.get(desc.full_name)
    if plan is None:
        plan = [(fd.name, _handler(fd)) for fd in desc.fields]
        _PLANS[desc.full_name] = plan
    return plan


def message_to_dict(msg: Any) -> dict[str, Any]:
    """The documented ``to_pylist`` form of one google message."""
    return {name: get(msg) for name, get in _plan(msg.DESCRIPTOR)}


class FieldConverter:
    """``raw field bytes -> value``: ``raw`` holds every occurrence of field ``fd``
    of one payload, tags included, so it parses as a ``parent_cls`` message with
    only that field set (occurrences merge or concatenate exactly as google does).
    ``field`` types the column for the Arrow export (kfast._arrow)."""

    __slots__ = ("_get", "_parse", "field")

    def __init__(self, parent_cls: Any, fd: Any) -> None:
        self.field = fd
        self._get = _handler(fd)
        self._parse = parent_cls.FromString

    def __call__(self, raw: bytes) -> Any:
        return self._get(self._parse(raw))


def field_converter(parent_cls: Any, fd: Any) -> Callable[[bytes], Any]:
    return FieldConverter(parent_cls, fd)
