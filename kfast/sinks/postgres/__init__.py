"""PostgreSQL sink (``kfast.PostgresSink``): binary COPY straight from the Batch's columns.

One concept per module:

* :mod:`.sink`: :class:`PostgresSink` (modes, connections, writes);
* :mod:`.sqlstate`: error classification by SQLSTATE class, the COPY-line locator;
* :mod:`.types`: which column types each batch value can be written to;
* :mod:`.catalog`: table introspection and every DDL statement;
* :mod:`.plan`: the encoding plan of a batch layout (pure, no SQL);
* :mod:`.copy`: the binary COPY stream;
* :mod:`.exactly_once`: the offset fence and the offsets stored with the rows;
* :mod:`.rows`: :class:`RowTransaction`, where the delivery layer isolates bad rows;
* :mod:`.connection`: connection slots and libpq settings.
"""

from __future__ import annotations

from kfast.sinks.postgres.rows import RowTransaction
from kfast.sinks.postgres.sink import MODES, PostgresSink
from kfast.sinks.postgres.sqlstate import (
    CONFIG_CLASSES,
    PERMANENT_CLASSES,
    TRANSIENT_CLASSES,
    classify,
    copy_row_hint,
)

__all__ = [
    "CONFIG_CLASSES",
    "MODES",
    "PERMANENT_CLASSES",
    "PostgresSink",
    "RowTransaction",
    "TRANSIENT_CLASSES",
    "classify",
    "copy_row_hint",
]
