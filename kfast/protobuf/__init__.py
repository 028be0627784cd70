"""Columnar Protobuf decoding: ``kfast.ProtobufDecoder`` (see docs/protobuf.md).

Confluent-framed Protobuf (``ConfluentProtobufDecoder``, the message-index helpers) lives in
``kfast.confluent``, which builds on this package.
"""

from __future__ import annotations

from kfast.protobuf._convert import message_to_dict
from kfast.protobuf.decoder import ProtobufDecoder, descriptor_of

__all__ = ["ProtobufDecoder", "descriptor_of", "message_to_dict"]
