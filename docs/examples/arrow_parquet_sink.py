"""A sink that writes each batch as a Parquet file, over the Arrow C stream interface.

``pyarrow.RecordBatchReader.from_stream(batch)`` reads the batch's columns
through ``Batch.__arrow_c_stream__`` without copying them; the writer encodes
them straight from kfast's buffers. The reader (and every array it produced)
is released before ``write`` returns, so the runtime can recycle the batch.

A file is named after the Kafka coordinates of its first row, so a batch
delivered again after a crash rewrites the same file instead of adding one,
and appears whole or not at all (written to a temporary name, then renamed).

    sink = ParquetSink("/data/orders")
    kfast.Pipeline(kafka={...}, topics=["orders"], decoder=decoder, sink=sink).run()
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kfast.sinks import Sink


class ParquetSink(Sink):
    def __init__(self, directory: str, compression: str = "zstd") -> None:
        self.directory = directory
        self.compression = compression
        self._seq = 0
        os.makedirs(directory, exist_ok=True)

    def _name(self, batch: Any) -> str:
        ctx = batch.context
        if ctx is not None and batch.num_rows:
            i = batch.source_indices[0]
            rec = ctx.records
            return f"{rec.topic(i)}-{rec.partition(i)}-{rec.offset(i):020d}.parquet"
        self._seq += 1
        return f"batch-{os.getpid()}-{self._seq:08d}.parquet"

    def write(self, batch: Any) -> None:
        if batch.num_rows == 0:
            return
        path = os.path.join(self.directory, self._name(batch))
        reader = pa.RecordBatchReader.from_stream(batch)
        try:
            with pq.ParquetWriter(path + ".tmp", reader.schema, compression=self.compression) as w:
                for chunk in reader:
                    w.write_batch(chunk)
        finally:
            reader.close()
        os.replace(path + ".tmp", path)
