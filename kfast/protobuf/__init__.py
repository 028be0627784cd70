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

__all__ = ["ConfluentProtobufDecoder", "ProtobufDecoder", "descriptor_of", "message_to_dict"]


def __getattr__(name: str) -> Any:
    # kfast.confluent builds on this package, not the other way round: the Confluent decoder is
    # re-exported on first use only, so importing kfast.protobuf never imports kfast.confluent.
    if name == "ConfluentProtobufDecoder":
        return importlib.import_module("kfast.confluent.protobuf").ConfluentProtobufDecoder
    raise AttributeError(f"module 'kfast.protobuf' has no attribute {name!r}")
