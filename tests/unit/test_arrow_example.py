"""docs/examples/arrow_parquet_sink.py: the Parquet sink over the C stream interface."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from avro_helpers import encode
from test_arrow_export import ALL, all_record, norm

from kfast.avro import AvroDecoder

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "arrow_parquet_sink.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("arrow_parquet_sink", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parquet_sink_writes_what_the_batch_holds(tmp_path: Path) -> None:
    sink = _load().ParquetSink(str(tmp_path / "out"))
    dec = AvroDecoder(ALL)
    batch = None
    expected = []
    for start in (0, 25):
        payloads = [encode(ALL, all_record(i)) for i in range(start, start + 25)]
        batch = dec.decode(payloads, out=batch)  # recycling: the sink released its exports
        table = pa.table(batch)
        expected.append((table.schema, table.to_pylist()))
        del table
        sink.write(batch)
        gc.collect()
    files = sorted((tmp_path / "out").iterdir())
    assert [f.suffix for f in files] == [".parquet", ".parquet"]
    for f, (schema, rows) in zip(files, expected):
        back = pq.read_table(f)
        assert back.schema.remove_metadata() == schema
        assert norm(back.to_pylist()) == norm(rows)
