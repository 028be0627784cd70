"""kfast's exception tree: one root, categories by inheritance."""

from __future__ import annotations


class KfastError(Exception):
    """Root of every error kfast raises."""


class ConfigError(KfastError, ValueError):
    """A setting is missing, out of range or inconsistent; names the field."""


class DecodeError(KfastError):
    """A payload or schema could not be decoded."""


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
    """Retrying the same rows cannot succeed: bad data, constraint violation."""


class RetryExhausted(KfastError):
    """A retried operation ran out of attempts or passed its deadline."""

    def __init__(self, message: str, *, attempts: int, last_error: BaseException | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error
