"""kfast's exception tree: one root, categories by inheritance."""

from __future__ import annotations


class KfastError(Exception):
    """Root of every error kfast raises."""


class ConfigError(KfastError, ValueError):
    """A setting is missing, out of range or inconsistent; names the field."""


class DecodeError(KfastError):
    """A payload or schema could not be decoded."""


class UnknownSchemaId(DecodeError, LookupError):
    """The schema registry does not know a schema id (bad data, never retried)."""


class EncodeError(KfastError, ValueError):
    """A value of row ``row`` (plan field ``field``) cannot be encoded for the sink.

    Raised by the PostgreSQL COPY encoder; ``PostgresSink.write`` turns it into a
    ``PermanentSinkError`` naming the row and column.
    """

    def __init__(self, row: int, field: int, reason: str) -> None:
        super().__init__(f"row {row}, field {field}: {reason}")
        self.row = row
        self.field = field
        self.reason = reason


class SinkError(KfastError):
    """A sink failed to write a batch.

    ``sqlstate`` carries the PostgreSQL error code where there is one.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class TransientSinkError(SinkError):
    """Worth retrying: connection lost, serialization failure, resources."""


class PermanentSinkError(SinkError):
    """Retrying the same rows cannot succeed: bad data, constraint violation.

    ``row`` is an optional locator: the index, relative to the rows of the
    failed write, of the row the sink believes caused the failure (e.g. the
    line PostgreSQL reported for a COPY). It is only a hint: the delivery
    layer confirms it by writing that row alone, and ignores it when absent
    or out of range. ``client_side``: the sink judged the row itself before sending
    anything (so the write sent nothing).
    """

    client_side = False

    def __init__(
        self, message: str, *, sqlstate: str | None = None, row: int | None = None
    ) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.row = row


class RetryExhausted(KfastError):
    """A retried operation ran out of attempts or passed its deadline."""

    def __init__(self, message: str, *, attempts: int, last_error: BaseException | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class Stopped(RetryExhausted):
    """The stop event was set while waiting to retry."""


class DeadLetterUnavailable(TransientSinkError):
    """The DLQ producer could not get delivery confirmations (retried under the policy)."""


class CircuitBreakerOpen(KfastError):
    """Too large a share of recent messages went to the DLQ: stop, do not drain the topic."""


class StartupTimeout(KfastError):
    """``Pipeline.start()`` with ``startup_timeout``: not ready in time (broker or sink unreachable).

    ``health`` is the pipeline's :class:`kfast.runtime.health.Health` at that moment.
    """

    def __init__(self, message: str, *, health: object = None) -> None:
        super().__init__(message)
        self.health = health


class SchemaRegistryUnavailable(DecodeError):
    """The schema registry could not answer: connection refused, timeout, 5xx or 429.

    An outage, never bad data: a decoder raises it for the whole batch (no
    row errors), and the Pipeline retries the batch under its ``RetryPolicy``
    with the affected partitions held back, dead-lettering nothing.
    ``url`` names the registry, ``status`` the HTTP status when there was one.
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
