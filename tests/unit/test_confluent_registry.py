"""kfast.confluent.registry: the client's settings, its failure vocabulary, and the TOML [decoder]."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kfast.cli.config import _decoder
from kfast.confluent import ConfluentDecoder, RegistryClient, SchemaStore, UnknownSchemaId
from kfast.errors import ConfigError, SchemaRegistryUnavailable

V1 = {"type": "record", "name": "User", "fields": [{"name": "id", "type": "int"}]}


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {}
    seen: list[tuple[str, dict[str, str]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        status, ctype, body = self.routes.get(self.path, (404, "application/json", b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.routes = {
        "/schemas/ids/1": (200, "application/json", json.dumps({"schema": json.dumps(V1)}).encode()),
        "/schemas/ids/2": (404, "application/json", b'{"error_code":40403,"message":"Schema not found"}'),
        "/schemas/ids/3": (503, "application/json", b'{"error_code":50301,"message":"overloaded"}'),
        "/schemas/ids/4": (429, "application/json", b'{"message":"slow down"}'),
        "/schemas/ids/5": (502, "text/html", b"<html><body>Bad Gateway</body></html>"),
        "/schemas/ids/6": (200, "text/html", b"<html>a proxy login page</html>"),
        "/schemas/ids/7": (404, "text/html", b"<html>Not Found</html>"),  # not the registry's 404
        "/subjects/u-value/versions/latest": (
            200, "application/json",
            json.dumps({"schema": json.dumps(V1), "id": 1, "subject": "u-value", "version": 1}).encode(),
        ),
    }  # fmt: skip
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_answers_are_a_schema_not_found_or_an_outage(server: str) -> None:
    client = RegistryClient({"url": server})
    assert client.get_schema(1).schema_type == "AVRO"
    store = SchemaStore(client, not_found_wait=0.0)
    with pytest.raises(UnknownSchemaId, match="unknown schema id 2"):
        store.get(2)
    for sid, status in ((3, 503), (4, 429), (5, 502), (6, None), (7, 404)):
        with pytest.raises(SchemaRegistryUnavailable) as info:
            store.get(sid)
        assert info.value.status == status and info.value.url == server
    refused = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(SchemaRegistryUnavailable, match="unreachable") as info:
        RegistryClient(refused).get_schema(1)
    assert info.value.url == refused


def test_the_next_url_is_tried_when_one_cannot_be_reached(server: str) -> None:
    refused = f"http://127.0.0.1:{_closed_port()}"
    client = RegistryClient({"url": f"{refused}, {server}"})
    assert client.urls == [refused, server]
    assert client.get_schema(1).schema_str == json.dumps(V1)
    assert RegistryClient([refused, server]).get_schema(1).schema_type == "AVRO"


def test_a_hung_registry_times_out_within_the_timeout() -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts (the kernel completes the handshake) and never answers
    try:
        client = RegistryClient(
            {"url": f"http://127.0.0.1:{hung.getsockname()[1]}", "timeout": 0.5}
        )
        t0 = time.monotonic()
        with pytest.raises(SchemaRegistryUnavailable, match="unreachable"):
            client.get_schema(1)
        assert time.monotonic() - t0 < 5
    finally:
        hung.close()
    assert RegistryClient("http://x:1").timeout == 10.0  # bounded by default


def test_auth_and_tls_settings_are_confluent_kafkas(server: str, tmp_path: Path) -> None:
    RegistryClient({"url": server, "basic.auth.user.info": "alice:s3cret"}).get_schema(1)
    assert _Handler.seen[-1][1]["authorization"] == "Basic YWxpY2U6czNjcmV0"
    RegistryClient(
        {
            "url": f"http://bob:pw@{server.removeprefix('http://')}",
            "basic.auth.credentials.source": "URL",
        }
    ).get_schema(1)
    assert _Handler.seen[-1][1]["authorization"] == "Basic Ym9iOnB3"
    RegistryClient(
        {
            "url": server,
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": "tok",
            "bearer.auth.logical.cluster": "lsrc-1",
            "bearer.auth.identity.pool.id": "pool-2",
        }
    ).get_schema(1)
    headers = _Handler.seen[-1][1]
    assert headers["authorization"] == "Bearer tok"
    assert headers["target-sr-cluster"] == "lsrc-1"
    assert headers["confluent-identity-pool-id"] == "pool-2"
    with pytest.raises(ConfigError, match="unknown setting"):
        RegistryClient({"url": server, "basic.auth.userinfo": "x:y"})
    with pytest.raises(ConfigError, match="exclusive"):
        RegistryClient({"url": server, "basic.auth.user.info": "a:b",
                        "bearer.auth.credentials.source": "STATIC_TOKEN", "bearer.auth.token": "t"})  # fmt: skip
    with pytest.raises(ConfigError, match="ssl"):
        RegistryClient({"url": "https://r:1", "ssl.ca.location": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="timeout"):
        RegistryClient({"url": server, "timeout": 0})


def test_toml_decoder_takes_the_same_settings(server: str, tmp_path: Path) -> None:
    dec = _decoder(
        {
            "type": "confluent",
            "registry_url": server,
            "subject": "u-value",
            "registry": {"basic.auth.user.info": "alice:s3cret", "timeout": 3},
        },
        tmp_path,
    )
    assert isinstance(dec, ConfluentDecoder)
    assert dec.registry.timeout == 3.0
    assert dec.decode([b"\x00\x00\x00\x00\x01\x02"]).to_pylist() == [{"id": 1}]
    assert _Handler.seen[-1][1]["authorization"] == "Basic YWxpY2U6czNjcmV0"
    with pytest.raises(ConfigError, match=r"\[decoder\].registry: .*unknown setting"):
        _decoder({"type": "confluent", "registry": {"url": server, "bogus": 1}}, tmp_path)
    with pytest.raises(ConfigError, match="registry_url"):
        _decoder({"type": "confluent", "reader_schema": json.dumps(V1)}, tmp_path)


def test_a_foreign_client_without_timeout_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    with caplog.at_level(logging.WARNING, logger="kfast.confluent"):
        SchemaStore(SchemaRegistryClient({"url": "http://127.0.0.1:1"}))
        assert "no request timeout" in caplog.text
        caplog.clear()
        SchemaStore(SchemaRegistryClient({"url": "http://127.0.0.1:1", "timeout": 5}))
        assert caplog.text == ""


def test_the_test_beds_registry_fetch_is_cached_and_uses_a_throwaway_maven_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kfast.testing import registry as testbed

    cmd = testbed.mvn_command(tmp_path / "m2", tmp_path / "out", "3.0.9", "mvn")
    assert f"-Dmaven.repo.local={tmp_path / 'm2'}" in cmd
    assert "-Dartifact=io.apicurio:apicurio-registry-app:3.0.9:tar.gz:all" in cmd
    target = testbed.registry_dir("3.0.9", tmp_path)
    assert not testbed.is_complete(target)
    target.mkdir(parents=True)
    (target / "apicurio-registry-app-3.0.9-runner.jar").write_bytes(b"")
    (target / testbed.MARKER).write_text("3.0.9\n")
    # complete: no Maven run (an mvn that fails proves it is not called)
    assert testbed.fetch_registry(tmp_path, mvn="/bin/false") == target
    monkeypatch.setenv("KFAST_TEST_REGISTRY", "http://registry.example:8081/apis/ccompat/v7/")
    external = testbed.SchemaRegistry()
    assert external.external and external.url == "http://registry.example:8081/apis/ccompat/v7"
    with pytest.raises(testbed.RegistryStartError):
        external.restart()
