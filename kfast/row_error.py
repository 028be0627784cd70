"""RowError: one undecodable payload in a batch."""

from __future__ import annotations

from typing import NamedTuple


class RowError(NamedTuple):
    index: int    # position of the payload in the decoded input
    reason: str   # what was wrong, e.g. "truncated payload at byte 17"
