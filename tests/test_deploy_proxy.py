"""The SuperLink's public port (nginx allow-list) and the nodes' app allow-list.

The proxy tests run the real nginx (deploy/proxy.py's configuration) in front of
a small HTTPS server on loopback that records what reaches it, and send requests
from 127.0.0.1 (the SuperLink machine) and from 127.0.0.2 / 127.0.0.3 (other
machines, one of them listed with --operator). The whole deployment, with
Flower's SuperLink and nodes in network namespaces, is in test_deploy_cluster.py.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy import proxy, worker
from deploy.apps import AppAllowList, app_hash, fab_hash, parse_app_hash
from deploy.certs import create_certificates
from deploy.checks import DeployError
from deploy.cli import main as deploy_main
from deploy.local_cluster import PROJECT_DIR
from deploy.proxy import ProxySettings, nginx_config, parse_operator
from deploy.superlink import SuperLinkSettings, check_superlink, superlink_command
from deploy.supernode import NodeSettings, validate_app_policy, worker_command
from server.launch.processes import free_port

NODE = "127.0.0.2"  # another machine, as nginx sees it: not loopback-allowed
OPERATOR = "127.0.0.3"  # another machine listed with --operator


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return create_certificates(tmp_path_factory.mktemp("certs"), ["10.213.7.1"])


# --------------------------------------------------------------- operators
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.7", "10.0.0.7"),
        (" 10.0.0.7 ", "10.0.0.7"),
        ("10.0.0.0/24", "10.0.0.0/24"),
        ("10.0.0.9/24", "10.0.0.0/24"),
        ("10.0.0.7/32", "10.0.0.7"),
        ("10.0.0.7\n", "10.0.0.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("2001:db8::/64", "2001:db8::/64"),
    ],
)
def test_operator_addresses_are_written_as_nginx_reads_them(text, expected):
    assert parse_operator(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("operator.example.org", "not an IP address or network"),
        ("10.0.0.300", "not an IP address or network"),
        ("", "not an IP address or network"),
        ("10.0.0.7; allow all", "not an IP address or network"),
        ("0.0.0.0/0", "would let every address"),
        ("::/0", "would let every address"),
    ],
)
def test_operator_values_that_are_not_addresses_are_refused(text, message):
    with pytest.raises(DeployError, match=message):
        parse_operator(text)


# ------------------------------------------------------------ nginx config
def settings_for(tmp_path: Path, pki, operators: tuple[str, ...] = ()) -> ProxySettings:
    return ProxySettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        upstream_port=free_port(),
        runtime_dir=tmp_path / "proxy",
        certs_dir=pki.ca_cert.parent,
        operators=operators,
    )


def location(config: str, path: str) -> str:
    """The text of one ``location`` block of the configuration."""
    start = config.index(f"location {path} {{")
    return config[start : config.index("\n        }\n", start)]


def test_config_forwards_the_fleet_api_and_the_control_api_to_loopback_and_operators(tmp_path, pki):
    # Execute
    config = nginx_config(settings_for(tmp_path, pki, ("10.0.0.7", "10.1.0.0/16")))

    # Assert
    fleet, control = location(config, "/v1/fleet/"), location(config, "/v1/control/")
    assert "allow" not in fleet and "proxy_pass https://flower_superlink;" in fleet
    rules = [line.strip() for line in control.splitlines()]
    allows = [rule for rule in rules if rule.startswith(("allow", "deny"))]
    assert allows == [
        "allow 127.0.0.1;",
        "allow ::1;",
        "allow 10.0.0.7;",
        "allow 10.1.0.0/16;",
        "deny all;",
    ]
    assert "location / { return 403; }" in config
    assert f"ssl_certificate {pki.server_cert.resolve()};" in config
    assert "proxy_ssl_verify on;" in config and "proxy_ssl_name localhost;" in config


def test_insecure_config_has_no_tls_on_either_side(tmp_path):
    settings = ProxySettings("0.0.0.0", 8000, 8001, tmp_path, None)

    config = nginx_config(settings)

    assert "listen 0.0.0.0:8000;" in config and "ssl" not in config
    assert "proxy_pass http://flower_superlink;" in config


# -------------------------------------------------------- real nginx proxy
class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """The stand-in SuperLink: answers 200 and records every request that reaches it."""

    seen: list[tuple[str, str, str]]

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.path, self.headers.get("x-forwarded-for", "")))
        body = b"from the superlink"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


@contextmanager
def recording_superlink(port: int, pki) -> Iterator[list[tuple[str, str, str]]]:
    """An HTTPS server on 127.0.0.1:port with the SuperLink certificate."""
    seen: list[tuple[str, str, str]] = []
    handler = type("Handler", (RecordingHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def running_nginx(settings: ProxySettings) -> Iterator[subprocess.Popen[bytes]]:
    """nginx with our configuration, stopped by its PID."""
    binary = proxy.require_nginx()
    config = proxy.write_config(settings)
    proxy.check_config(binary, config)
    process = subprocess.Popen(proxy.nginx_command(binary, config), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", settings.listen_port), 1).close()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "nginx did not open its port"
                time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)


def raw_request(port: int, ca: Path, source: str, method: str, target: str) -> tuple[int, str]:
    """One HTTPS request with exactly this request line, from ``source``; (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    sock = socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0))
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/protobuf\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, pki):  # noqa: ANN201
    """nginx in front of the recording SuperLink, with OPERATOR listed."""
    tmp_path = tmp_path_factory.mktemp("proxy")
    settings = settings_for(tmp_path, pki, (OPERATOR,))
    with recording_superlink(settings.upstream_port, pki) as seen, running_nginx(settings):
        yield SimpleNamespace(settings=settings, seen=seen, ca=pki.ca_cert)


# (source, method, request target, expected status, reaches the SuperLink)
REQUESTS = [
    # Fleet API: every machine
    (NODE, "POST", "/v1/fleet/pull-messages", 200, True),
    (NODE, "POST", "/v1/fleet/activate-node", 200, True),
    ("127.0.0.1", "POST", "/v1/fleet/push-object", 200, True),
    # Control API: this machine and the operator, not a node
    ("127.0.0.1", "POST", "/v1/control/start-run", 200, True),
    (OPERATOR, "POST", "/v1/control/start-run", 200, True),
    (NODE, "POST", "/v1/control/start-run", 403, False),
    (NODE, "POST", "/v1/control/register-node", 403, False),
    (NODE, "POST", "/v1/control/list-runs", 403, False),
    # Runtime API, docs, health, the root: nobody through the public port
    (NODE, "POST", "/v1/runtime/acquire-task", 403, False),
    ("127.0.0.1", "POST", "/v1/runtime/acquire-task", 403, False),
    (NODE, "GET", "/docs", 403, False),
    (NODE, "GET", "/openapi.json", 403, False),
    (NODE, "GET", "/health", 403, False),
    (NODE, "GET", "/", 403, False),
    # Paths that normalise or decode into the Control API, or smuggle anything else
    (NODE, "POST", "/v1/fleet/../control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/%2e%2e/control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/..%2fcontrol/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/%2e%2e%2fcontrol%2fstart-run", 403, False),
    (NODE, "POST", "//v1/control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet//../../v1/control/start-run", 403, False),
    (NODE, "POST", "/v1/Control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/pull-messages?x=/v1/control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/pull-messages;/v1/control/start-run", 403, False),
    (NODE, "POST", "/v1/fleet/", 403, False),
    (NODE, "POST", "/v1/fleet/pull%2dmessages", 403, False),
    ("127.0.0.1", "POST", "/v1/control/start-run?x=1", 403, False),
    # Other methods on allowed paths
    (NODE, "GET", "/v1/fleet/pull-messages", 403, False),
    (NODE, "PUT", "/v1/fleet/pull-messages", 403, False),
    (NODE, "DELETE", "/v1/control/start-run", 403, False),
    ("127.0.0.1", "GET", "/v1/control/list-runs", 403, False),
]


@pytest.mark.system_package("nginx")
@pytest.mark.parametrize(("source", "method", "target", "status", "forwarded"), REQUESTS)
def test_public_port_forwards_only_what_the_allow_list_names(
    proxied, source, method, target, status, forwarded
):
    # Prepare
    before = len(proxied.seen)

    # Execute
    got, body = raw_request(proxied.settings.listen_port, proxied.ca, source, method, target)

    # Assert: the status, and whether the stand-in SuperLink saw it (as sent, with the client)
    assert got == status, body
    if forwarded:
        assert proxied.seen[before:] == [(method, target, source)]
        assert body == "from the superlink"
    else:
        assert proxied.seen[before:] == []
        assert "SuperNodes reach only the Fleet API" in body


@pytest.mark.system_package("nginx")
def test_refused_requests_are_logged_and_forwarded_ones_are_not(proxied):
    # Execute
    raw_request(proxied.settings.listen_port, proxied.ca, NODE, "POST", "/v1/control/stop-run")
    raw_request(proxied.settings.listen_port, proxied.ca, NODE, "POST", "/v1/fleet/get-run")

    # Assert: the access log holds the refusal only (nodes poll several times a second)
    lines = (proxied.settings.runtime_dir / proxy.ACCESS_LOG).read_text().splitlines()
    refused = [line for line in lines if NODE in line and "/v1/control/stop-run" in line]
    assert refused and " 403 " in refused[0]
    assert not any("/v1/fleet/get-run" in line for line in lines)


@pytest.mark.system_package("nginx")
@pytest.mark.parametrize("taken", ["--port", "--loopback-port"])
def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path, pki, capsys, taken):
    # Prepare: one of the two ports is taken
    ports = {"--port": free_port(), "--loopback-port": free_port()}
    with socket.create_server(("127.0.0.1", ports[taken])):
        # Execute
        code = deploy_main(
            ["superlink", "--certs", str(pki.ca_cert.parent), "--state-dir", str(tmp_path)]
            + ["--flwr-home", str(tmp_path / "h"), "--host", "127.0.0.1"]
            + [str(item) for pair in ports.items() for item in pair]
        )

    # Assert: one line naming the port; nothing was started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"127.0.0.1:{ports[taken]} is not free" in err[0]
    assert not (tmp_path / "proxy" / "nginx.pid").exists()


def test_superlink_without_nginx_says_which_package_or_flag(tmp_path, pki, monkeypatch, capsys):
    # Prepare: no nginx anywhere
    monkeypatch.setattr(proxy, "find_nginx", lambda: None)

    # Execute
    code = deploy_main(
        ["superlink", "--certs", str(pki.ca_cert.parent), "--state-dir", str(tmp_path / "s")]
        + ["--flwr-home", str(tmp_path / "h"), "--port", str(free_port())]
    )

    # Assert: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "apt-get install nginx" in err[0] and "--no-proxy" in err[0]


# --------------------------------------------------------- SuperLink side
def test_superlink_listens_on_loopback_behind_the_proxy(pki, tmp_path):
    # Prepare
    base = SuperLinkSettings(pki.ca_cert.parent, tmp_path / "s", tmp_path / "h", port=9000)

    # Execute
    proxied = superlink_command(base)
    stock = superlink_command(SuperLinkSettings(**{**vars(base), "proxy": False}))

    # Assert: Flower on 127.0.0.1:9001 behind the proxy; on --host:--port without it
    assert proxied[proxied.index("--host") + 1] == "127.0.0.1"
    assert proxied[proxied.index("--port") + 1] == "9001"
    assert stock[stock.index("--host") + 1] == "0.0.0.0"
    assert stock[stock.index("--port") + 1] == "9000"
    assert base.proxy_settings().upstream_port == 9001
    assert any("Control API for this machine" in line for line in check_superlink(base))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loopback_port": 9000}, "is the public --port too"),
        ({"proxy": False, "operators": ("10.0.0.7",)}, "--operator needs the proxy"),
    ],
)
def test_superlink_settings_that_cannot_work_are_refused(pki, tmp_path, changes, message):
    settings = SuperLinkSettings(
        pki.ca_cert.parent, tmp_path / "s", tmp_path / "h", port=9000, **changes
    )

    with pytest.raises(DeployError, match=message):
        check_superlink(settings)


def read_ready_pids(process: subprocess.Popen[str]) -> list[int]:
    """Read the command's output up to its ``ready:`` line; the nginx and SuperLink PIDs."""
    lines: list[str] = []
    assert process.stdout is not None
    while not lines or not lines[-1].startswith("ready:"):
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    return [int(part.split(")")[0]) for part in lines[-1].split("pid ")[1:3]]


def gone(pid: int, timeout_s: float = 30) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.system_package("nginx")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_superlink_command_starts_both_and_stops_both_by_pid(pki, tmp_path, stop):
    # Prepare
    port = free_port()
    command = [sys.executable, "-m", "deploy", "superlink", "--certs", str(pki.ca_cert.parent)]
    command += ["--state-dir", str(tmp_path / "s"), "--flwr-home", str(tmp_path / "h")]
    command += ["--port", str(port), "--in-memory"]
    process = subprocess.Popen(
        command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pids: list[int] = []
    try:
        # Execute: wait for the ready line, then stop the command (SIGKILL: it cannot clean up)
        pids = read_ready_pids(process)
        public, _ = raw_request(port, pki.ca_cert, "127.0.0.1", "GET", "/health")
        process.send_signal(stop)
        code = process.wait(timeout=60)

        # Assert: the public port was nginx's; both children end with the command
        assert public == 403
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        assert len(pids) == 2, pids
        assert all(gone(pid) for pid in pids)
    finally:
        # SIGTERM first: a SIGKILLed nginx master would leave its worker behind
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in [process.pid, *pids]:
                if not gone(pid, 0.1):
                    os.kill(pid, signum)
            if all(gone(pid, 10) for pid in [process.pid, *pids]):
                break
        process.wait()


# ------------------------------------------------------------ app builds
@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a" * 64, True),
        ("A" * 64, True),
        (" " + "0123456789abcdef" * 4 + " ", True),
        ("a" * 8, False),
        ("a" * 63, False),
        ("a" * 65, False),
        ("g" * 64, False),
        ("", False),
        ("a" * 62 + "\x00a", False),
    ],
)
def test_allow_app_takes_full_fab_hashes_only(text, ok):
    if ok:
        assert parse_app_hash(text) == text.strip().lower()
    else:
        with pytest.raises(DeployError, match="64 hex digits"):
            parse_app_hash(text)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside Flower's build
def test_app_hash_is_what_flower_sends_and_changes_with_any_file(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from deploy.local_cluster import snapshot_app

    # Prepare: a copy of this app's build
    app = snapshot_app(PROJECT_DIR, tmp_path / "app")

    # Execute
    first = app_hash(app)
    (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + "\n# x\n")
    changed = app_hash(app)

    # Assert: Flower's own build, kept by a snapshot; any edit changes it
    assert first != changed
    assert changed == fab_hash(build_fab_from_disk(app))
    assert app_hash(snapshot_app(app, tmp_path / "again")) == changed
    with pytest.raises(DeployError, match="no pyproject.toml"):
        app_hash(tmp_path)


@pytest.mark.parametrize(
    ("isolation", "allowed", "message"),
    [
        ("warm", AppAllowList(), "say which app builds this node runs"),
        ("warm", AppAllowList(frozenset({"a" * 64}), True), "not both"),
        ("subprocess", AppAllowList(frozenset({"a" * 64})), "enforced by the warm worker"),
        ("warm", AppAllowList(frozenset({"a" * 64})), None),
        ("warm", AppAllowList(any_app=True), None),
        ("subprocess", AppAllowList(any_app=True), None),
    ],
)
def test_a_node_must_say_which_app_builds_it_runs(isolation, allowed, message):
    if message is None:
        validate_app_policy(isolation, allowed)
        return
    with pytest.raises(DeployError, match=message):
        validate_app_policy(isolation, allowed)


def test_node_passes_its_allow_list_to_the_worker(tmp_path):
    allowed = AppAllowList(frozenset({"b" * 64, "a" * 64}))
    settings = NodeSettings("h:1", None, None, "partition-id=0", 9094, tmp_path, allowed=allowed)

    command = worker_command(settings, parent_pid=1)

    assert command[-4:] == ["--allow-app", "a" * 64, "--allow-app", "b" * 64]


@pytest.mark.parametrize(
    "arguments",
    [[], ["--allow-app", "a" * 64, "--allow-any-app"], ["--allow-app", "abc"]],
)
def test_worker_refuses_to_start_without_a_clear_allow_list(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        worker.main(["--runtime-api-address", "127.0.0.1:1", *arguments])

    assert exit_info.value.code == 2
    assert "--allow-app" in capsys.readouterr().err


def fab_bytes(version: str) -> bytes:
    """A FAB-shaped zip whose pyproject names ``version``."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr(
            "pyproject.toml",
            f'[project]\nname = "app"\nversion = "{version}"\n'
            '[tool.flwr.app]\npublisher = "someone"\n',
        )
    return buffer.getvalue()


def test_a_build_whose_version_is_a_path_is_refused_uninstalled(monkeypatch):
    from flwr.common.constant import ErrorCode

    # Prepare: an allowed build whose version would place it outside the builds folder
    task = FakeTask(fab_bytes("1.0.0/../../../escaped"), monkeypatch)
    runner = worker.ClientAppWorker(
        "127.0.0.1:1", allowed=AppAllowList(frozenset({task.fab.hash_str}))
    )

    # Execute
    runner.run_task("token", task.fab.hash_str)

    # Assert
    assert task.installed == []
    error = task.pushed[0].error
    assert error.code == ErrorCode.INVALID_FAB and "is not a plain name" in error.reason


class FakeTask:
    """The Runtime API calls of one task, recorded; the FAB is ``content``."""

    def __init__(self, content: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        from flwr.app import Context, Message, RecordDict
        from flwr.supercore.fab import Fab

        # What the real pull_task_input sets before any message is made
        for name, value in (("_task_id", 3), ("_run_id", 1), ("_node_id", 5)):
            monkeypatch.setattr(worker.TaskIdentity, name, value)
        self.message = Message(RecordDict(), dst_node_id=5, message_type="train")
        self.context = Context(
            run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={}
        )
        self.fab = Fab(fab_hash(content), content, {})
        self.pushed: list[object] = []
        self.outputs: list[tuple[object, str]] = []
        self.installed: list[bytes] = []
        self.install(monkeypatch)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Stand in for the Runtime API calls, the install and the heartbeat."""
        run = SimpleNamespace(fab_id="", fab_version="")
        monkeypatch.setattr(
            worker, "pull_task_input", lambda client: (self.message, self.context, run, self.fab)
        )
        monkeypatch.setattr(
            worker, "push_message", lambda client, reply, context: self.pushed.append(reply)
        )
        monkeypatch.setattr(
            worker,
            "push_task_output",
            lambda client, context, status, details: self.outputs.append((status, details)),
        )
        monkeypatch.setattr(
            worker,
            "install_from_fab",
            lambda content, install_dir, skip_prompt: self.installed.append(content) or install_dir,
        )
        fake_client = SimpleNamespace(close=lambda: None)
        monkeypatch.setattr(
            worker.RuntimeHttpClient, "from_server_address", lambda *a, **k: fake_client
        )
        monkeypatch.setattr(
            worker,
            "HeartbeatSender",
            lambda fn: SimpleNamespace(start=lambda: None, stop=lambda: None, is_running=False),
        )


def test_worker_refuses_an_app_build_not_allowed_before_installing_it(monkeypatch, caplog):
    from flwr.common.constant import ErrorCode, SubStatus

    # Prepare: a FAB whose hash is not listed
    task = FakeTask(b"PK\x03\x04 another app", monkeypatch)
    allowed = AppAllowList(frozenset({"a" * 64}))
    runner = worker.ClientAppWorker("127.0.0.1:1", allowed=allowed)
    loaded: list[str] = []
    monkeypatch.setattr(runner, "_load_app", lambda *args: loaded.append("loaded"))

    # Execute
    runner.run_task("token", task.fab.hash_str)

    # Assert: nothing installed or loaded; an error reply naming the build; one log line
    assert task.installed == [] and loaded == []
    (reply,) = task.pushed
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert f"refused app build {task.fab.hash_str}" in reply.error.reason
    assert task.outputs == [(SubStatus.FAILED, reply.error.reason)]
    refusals = [r for r in caplog.records if "refused app build" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is None


def test_worker_checks_the_bytes_it_got_not_the_hash_it_was_told(monkeypatch):
    # Prepare: the task is announced as an allowed build, its FAB bytes are another's
    task = FakeTask(b"PK\x03\x04 another app", monkeypatch)
    allowed = AppAllowList(frozenset({"a" * 64}))
    runner = worker.ClientAppWorker("127.0.0.1:1", allowed=allowed)

    # Execute
    runner.run_task("token", "a" * 64)

    # Assert
    assert task.installed == []
    assert "refused app build" in task.outputs[0][1]


def test_worker_installs_and_runs_an_allowed_build(monkeypatch):
    from flwr.common.constant import SubStatus

    # Prepare
    task = FakeTask(fab_bytes("1.0.0"), monkeypatch)
    runner = worker.ClientAppWorker(
        "127.0.0.1:1", allowed=AppAllowList(frozenset({task.fab.hash_str}))
    )
    monkeypatch.setattr(
        runner,
        "_load_app",
        lambda *args: lambda message, context: message.create_reply(message.content),
    )

    # Execute
    runner.run_task("token", task.fab.hash_str)

    # Assert
    assert task.installed == [task.fab.content]
    assert task.outputs == [(SubStatus.COMPLETED, "")]
    assert not task.pushed[0].has_error()


def test_a_build_the_superlink_names_by_another_hash_is_refused_uninstalled(monkeypatch):
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.fab import Fab

    # Prepare: allowed bytes, named (task and FAB) by the hash of a revoked build
    task = FakeTask(b"PK\x03\x04 the reviewed app", monkeypatch)
    allowed_hash, revoked_hash = task.fab.hash_str, "b" * 64
    task.fab = Fab(revoked_hash, task.fab.content, {})
    runner = worker.ClientAppWorker("127.0.0.1:1", allowed=AppAllowList(frozenset({allowed_hash})))
    loaded: list[tuple[str, ...]] = []
    monkeypatch.setattr(runner, "_load_app", lambda *args: loaded.append(args))

    # Execute
    runner.run_task("token", revoked_hash)

    # Assert: nothing installed or loaded; an INVALID_FAB error reply naming the mismatch
    assert task.installed == [] and loaded == []
    assert task.outputs[0][0] == SubStatus.FAILED
    error = task.pushed[0].error
    assert error.code == ErrorCode.INVALID_FAB and "not the SHA-256 of its bytes" in error.reason


def test_a_new_build_not_allowed_is_refused_in_process_not_run_cold(monkeypatch):
    # Prepare: another build is loaded; the new one is not allowed
    runner = worker.ClientAppWorker(
        "127.0.0.1:1", allowed=AppAllowList(frozenset({"a" * 64})), loaded_fab_hash="a" * 64
    )
    calls: list[str] = []
    monkeypatch.setattr(runner, "run_cold", lambda token: calls.append("cold"))
    monkeypatch.setattr(runner, "restart", lambda: calls.append("restart"))
    monkeypatch.setattr(runner, "run_warm", lambda token, announced: calls.append("warm"))

    # Execute
    runner.run_task("t", "c" * 64)

    # Assert: the warm path (which refuses it) and no restart
    assert calls == ["warm"]


def test_the_one_task_worker_keeps_the_allow_list(monkeypatch):
    # Prepare
    runner = worker.ClientAppWorker(
        "127.0.0.1:1", parent_pid=7, allowed=AppAllowList(frozenset({"a" * 64}))
    )
    commands: list[list[str]] = []
    monkeypatch.setattr(worker.subprocess, "run", lambda command, check: commands.append(command))

    # Execute
    runner.run_cold("tok")

    # Assert
    (command,) = commands
    assert command[:3] == [sys.executable, "-m", "deploy.worker"]
    assert command[command.index("--task-token") + 1] == "tok"
    assert command[command.index("--allow-app") + 1] == "a" * 64
    assert "--allow-any-app" not in command and "flwr-clientapp" not in command
    assert os.path.basename(command[0]).startswith("python")
