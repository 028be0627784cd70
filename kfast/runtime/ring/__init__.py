"""The ring buffer between the Kafka consumer and the decoder (see ``_ring.pyx``)."""

from kfast.runtime.ring._ring import SLOT_SIZE, Ring, RingView

__all__ = ["SLOT_SIZE", "Ring", "RingView"]
