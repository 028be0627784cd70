"""The bottom of kfast's Confluent support: the wire header, the registry client, one cache.

Everything above (``kfast.confluent.avro``, ``kfast.confluent.protobuf``) asks the registry
through :class:`SchemaStore`, which has one cache policy and one failure vocabulary:

* :class:`kfast.errors.SchemaRegistryUnavailable`: the registry could not answer (connection
  refused or reset, timeout, HTTP 5xx, 429, or any other answer that is not a schema or a
  "not found", e.g. 401/403). An outage, never bad data: the decoder raises it for the whole batch.
* :class:`kfast.errors.UnknownSchemaId`: the registry answered "not found" (HTTP 404 with
  Confluent error 40403) for that id, again after ``not_found_retries`` more asks. Only this
  makes row errors. A 404 without that code (a wrong URL, a proxy's page) is an outage.

The registry is a URL (or list of URLs), a dict of confluent-kafka ``SchemaRegistryClient``
settings, a :class:`RegistryClient`, or any object with ``get_schema(schema_id)`` (for example
confluent-kafka's own ``SchemaRegistryClient``), whose exceptions are sorted into the two kinds
above.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kfast.errors import ConfigError, SchemaRegistryUnavailable, UnknownSchemaId

__all__ = [
    "DEFAULT_TIMEOUT",
    "BoundedCache",
    "Reference",
    "RegisteredSchema",
    "RegistryClient",
    "SchemaStore",
    "UnknownSchemaId",
    "first_schema_id",
    "frame_schema_id",
]

log = logging.getLogger("kfast.confluent")

DEFAULT_TIMEOUT = 10.0  # seconds per request, confluent-kafka's SchemaRegistryClient default
_NOT_FOUND_CODES = (40400, 40401, 40402, 40403)  # not found: any / subject / version / schema


# ------------------------------------------------------------------------------- wire header


def frame_schema_id(value: Any) -> int | None:
    """Schema id of a Confluent-framed payload (magic byte 0, 4-byte big-endian id); None when
    ``value`` is None, shorter than 5 bytes or has another first byte. Reads 5 bytes only."""
    if value is None:
        return None
    head = bytes(memoryview(value)[:5])
    if len(head) == 5 and head[0] == 0:
        return int.from_bytes(head[1:5], "big")
    return None


def first_schema_id(payloads: Sequence[Any]) -> int | None:
    """The schema id of the first framed payload, or None."""
    for p in payloads:
        schema_id = frame_schema_id(p)
        if schema_id is not None:
            return schema_id
    return None


# ------------------------------------------------------------------------------- tombstones
TOMBSTONE_REASON = "tombstone (None value): nothing to decode; a Pipeline skips tombstones"


def without_tombstones(payloads: Sequence[Any]) -> tuple[Sequence[Any], list[int]]:
    """Payloads with each None replaced by an empty payload, and the replaced positions."""
    if not isinstance(payloads, (list, tuple)):
        payloads = list(payloads)
    idx = [i for i, p in enumerate(payloads) if p is None]
    if not idx:
        return payloads, idx
    fixed = list(payloads)
    for i in idx:
        fixed[i] = b""
    return fixed, idx


def mark_tombstones(batch: Any, tombstones: list[int]) -> Any:
    """Give the RowErrors of the replaced positions the tombstone reason."""
    if tombstones:
        where = set(tombstones)
        errors = batch.errors
        for k, e in enumerate(errors):
            if e.index in where:
                errors[k] = type(e)(e.index, TOMBSTONE_REASON)
    return batch


# ------------------------------------------------------------------------------- cache policy

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """The one cache policy: at most ``size`` entries, least recently used evicted first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: K, value: V) -> V:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
        return value

    def pop(self, key: K) -> None:
        self._d.pop(key, None)

    def __len__(self) -> int:
        return len(self._d)


# ------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Reference:
    """A schema reference: the ``name`` the schema imports, found at ``subject``/``version``."""

    name: str
    subject: str
    version: int


@dataclass(frozen=True)
class RegisteredSchema:
    """A registry entry: schema text, type (``AVRO``, ``PROTOBUF``, ``JSON``) and references."""

    schema_str: str
    schema_type: str = "AVRO"
    references: tuple[Reference, ...] = field(default=())
    schema_id: int | None = None
    subject: str | None = None
    version: int | None = None


def _entry(raw: Any, schema_id: int | None = None) -> RegisteredSchema:
    """A :class:`RegisteredSchema` from a JSON answer or a foreign client's object."""
    if isinstance(raw, Mapping):
        refs = raw.get("references") or ()
        return RegisteredSchema(
            schema_str=str(raw["schema"]),
            schema_type=str(raw.get("schemaType") or "AVRO").upper(),
            references=tuple(
                Reference(str(r["name"]), str(r["subject"]), int(r["version"])) for r in refs
            ),
            schema_id=raw.get("id", schema_id),
            subject=raw.get("subject"),
            version=raw.get("version"),
        )
    schema = getattr(raw, "schema", None)  # confluent-kafka's RegisteredSchema wraps a Schema
    if schema is not None and not isinstance(schema, str) and hasattr(schema, "schema_str"):
        return RegisteredSchema(
            schema_str=schema.schema_str,
            schema_type=str(getattr(schema, "schema_type", None) or "AVRO").upper(),
            references=tuple(
                Reference(r.name, r.subject, int(r.version))
                for r in (getattr(schema, "references", None) or ())
            ),
            schema_id=getattr(raw, "schema_id", schema_id),
            subject=getattr(raw, "subject", None),
            version=getattr(raw, "version", None),
        )
    return RegisteredSchema(
        schema_str=raw.schema_str,
        schema_type=str(getattr(raw, "schema_type", None) or "AVRO").upper(),
        references=tuple(
            Reference(r.name, r.subject, int(r.version))
            for r in (getattr(raw, "references", None) or ())
        ),
        schema_id=schema_id,
    )


# ------------------------------------------------------------------------------- HTTP client

_SETTINGS = {
    "url",
    "basic.auth.user.info",
    "basic.auth.credentials.source",
    "bearer.auth.credentials.source",
    "bearer.auth.token",
    "bearer.auth.logical.cluster",
    "bearer.auth.identity.pool.id",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "timeout",
    "max.retries",
    "retries.wait.ms",
    "retries.max.wait.ms",
    "cache.capacity",
    "cache.latest.ttl.sec",
}


class _NotFound(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class RegistryClient:
    """A small client for the Confluent schema-registry REST API (stdlib only).

    ``conf`` takes confluent-kafka ``SchemaRegistryClient``'s settings:

    * ``url``: one URL, a comma-separated list or a list; the next is tried when one cannot be
      reached;
    * ``basic.auth.user.info`` (``"user:password"``; ``basic.auth.credentials.source``
      ``USER_INFO``, or ``URL`` for credentials in the URL);
    * ``bearer.auth.credentials.source`` ``STATIC_TOKEN`` with ``bearer.auth.token`` (and
      ``bearer.auth.logical.cluster``, ``bearer.auth.identity.pool.id`` sent as Confluent
      Cloud's ``target-sr-cluster`` / ``Confluent-Identity-Pool-Id`` headers);
    * ``ssl.ca.location``, ``ssl.certificate.location``, ``ssl.key.location``,
      ``ssl.key.password``;
    * ``timeout``: seconds per request (default 10; every request has one);
    * ``max.retries`` (default 0), ``retries.wait.ms`` (default 1000), ``retries.max.wait.ms``
      (default 20000): retries inside one lookup of an unavailable registry. The default is none
      because a Pipeline already retries the batch under its ``RetryPolicy``.

    ``cache.capacity`` and ``cache.latest.ttl.sec`` are accepted and ignored (the decoders have
    their own cache). Any other key is a ``ConfigError``.
    """

    def __init__(self, conf: Mapping[str, Any] | str | Sequence[str]) -> None:
        if isinstance(conf, Mapping):
            conf = dict(conf)
        else:
            conf = {"url": conf}
        unknown = sorted(set(conf) - _SETTINGS)
        if unknown:
            raise ConfigError(
                f"schema registry: unknown setting(s) {unknown}; known: {sorted(_SETTINGS)}"
            )
        urls = conf.get("url")
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls or not all(isinstance(u, str) for u in urls):
            raise ConfigError(
                "schema registry url: required (a URL, comma-separated URLs or a list)"
            )
        self.urls: list[str] = []
        self._headers: dict[str, str] = {
            "Accept": "application/vnd.schemaregistry.v1+json, application/json",
            "User-Agent": "kfast",
        }
        userinfo = conf.get("basic.auth.user.info")
        source = str(conf.get("basic.auth.credentials.source", "USER_INFO")).upper()
        for u in urls:
            parts = urllib.parse.urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"schema registry url: {u!r} is not an http(s) URL")
            if parts.username is not None:
                if source == "URL" and userinfo is None:
                    userinfo = f"{urllib.parse.unquote(parts.username)}:" + urllib.parse.unquote(
                        parts.password or ""
                    )
                netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
                u = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
            self.urls.append(u.rstrip("/"))
        if source not in ("USER_INFO", "URL", "SASL_INHERIT"):
            raise ConfigError(
                f"schema registry basic.auth.credentials.source: USER_INFO or URL, got {source!r}"
            )
        bearer = conf.get("bearer.auth.credentials.source")
        if userinfo is not None and bearer is not None:
            raise ConfigError("schema registry: basic.auth.* and bearer.auth.* are exclusive")
        if userinfo is not None:
            if ":" not in str(userinfo):
                raise ConfigError("schema registry basic.auth.user.info: expected 'user:password'")
            token = base64.b64encode(str(userinfo).encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        if bearer is not None:
            if str(bearer).upper() != "STATIC_TOKEN" or not conf.get("bearer.auth.token"):
                raise ConfigError(
                    "schema registry bearer auth: bearer.auth.credentials.source = "
                    "'STATIC_TOKEN' with bearer.auth.token is supported"
                )
            self._headers["Authorization"] = f"Bearer {conf['bearer.auth.token']}"
            if conf.get("bearer.auth.logical.cluster"):
                self._headers["target-sr-cluster"] = str(conf["bearer.auth.logical.cluster"])
            if conf.get("bearer.auth.identity.pool.id"):
                self._headers["Confluent-Identity-Pool-Id"] = str(
                    conf["bearer.auth.identity.pool.id"]
                )
        self.timeout = _positive(conf, "timeout", DEFAULT_TIMEOUT)
        self.max_retries = int(_positive(conf, "max.retries", 0, allow_zero=True))
        self.retry_wait = _positive(conf, "retries.wait.ms", 1000, allow_zero=True) / 1000.0
        self.retry_max_wait = _positive(conf, "retries.max.wait.ms", 20000, allow_zero=True) / 1000
        self._ssl: ssl.SSLContext | None = None
        ca, cert, key = (
            conf.get("ssl.ca.location"),
            conf.get("ssl.certificate.location"),
            conf.get("ssl.key.location"),
        )
        if ca or cert or any(u.startswith("https:") for u in self.urls):
            try:
                self._ssl = (
                    ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
                )
                if cert:
                    self._ssl.load_cert_chain(cert, key, conf.get("ssl.key.password"))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"schema registry ssl.*: {exc}") from None
        elif key:
            raise ConfigError("schema registry ssl.key.location: needs ssl.certificate.location")

    def __repr__(self) -> str:
        return f"RegistryClient({', '.join(self.urls)})"

    # -- lookups --------------------------------------------------------------------------------

    def get_schema(self, schema_id: int) -> RegisteredSchema:
        """``GET /schemas/ids/{id}``."""
        return _entry(self._get(f"/schemas/ids/{int(schema_id)}"), schema_id)

    def get_version(self, subject: str, version: int | str) -> RegisteredSchema:
        """``GET /subjects/{subject}/versions/{version}`` (``"latest"`` for the newest)."""
        quoted = urllib.parse.quote(subject, safe="")
        return _entry(self._get(f"/subjects/{quoted}/versions/{version}"))

    def get_latest_version(self, subject: str) -> RegisteredSchema:
        return self.get_version(subject, "latest")

    def _get(self, path: str) -> Any:
        attempt = 0
        while True:
            try:
                return self._get_once(path)
            except SchemaRegistryUnavailable:
                if attempt >= self.max_retries:
                    raise
                time.sleep(min(self.retry_wait * (2**attempt), self.retry_max_wait))
                attempt += 1

    def _get_once(self, path: str) -> Any:
        last: SchemaRegistryUnavailable | None = None
        for base in self.urls:
            url = base + path
            req = urllib.request.Request(url, headers=self._headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:
                status = exc.code
                detail = _error_detail(exc)
                if status == 404 and detail[0] in _NOT_FOUND_CODES:
                    raise _NotFound(f"{url}: HTTP {status}: {detail[1]}") from None
                if status == 404:  # not the registry's answer: a wrong URL or a proxy's page
                    detail = (None, f"{detail[1]} (no Confluent error code: is {base} the API?)")
                last = SchemaRegistryUnavailable(
                    f"schema registry {url} answered HTTP {status}: {detail[1]}",
                    url=base,
                    status=status,
                )
                continue  # another URL may serve it
            except (OSError, TimeoutError, ValueError) as exc:  # URLError, refused, timeout, TLS
                reason = getattr(exc, "reason", None) or exc
                last = SchemaRegistryUnavailable(
                    f"schema registry {url} unreachable: {type(reason).__name__}: {reason}",
                    url=base,
                )
                continue
            try:
                return json.loads(body)
            except ValueError:
                last = SchemaRegistryUnavailable(
                    f"schema registry {url} answered something that is not JSON: {body[:200]!r}",
                    url=base,
                )
        assert last is not None
        raise last


def _positive(conf: Mapping[str, Any], key: str, default: float, allow_zero: bool = False) -> float:
    value = conf.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0 or (number == 0 and not allow_zero) or isinstance(value, bool):
        raise ConfigError(f"schema registry {key}: expected a positive number, got {value!r}")
    return number


def _error_detail(exc: urllib.error.HTTPError) -> tuple[int | None, str]:
    try:
        body = exc.read()[:2000]
    except OSError:
        body = b""
    try:
        doc = json.loads(body)
        return int(doc.get("error_code") or 0) or None, str(doc.get("message") or doc)
    except (ValueError, AttributeError, TypeError):
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")
        return None, (text[:200] or exc.reason or "no body")


# ------------------------------------------------------------------------------- the store


def make_client(registry: Any) -> Any:
    """A client from what a decoder was given (URL, list of URLs, settings dict or client)."""
    if isinstance(registry, (str, Mapping)) or (
        isinstance(registry, Sequence) and not isinstance(registry, (bytes, bytearray))
    ):
        return RegistryClient(registry)
    if not hasattr(registry, "get_schema"):
        raise ConfigError(
            "registry: expected a URL, a dict of schema registry settings or an object with "
            f"get_schema(schema_id), got {type(registry).__name__}"
        )
    rest = getattr(registry, "_rest_client", None)
    if rest is not None and getattr(rest, "timeout", 0) is None:
        # confluent-kafka's client has no request timeout unless given one: a registry that
        # accepts and never answers would hold decoding (and so the partitions) indefinitely
        log.warning(
            "schema registry client %r has no request timeout; set its 'timeout' or give kfast "
            "the settings dict instead (kfast's client defaults to %.0f s)",
            type(registry).__name__,
            DEFAULT_TIMEOUT,
        )
    return registry


class SchemaStore:
    """Lookups with one cache and one failure vocabulary (see the module doc).

    Found entries are kept (ids are immutable) in one :class:`BoundedCache` of
    ``max_cached_schemas``; a confirmed "not found" is kept ``not_found_ttl`` seconds so a run
    of unknown ids costs one confirmation, not one per batch.
    """

    def __init__(
        self,
        registry: Any,
        *,
        max_cached_schemas: int = 1000,
        not_found_retries: int = 2,
        not_found_wait: float = 0.2,
        not_found_ttl: float = 60.0,
    ) -> None:
        if (
            isinstance(max_cached_schemas, bool)
            or not isinstance(max_cached_schemas, int)
            or max_cached_schemas < 1
        ):
            raise ConfigError(
                f"max_cached_schemas: must be an int >= 1, got {max_cached_schemas!r}"
            )
        self.client = make_client(registry)
        self.max_cached_schemas = max_cached_schemas
        self.not_found_retries = not_found_retries
        self.not_found_wait = not_found_wait
        self.not_found_ttl = not_found_ttl
        self._entries: BoundedCache[tuple[Any, ...], Any] = BoundedCache(max_cached_schemas)
        self._latest: dict[str, RegisteredSchema] = {}  # one entry per subject= of a decoder
        self.lookups = 0  # requests that reached the client (tests and metrics)

    def get(self, schema_id: int) -> RegisteredSchema:
        """The entry of ``schema_id``; raises UnknownSchemaId or SchemaRegistryUnavailable."""
        return self._lookup(("id", schema_id), lambda: self.client.get_schema(schema_id), schema_id)

    def version(self, subject: str, version: int) -> RegisteredSchema:
        """The entry of ``subject`` at ``version`` (how references name their schema)."""
        return self._lookup(
            ("version", subject, version),
            lambda: self.client.get_version(subject, version),
            None,
        )

    def latest(self, subject: str) -> RegisteredSchema:
        """The newest version of ``subject`` when first asked, the same afterwards: the
        columns of every decoder sharing this store stay those of one version."""
        entry = self._latest.get(subject)
        if entry is not None:
            return entry
        getter = getattr(self.client, "get_latest_version", None)
        if getter is None:
            raise ConfigError("registry: subject= needs a client with get_latest_version(subject)")
        try:
            entry = self._ask(lambda: getter(subject), None, f"subject {subject!r}")
        except UnknownSchemaId as exc:  # a setting that names nothing: not a row's fault
            raise ConfigError(
                f"subject={subject!r}: the registry has no version of it ({exc})"
            ) from None
        self._latest[subject] = entry
        return entry

    def _lookup(self, key: tuple[Any, ...], ask: Any, schema_id: int | None) -> RegisteredSchema:
        hit = self._entries.get(key)
        if hit is not None:
            if isinstance(hit, RegisteredSchema):
                return hit
            message, until = hit
            if time.monotonic() < until:
                raise UnknownSchemaId(message)
            self._entries.pop(key)
        what = f"schema id {schema_id}" if schema_id is not None else f"{key[1]} v{key[2]}"
        try:
            entry = self._ask(ask, schema_id, what)
        except UnknownSchemaId as exc:
            self._entries.put(key, (str(exc), time.monotonic() + self.not_found_ttl))
            raise
        return self._entries.put(key, entry)

    def _ask(self, ask: Any, schema_id: int | None, what: str) -> RegisteredSchema:
        for attempt in range(self.not_found_retries + 1):
            self.lookups += 1
            try:
                raw = ask()
                if raw is None:
                    raise _NotFound("no entry")
                return _entry(raw, schema_id)
            except SchemaRegistryUnavailable:
                raise
            except Exception as exc:
                if not _is_not_found(exc):
                    raise _unavailable(exc, what) from exc
                message = getattr(exc, "error_message", None) or str(exc)
            if attempt < self.not_found_retries:
                time.sleep(self.not_found_wait * (attempt + 1))
        log.warning("schema registry: %s not found (confirmed %d times)", what, attempt + 1)
        if schema_id is not None:
            raise UnknownSchemaId(f"unknown schema id {schema_id} (registry: {message})")
        raise UnknownSchemaId(f"{what} not found (registry: {message})")


def _is_not_found(exc: BaseException) -> bool:
    if isinstance(exc, (_NotFound, UnknownSchemaId, KeyError, LookupError)):
        return True
    status = getattr(exc, "http_status_code", None)
    code = getattr(exc, "error_code", None)
    # the registry's own "not found" carries a Confluent error code; a bare 404 is a wrong URL
    return code in _NOT_FOUND_CODES or (status == 404 and code is None)


def _unavailable(exc: BaseException, what: str) -> SchemaRegistryUnavailable:
    status = getattr(exc, "http_status_code", None)
    message = getattr(exc, "error_message", None) or str(exc) or type(exc).__name__
    if isinstance(status, int) and status > 0:
        text = f"schema registry answered HTTP {status} for {what}: {message}"
    else:
        text = f"schema registry unavailable for {what}: {type(exc).__name__}: {message}"
        status = None
    return SchemaRegistryUnavailable(text, status=status)
