"""Avro decoding: ``AvroDecoder(schema, writer_schema=None)``.

The schema is compiled once (``kfast.avro.schema``) and interpreted by a
nogil C loop (``kfast.avro._decoder``) that writes straight into a Batch's
columns. See docs/avro.md for the column layout and the supported types.
"""

from kfast.avro._decoder import AvroDecoder, FramedAvroDecoder, Program

__all__ = ["AvroDecoder", "FramedAvroDecoder", "Program"]
