"""kfast's compiled Kafka consumer: librdkafka driven from Cython, messages
copied straight into the ring (see ``_consumer.pyx`` and ``source.py``)."""

from kfast.runtime.kafka.source import CompiledSource

__all__ = ["CompiledSource", "available"]


def available() -> bool:
    """True when a usable librdkafka was found (the compiled source can run)."""
    try:
        import kfast.runtime.kafka._consumer as _consumer

        _consumer.load()
    except ImportError:
        return False
    return True
