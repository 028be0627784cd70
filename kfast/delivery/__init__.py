"""Delivery: make every input message of a batch durable, or fail loudly.

* :mod:`.deliver`: :class:`Delivery` and one ``deliver`` call (decode errors, the rows,
  dead letters confirmed, the circuit breaker);
* :mod:`.isolation`: bad rows isolated inside one sink transaction;
* :mod:`.slices`: bad rows isolated slice by slice (locators, bisection);
* :mod:`.letters`: the dead letters of one batch;
* :mod:`.metrics`: :class:`DeliveryMetrics`.
"""

from __future__ import annotations

from kfast.delivery.deliver import Delivery
from kfast.delivery.metrics import DeliveryMetrics

__all__ = ["Delivery", "DeliveryMetrics"]
