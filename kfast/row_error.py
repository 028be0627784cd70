"""RowError: one undecodable payload in a batch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RowError:
    index: int  # position of the payload in the decoded input
    reason: str  # what was wrong, e.g. "truncated payload: needed 8 bytes at byte 13"
