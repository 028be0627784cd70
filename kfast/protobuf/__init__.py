"""Columnar Protobuf decoding: ``kfast.ProtobufDecoder`` (see docs/protobuf.md).

Confluent-framed Protobuf (``ConfluentProtobufDecoder``) lives in ``kfast.confluent``; the name
is also served here for existing imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kfast.protobuf._convert import message_to_dict
from kfast.protobuf.decoder import ProtobufDecoder, descriptor_of

if TYPE_CHECKING:  # pragma: no cover - names for type checkers
    from kfast.confluent.protobuf import ConfluentProtobufDecoder as ConfluentProtobufDecoder
    from kfast.confluent.protobuf import message_path as message_path
    from kfast.confluent.protobuf import parse_message_indexes as parse_message_indexes

_CONFLUENT = ("ConfluentProtobufDecoder", "message_path", "parse_message_indexes")

__all__ = ["ProtobufDecoder", "descriptor_of", "message_to_dict", *_CONFLUENT]


def __getattr__(name: str) -> Any:
    # kfast.confluent builds on this package, not the other way round: its Protobuf names are
    # re-exported on first use only, so importing kfast.protobuf never imports kfast.confluent.
    if name in _CONFLUENT:
        return getattr(importlib.import_module("kfast.confluent.protobuf"), name)
    raise AttributeError(f"module 'kfast.protobuf' has no attribute {name!r}")
