"""Hostile requests to the dashboard: each answers 4xx with the reason, never a 500.

Most go through Starlette's TestClient; what a client library would not send
(a bad ``Content-Length``, a chunked body, a WebSocket upgrade, a stream followed
while its run.db is overwritten) goes to a real uvicorn server on loopback.
"""

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.websockets import WebSocketDisconnect

from server.launch.processes import free_port
from server.record.store import DB_NAME, RunStore
from server.ui import cli
from server.ui.dashboard import DashboardSettings, create_app, dashboard_settings, startup_lines
from server.ui.dashboard.security import LOOPBACK_NAMES, MAX_BODY_BYTES, validate_public_origin
from server.ui.dashboard.strict_json import (
    MAX_JSON_DEPTH,
    BodyError,
    json_depth,
    parse_json_body,
    validate_weight_body,
)
from tests.helpers import ACTION, LOCAL, TestClient, make_run

TOKEN = "s3cret-token"
PUBLIC = "https://dash.example.org"


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "live")
    return runs


def client_of(app: object, base_url: str = LOCAL) -> TestClient:
    """A client that gets server errors back as 500 responses instead of exceptions."""
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


def local_app(runs_dir: Path, **settings: object) -> object:
    return create_app(DashboardSettings(runs_dir, allowed_hosts=LOOPBACK_NAMES, **settings))


def queued(runs_dir: Path) -> list[tuple[str, str]]:
    store = RunStore(runs_dir / "live")
    try:
        return [(c["command"], c["argument"]) for c in store.pending_commands()]
    finally:
        store.close()


# ------------------------------------------------------------- weight bodies
BAD_WEIGHT_BODIES = {
    "partition-400-digits": (b'{"partition": 1' + b"0" * 399 + b', "weight": 1}', "400 digits"),
    "partition-over-int64": (b'{"partition": 9223372036854775808, "weight": 1}', "out of range"),
    "weight-1e999": (b'{"partition": 0, "weight": 1e999}', "1e999 is out of range"),
    "weight-minus-1e999": (b'{"partition": 0, "weight": -1e999}', "out of range"),
    "weight-400-digit-int": (b'{"partition": 0, "weight": 9' + b"9" * 399 + b"}", "400 digits"),
    "weight-NaN": (b'{"partition": 0, "weight": NaN}', "NaN is not JSON"),
    "weight-Infinity": (b'{"partition": 0, "weight": Infinity}', "Infinity is not JSON"),
    "weight-minus-Infinity": (b'{"partition": 0, "weight": -Infinity}', "Infinity is not JSON"),
    "nested-20000": (b"[" * 20_000 + b"]" * 20_000, "nests 20000 levels deep"),
    "nested-objects": (b'{"a":' * 9 + b"1" + b"}" * 9, f"at most {MAX_JSON_DEPTH}"),
    "nested-in-weight": (b'{"partition": 0, "weight": ' + b"[" * 50 + b"]" * 50 + b"}", "deep"),
    "not-utf8": (b'{"partition": 0, "weight": "\xff\xfe"}', "UTF-8"),
    "latin1-text": ('{"partition": 0, "weight": "é"}'.encode("latin-1"), "UTF-8"),
    "not-json": (b"partition=0&weight=1", "must be JSON"),
    "empty": (b"", "must be JSON"),
    "truncated": (b'{"partition": 0, "weig', "must be JSON"),
    "a-list": (b"[0, 1]", "must be a JSON object"),
    "a-number": (b"1e5", "must be a JSON object"),
    "unknown-key": (b'{"partition": 0, "weight": 1, "node": 5}', "unknown key 'node'"),
    "no-weight": (b'{"partition": 0}', "no 'weight'"),
    "bool-partition": (b'{"partition": true, "weight": 1}', "got a boolean"),
    "float-partition": (b'{"partition": 1.5, "weight": 1}', "must be an integer"),
    "string-weight": (b'{"partition": 0, "weight": "2"}', "got a string"),
    "null-weight": (b'{"partition": 0, "weight": null}', "got null"),
    "non-ascii-key": ('{"partition": 0, "weight": 1, "☃": 1}'.encode(), "unknown key '☃'"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHT_BODIES))
def test_malformed_weight_bodies_answer_400_with_the_reason_and_queue_nothing(runs_dir, case):
    # Prepare
    body, reason = BAD_WEIGHT_BODIES[case]
    assert len(body) <= MAX_BODY_BYTES

    # Execute
    response = client_of(local_app(runs_dir)).post(
        "/api/runs/live/weight", headers=ACTION, content=body
    )

    # Assert
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert reason in error and "\n" not in error
    assert queued(runs_dir) == []


def test_a_weight_body_at_the_limits_is_accepted(runs_dir):
    # Prepare: 18 digits, depth 1, finite extremes, padded with spaces to the size limit
    body = b'{"partition": 0, "weight": 0.000000000000000001e-300}'
    padded = body + b" " * (MAX_BODY_BYTES - len(body))

    # Execute
    response = client_of(local_app(runs_dir)).post(
        "/api/runs/live/weight", headers=ACTION, content=padded
    )

    # Assert
    assert response.status_code == 202, response.text
    assert queued(runs_dir)[0][0] == "weight"


def test_parsed_weight_body_is_partition_and_float_weight():
    assert validate_weight_body(
        parse_json_body(b'{"weight": 3, "partition": 123456789012345678}')
    ) == (
        123456789012345678,
        3.0,
    )


@pytest.mark.parametrize(
    ("text", "depth"),
    [("1", 0), ("[]", 1), ('{"a": [1, {"b": 2}]}', 3), ('["[[[[", "\\"[[["]', 1), ("]]][[", 2)],
)
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


def test_bodies_refused_by_the_parser_are_value_errors():
    with pytest.raises(BodyError, match="out of range"):
        parse_json_body(b"1e400")
    assert issubclass(BodyError, ValueError)


# ------------------------------------------------------------- body size
def test_body_over_the_limit_answers_413_before_anything_is_queued(runs_dir):
    # Prepare
    client = client_of(local_app(runs_dir))
    too_big = b'{"partition": 0, "weight": 1}' + b" " * MAX_BODY_BYTES

    # Execute
    weight = client.post("/api/runs/live/weight", headers=ACTION, content=too_big)
    pause = client.post("/api/runs/live/pause", headers=ACTION, content=too_big)
    streamed = client.post(
        "/api/runs/live/pause", headers=ACTION, content=iter([b" " * 40_000, b" " * 40_000])
    )

    # Assert
    for response in (weight, pause, streamed):
        assert response.status_code == 413
        assert response.json()["error"] == f"request body too large: at most {MAX_BODY_BYTES} bytes"
    assert queued(runs_dir) == []


def test_body_at_the_limit_is_read(runs_dir):
    # Execute
    response = client_of(local_app(runs_dir)).post(
        "/api/runs/live/pause", headers=ACTION, content=b" " * MAX_BODY_BYTES
    )

    # Assert
    assert response.status_code == 202
    assert queued(runs_dir) == [("pause", "")]


# ------------------------------------------------------ tokens and login codes
def token_app(runs_dir: Path, **settings: object) -> object:
    settings = {"token": TOKEN, "login_code": "one-time-code", **settings}
    return create_app(DashboardSettings(runs_dir, **settings))


@pytest.mark.parametrize(
    "code", ["é", "%C3%A9", "%FF", "%00", "☃" * 50, "one-time-codé", "x" * 5000, "%F0%9F%98%80"]
)
def test_non_ascii_or_odd_login_codes_answer_403(runs_dir, code):
    # Prepare
    client = client_of(token_app(runs_dir), "http://192.0.2.10:8765")

    # Execute
    response = client.get(f"/login?code={code}", follow_redirects=False)

    # Assert
    assert response.status_code == 403 and "login link is wrong" in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-fedcoord-token", "é".encode("latin-1"))],
        [(b"x-fedcoord-token", "s3cret-tokén".encode())],
        [(b"authorization", "Bearer ☃".encode())],
        [(b"authorization", b"Bearer \xff\xfe")],
        [(b"cookie", "fedcoord_token=é☃".encode())],
        [(b"cookie", b"fedcoord_token=\xff; other=\x80")],
    ],
)
def test_non_ascii_tokens_answer_401(runs_dir, headers):
    # Prepare: raw header bytes, as a hostile client sends them
    app = token_app(runs_dir)

    # Execute
    status, body = asgi_get(app, "/api/runs", headers)

    # Assert
    assert status == 401 and b"missing or wrong token" in body


def asgi_get(
    app: object, path: str, headers: list[tuple[bytes, bytes]], host: bytes = b"192.0.2.10:8765"
) -> tuple[int, bytes]:
    """One GET straight through the ASGI interface, headers as raw bytes."""
    import anyio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host), *headers],
        "client": ("192.0.2.1", 5000),
        "server": ("192.0.2.10", 8765),
    }
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)  # type: ignore[arg-type]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return int(sent[0]["status"]), body  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("length", "status", "reason"),
    [
        (b"abc", 400, b"invalid Content-Length header"),
        ("\u00b2".encode("latin-1"), 400, b"invalid Content-Length header"),
        (b"-5", 400, b"invalid Content-Length header"),
        (b"1" + b"0" * 400, 413, b"request body too large"),
        (b"65537", 413, b"request body too large"),
    ],
)
def test_content_length_that_is_no_count_or_too_big_is_refused(runs_dir, length, status, reason):
    # Execute: straight to the app, as a server that let the header through would send it
    answer = asgi_get(
        local_app(runs_dir), "/api/runs", [(b"content-length", length)], b"127.0.0.1:8765"
    )

    # Assert
    assert answer[0] == status and reason in answer[1]


# ------------------------------------------------------------- other scopes
@pytest.mark.parametrize(
    "path", ["/", "/api/runs", "/api/runs/live/stream", "/static/dashboard.js"]
)
def test_websockets_are_refused_before_they_are_accepted(runs_dir, path):
    # Prepare
    client = client_of(local_app(runs_dir))

    # Execute
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path):
        pass

    # Assert
    assert refused.value.code == 1008


def test_unknown_scope_types_are_refused(runs_dir):
    # Prepare
    import anyio

    app = local_app(runs_dir)

    async def nothing() -> dict[str, object]:
        return {}

    async def ignore(message: object) -> None:
        return None

    # Execute / Assert
    with pytest.raises(ValueError, match="HTTP only"):
        anyio.run(app, {"type": "webtransport", "path": "/"}, nothing, ignore)  # type: ignore[arg-type]


def test_lifespan_still_starts_and_stops_the_app(runs_dir):
    # Execute: TestClient as a context manager runs the lifespan protocol around requests
    with client_of(local_app(runs_dir)) as client:
        response = client.get("/api/runs")

    # Assert
    assert response.status_code == 200


# ----------------------------------------------------------------- run names
@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/" + "a" * 5000,
        "/runs/" + "a" * 5000,
        "/api/runs/%FF%FE",
        "/api/runs/%C3%A9t%C3%A9",
        "/api/runs/%00",
        "/api/runs/live%00",
        "/api/runs/" + "9" * 500 + "/charts/loss.svg",
        "/api/runs/%F0%9F%98%80/stream",
    ],
)
def test_odd_run_names_answer_4xx(runs_dir, path):
    # Execute
    response = client_of(local_app(runs_dir)).get(path)

    # Assert
    assert 400 <= response.status_code < 500, response.text
    assert '"status"' not in response.text


# -------------------------------------------------- behind a TLS reverse proxy
@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://Dash.Example.org", "https://dash.example.org"),
        ("https://dash.example.org/", "https://dash.example.org"),
        ("https://dash.example.org:443", "https://dash.example.org"),
        ("https://dash.example.org:8443", "https://dash.example.org:8443"),
        ("http://10.0.0.5:80", "http://10.0.0.5"),
        ("https://[2001:db8::1]:8443", "https://[2001:db8::1]:8443"),
    ],
)
def test_public_origin_is_written_as_browsers_send_it(given, origin):
    assert validate_public_origin(given) == origin


@pytest.mark.parametrize(
    "given",
    [
        "dash.example.org",
        "ftp://dash.example.org",
        "https://",
        "https://user@dash.example.org",
        "https://dash.example.org/dashboard",
        "https://dash.example.org?x=1",
        "https://dash.example.org#top",
        "https://dash.example.org:99999",
        "https://dash.example.org:port",
        "",
    ],
)
def test_public_origin_that_is_not_an_origin_is_refused_with_the_form(given):
    with pytest.raises(ValueError, match="must look like https://"):
        validate_public_origin(given)


def proxied_client(runs_dir: Path, host: str) -> TestClient:
    """The dashboard as ``--public-origin`` sets it up, reached by a proxy sending ``host``."""
    settings = dashboard_settings(runs_dir, "127.0.0.1", PUBLIC)
    client = client_of(create_app(settings), f"http://{host}")
    client.headers["X-Fedcoord-Token"] = str(settings.token)
    return client


@pytest.mark.parametrize("proxy_host", ["127.0.0.1:8765", "dash.example.org"])
def test_buttons_work_behind_the_tls_proxy(runs_dir, proxy_host):
    # Prepare: nginx passes Host 127.0.0.1:8765 by default, Caddy the public host name
    client = proxied_client(runs_dir, proxy_host)
    browser = {**ACTION, "Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"}

    # Execute
    pause = client.post("/api/runs/live/pause", headers=browser)
    weight = client.post(
        "/api/runs/live/weight", headers=browser, json={"partition": 0, "weight": 2}
    )

    # Assert
    assert pause.status_code == 202 and weight.status_code == 202
    assert [command for command, _ in queued(runs_dir)] == ["pause", "weight"]


def test_behind_the_proxy_other_origins_and_hosts_are_still_refused(runs_dir):
    # Prepare
    client = proxied_client(runs_dir, "127.0.0.1:8765")

    # Execute
    foreign = client.post(
        "/api/runs/live/pause", headers={**ACTION, "Origin": "https://evil.example"}
    )
    plain_http = client.post(
        "/api/runs/live/pause", headers={**ACTION, "Origin": "http://dash.example.org"}
    )
    rebound = client.get("/api/runs", headers={"Host": "evil.example"})
    no_token = client.get("/api/runs", headers={"X-Fedcoord-Token": ""})

    # Assert
    assert foreign.status_code == plain_http.status_code == 403
    assert f"is not {PUBLIC}" in foreign.json()["error"]
    assert rebound.status_code == 400
    assert no_token.status_code == 401
    assert queued(runs_dir) == []


def test_behind_an_https_proxy_the_login_cookie_is_secure(runs_dir):
    # Prepare
    settings = dashboard_settings(runs_dir, "127.0.0.1", PUBLIC)
    client = client_of(create_app(settings), "http://127.0.0.1:8765")
    plain = client_of(token_app(runs_dir), "http://192.0.2.10:8765")

    # Execute
    proxied = client.get(f"/login?code={settings.login_code}", follow_redirects=False)
    direct = plain.get("/login?code=one-time-code", follow_redirects=False)

    # Assert
    assert proxied.status_code == 303 and "secure" in proxied.headers["set-cookie"].lower()
    assert direct.status_code == 303 and "secure" not in direct.headers["set-cookie"].lower()


def test_public_origin_needs_a_token_and_prints_the_public_login_link(tmp_path):
    # Execute
    settings = dashboard_settings(tmp_path, "127.0.0.1", "https://Dash.Example.org/")
    lines = startup_lines(settings, "127.0.0.1", 8765)

    # Assert
    assert settings.token and settings.public_origin == PUBLIC
    assert settings.allowed_hosts == (*LOOPBACK_NAMES, "dash.example.org")
    assert any(f"{PUBLIC}/login?code={settings.login_code}" in line for line in lines)


def test_cli_refuses_a_bad_public_origin_with_one_line(tmp_path, capsys):
    # Execute
    code = cli.main(["--runs-dir", str(tmp_path), "dashboard", "--public-origin", "dash.example"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--public-origin must look like https://" in err
    assert cli.build_parser().parse_args(["dashboard", "--public-origin", PUBLIC]).public_origin


# ------------------------------------------------------------ over real HTTP
@contextmanager
def served(app: object) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; stop it after."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="critical", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-under-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and received.startswith(b"HTTP/1.1 101"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def head(path: str, *lines: str) -> bytes:
    rows = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "X-Fedcoord-Request: 1", *lines]
    return ("\r\n".join(rows) + "\r\n\r\n").encode()


@pytest.fixture()
def port(runs_dir: Path) -> Iterator[int]:
    with served(local_app(runs_dir, stream_interval_s=0.05, stream_max_s=30.0)) as port:
        yield port


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (head("/api/runs/live/pause", "Content-Length: 1" + "0" * 400, "Connection: close"), 400),
        (head("/api/runs/live/pause", "Content-Length: -1", "Connection: close"), 400),
        (head("/api/runs/live/pause", "Content-Length: 70000", "Connection: close"), 413),
        (head("/api/runs/live/pause", "Content-Length: 99999999999999", "Connection: close"), 413),
        (
            head("/api/runs/live/pause", "Transfer-Encoding: chunked", "Connection: close")
            + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3
            + b"0\r\n\r\n",
            413,
        ),
        (
            head("/api/runs/live/pause", "Transfer-Encoding: chunked", "Connection: close")
            + b"10\r\n"
            + b" " * 16
            + b"\r\n0\r\n\r\n",
            202,
        ),
    ],
    ids=[
        "length-401-digits",
        "length-negative",
        "length-over-limit",
        "length-14-digits",
        "chunked-over",
        "chunked-ok",
    ],
)
def test_lengths_and_chunked_bodies_over_real_http(runs_dir, port, request_bytes, status):
    # Execute
    response = exchange(port, request_bytes)

    # Assert
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]
    assert queued(runs_dir) == ([("pause", "")] if status == 202 else [])


def test_websocket_upgrade_over_real_http_is_refused(port):
    # Prepare
    upgrade = (
        b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )

    # Execute
    response = exchange(port, upgrade)

    # Assert
    assert response.startswith(b"HTTP/1.1 403 "), response[:200]


def test_stream_that_loses_its_run_store_ends_with_a_problem_event(runs_dir, port):
    # Prepare
    events: list[tuple[str, str]] = []
    url = f"http://127.0.0.1:{port}/api/runs/live/stream"
    with httpx.stream("GET", url, timeout=30) as response:
        lines = response.iter_lines()
        kind = ""
        for line in lines:
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, line[6:]))
                if kind == "run" and len(events) == 1:
                    # Execute: the run's store is overwritten while the page follows it
                    damaged = b"this is not a database" * 200
                    (runs_dir / "live" / DB_NAME).write_bytes(damaged)

    # Assert: the stream ended by itself, the problem event last
    assert events[0][0] == "run" and events[-1][0] == "problem"
    problem = json.loads(events[-1][1])
    assert problem["state"] == "unreadable" and "run 'live' is unreadable" in problem["error"]
