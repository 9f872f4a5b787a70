"""Unit tests of the deploy tool: certificates, SAN and TLS checks, node data, config files."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from flwr.common.config import parse_config_args
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from client.local_data import (
    LocalDataError,
    load_local_splits,
    normalisation,
    read_local_arrays,
    validate_for_dataset,
)
from client.shard import load_node_data
from deploy import flower_supernode
from deploy.certs import (
    CertificateError,
    certificate_covers,
    certificate_names,
    create_certificates,
    create_node_keys,
    load_certificate,
    load_node_private_key,
    validate_certificate_covers,
    validate_key_matches,
    validate_signed_by,
)
from deploy.checks import (
    DeployError,
    SuperLinkUnreachableError,
    TlsMismatchError,
    check_local_certificates,
    check_superlink_insecure,
    check_superlink_tls,
    parse_address,
)
from deploy.cli import main as deploy_main
from deploy.connection import write_connection
from deploy.supernode import NodeSettings, OnlineMarker, build_node_config, flower_command
from task.config import RunConfig
from task.datasets import load_digits_splits


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A CA with a SuperLink certificate for superlink.test and 10.213.7.1 (+ loopback)."""
    return create_certificates(tmp_path_factory.mktemp("certs"), ["superlink.test", "10.213.7.1"])


@contextmanager
def tls_server(cert: Path, key: Path, host: str = "127.0.0.1") -> Iterator[int]:
    """A TLS server on ``host`` that completes handshakes; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server((host, 0)) as listener:
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.settimeout(1)
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(timeout=5)


@contextmanager
def plain_server() -> Iterator[int]:
    """A TCP server that answers anything with a line of HTTP and closes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def digits_npz(folder: Path, n: int = 300, seed: int = 0) -> Path:
    digits = load_digits()
    rows = np.random.default_rng(seed).choice(len(digits.target), n, replace=False)
    x = np.round(digits.images[rows] * 255 / 16).astype(np.uint8)
    return write_npz(folder / "data.npz", x=x, y=digits.target[rows])


# ------------------------------------------------------------- certificates
def test_server_certificate_names_the_hosts_and_loopback_and_is_signed_by_the_ca(pki):
    # Execute
    certificate = load_certificate(pki.server_cert)
    ca = load_certificate(pki.ca_cert)

    # Assert
    names = certificate_names(certificate)
    assert {"superlink.test", "10.213.7.1", "localhost", "127.0.0.1", "::1"} <= set(names)
    validate_signed_by(certificate, ca, "test")
    validate_key_matches(certificate, pki.server_key)
    assert oct(pki.server_key.stat().st_mode & 0o777) == "0o600"
    assert oct(pki.ca_key.stat().st_mode & 0o777) == "0o600"


def test_a_new_server_certificate_keeps_the_ca_unless_asked(tmp_path):
    # Prepare
    first = create_certificates(tmp_path, ["10.213.7.1"])
    ca_before = first.ca_cert.read_bytes()

    # Execute
    second = create_certificates(tmp_path, ["10.213.7.1", "10.213.7.2"])
    ca_kept = second.ca_cert.read_bytes()
    second_names = certificate_names(load_certificate(second.server_cert))
    third = create_certificates(tmp_path, ["10.213.7.1"], force=True)

    # Assert
    assert ca_kept == ca_before
    assert "10.213.7.2" in second_names
    assert third.ca_cert.read_bytes() != ca_before


@pytest.mark.parametrize(
    ("host", "covered"),
    [
        ("superlink.test", True),
        ("SUPERLINK.test", True),
        ("10.213.7.1", True),
        ("127.0.0.1", True),
        ("[::1]", True),
        ("10.213.7.2", False),
        ("other.test", False),
        ("sub.superlink.test", False),
    ],
)
def test_certificate_covers_exact_names_and_addresses(pki, host, covered):
    assert certificate_covers(load_certificate(pki.server_cert), host) is covered


def test_mismatched_address_error_names_the_certificate_names(pki):
    with pytest.raises(CertificateError) as error:
        validate_certificate_covers(load_certificate(pki.server_cert), "10.213.7.9", "here")
    message = str(error.value)
    assert "10.213.7.9" in message and "superlink.test" in message and "10.213.7.1" in message
    assert "python -m deploy certs --host 10.213.7.9" in message


def test_certificate_of_another_ca_is_refused(pki, tmp_path):
    # Prepare
    other = create_certificates(tmp_path, ["superlink.test"])

    # Execute / Assert
    with pytest.raises(CertificateError, match="not signed by this CA"):
        validate_signed_by(load_certificate(other.server_cert), load_certificate(pki.ca_cert), "x")
    with pytest.raises(CertificateError, match="does not belong"):
        validate_key_matches(load_certificate(pki.server_cert), other.server_key)


def test_local_certificate_check_requires_every_address(pki):
    names = check_local_certificates(
        pki.ca_cert, pki.server_cert, pki.server_key, ["127.0.0.1", "10.213.7.1"]
    )
    assert "10.213.7.1" in names
    with pytest.raises(CertificateError, match="10.213.7.3"):
        check_local_certificates(pki.ca_cert, pki.server_cert, pki.server_key, ["10.213.7.3"])


def test_node_keys_are_what_flower_reads_and_are_kept(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    # Execute
    paths = create_node_keys(tmp_path, "node-1")

    # Assert: Flower's own loaders accept them; a second run does not replace the key
    load_node_private_key(paths.private_key)
    assert try_load_public_key(paths.public_key)
    assert oct(paths.private_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CertificateError, match="exists"):
        create_node_keys(tmp_path, "node-1")
    with pytest.raises(CertificateError, match="not an unencrypted OpenSSH private key"):
        load_node_private_key(paths.public_key)


# ---------------------------------------------------------------- TLS probe
def test_tls_probe_accepts_a_matching_superlink(pki):
    with tls_server(pki.server_cert, pki.server_key) as port:
        names = check_superlink_tls(f"127.0.0.1:{port}", pki.ca_cert, timeout_s=3)
        check_superlink_tls(f"localhost:{port}", pki.ca_cert, timeout_s=3)
    assert "superlink.test" in names


def test_tls_probe_names_an_address_missing_from_the_certificate(pki):
    # 127.0.0.2 is loopback on Linux, and not in the certificate.
    server = tls_server(pki.server_cert, pki.server_key, host="127.0.0.2")
    with server as port, pytest.raises(CertificateError) as error:
        check_superlink_tls(f"127.0.0.2:{port}", pki.ca_cert, timeout_s=3)
    assert "does not match the address '127.0.0.2'" in str(error.value)
    assert "valid for" in str(error.value)


def test_tls_probe_refuses_a_certificate_of_another_ca(pki, tmp_path):
    other = create_certificates(tmp_path, ["127.0.0.1"])
    server = tls_server(other.server_cert, other.server_key)
    with server as port, pytest.raises(CertificateError, match="not signed by this CA"):
        check_superlink_tls(f"127.0.0.1:{port}", pki.ca_cert, timeout_s=3)


def test_tls_probe_says_when_the_superlink_does_not_speak_tls(pki):
    with plain_server() as port, pytest.raises(TlsMismatchError, match="--insecure"):
        check_superlink_tls(f"127.0.0.1:{port}", pki.ca_cert, timeout_s=3)


def test_insecure_node_against_a_tls_superlink_is_told_to_use_the_ca(pki):
    server = tls_server(pki.server_cert, pki.server_key)
    with server as port, pytest.raises(TlsMismatchError, match="uses TLS"):
        check_superlink_insecure(f"127.0.0.1:{port}", timeout_s=3)


def test_unreachable_superlink_fails_fast_with_a_clear_message(pki):
    # Execute
    started = time.monotonic()
    with pytest.raises(SuperLinkUnreachableError) as error:
        check_superlink_tls(f"127.0.0.1:{closed_port()}", pki.ca_cert, timeout_s=2)

    # Assert
    assert time.monotonic() - started < 5
    assert "cannot reach the SuperLink at 127.0.0.1:" in str(error.value)


@pytest.mark.parametrize("address", ["superlink", "host:", ":8000", "host:99999", "h:x"])
def test_bad_addresses_are_refused(address):
    with pytest.raises(DeployError, match="HOST:PORT"):
        parse_address(address)


def test_ipv6_addresses_parse():
    assert str(parse_address("[::1]:8000")) == "[::1]:8000"


def test_cli_check_prints_one_error_line_and_exits_2(pki, tmp_path, capsys):
    # Prepare
    key = create_node_keys(tmp_path, "n").private_key
    data = digits_npz(tmp_path / "site")

    # Execute
    code = deploy_main(
        [
            "check",
            "--superlink",
            f"127.0.0.1:{closed_port()}",
            "--ca",
            str(pki.ca_cert),
            "--key",
            str(key),
            "--data-path",
            str(data.parent),
            "--timeout",
            "2",
        ]
    )

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "check: error: cannot reach the SuperLink at 127.0.0.1:" in err


# ---------------------------------------------------------------- node data
def test_data_path_folder_is_read_and_scaled(tmp_path):
    # Prepare
    digits_npz(tmp_path)

    # Execute
    arrays = read_local_arrays(tmp_path)

    # Assert
    assert arrays.x.shape == (300, 1, 8, 8) and arrays.x.dtype == np.float32
    assert arrays.x.min() >= 0.0 and arrays.x.max() <= 1.0
    assert arrays.y.dtype == np.int64 and arrays.path == tmp_path / "data.npz"


def test_data_path_accepts_a_float_nchw_file(tmp_path):
    x = np.random.default_rng(0).random((10, 3, 32, 32), dtype=np.float32)
    path = write_npz(tmp_path / "own.npz", x=x, y=np.arange(10) % 10)
    arrays = read_local_arrays(path)
    assert validate_for_dataset(arrays, "cifar10").input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "no array x or y (found: images)"),
        ({"x": np.zeros((4, 8), np.uint8), "y": np.zeros(4, int)}, "x has shape (4, 8)"),
        ({"x": np.zeros((4, 8, 8), np.int32), "y": np.zeros(4, int)}, "x is int32"),
        ({"x": np.full((4, 8, 8), 2.0), "y": np.zeros(4, int)}, "must lie in [0, 1]"),
        ({"x": np.full((4, 8, 8), np.nan), "y": np.zeros(4, int)}, "NaN"),
        ({"x": np.zeros((4, 8, 8)), "y": np.zeros(3, int)}, "expected (4,)"),
        ({"x": np.zeros((4, 8, 8)), "y": np.array(["a"] * 4)}, "y is <U1"),
        ({"x": np.zeros((4, 8, 8)), "y": -np.ones(4, int)}, "negative labels"),
        ({"x": np.zeros((1, 8, 8)), "y": np.zeros(1, int)}, "needs >= 2"),
    ],
)
def test_malformed_data_names_the_file_and_the_format(tmp_path, arrays, message):
    path = write_npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(LocalDataError) as error:
        read_local_arrays(tmp_path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_missing_relative_and_corrupt_data_paths_are_clear(tmp_path):
    with pytest.raises(LocalDataError, match=f"{tmp_path / 'nowhere'}: no such file"):
        read_local_arrays(tmp_path / "nowhere")
    with pytest.raises(LocalDataError, match="must be an absolute path"):
        read_local_arrays("site-a")
    (tmp_path / "data.npz").write_bytes(b"not a zip file")
    with pytest.raises(LocalDataError, match="cannot read it as .npz") as error:
        read_local_arrays(tmp_path)
    assert "expected a folder holding data.npz" in str(error.value)


def test_data_that_does_not_fit_the_runs_dataset_is_refused(tmp_path):
    # Prepare: 8x8 images, and labels beyond 10 classes
    digits_npz(tmp_path / "small")
    write_npz(tmp_path / "labels" / "data.npz", x=np.zeros((4, 8, 8)), y=np.array([0, 1, 2, 12]))

    # Execute / Assert
    with pytest.raises(LocalDataError, match="images are 1x8x8 .* dataset='mnist'.* 1x28x28"):
        validate_for_dataset(read_local_arrays(tmp_path / "small"), "mnist")
    with pytest.raises(LocalDataError, match="label 12 is out of range"):
        validate_for_dataset(read_local_arrays(tmp_path / "labels"), "digits")


def test_node_with_a_data_path_trains_on_its_own_examples(tmp_path):
    # Prepare
    digits_npz(tmp_path, n=300)
    config = RunConfig(local_test_fraction=0.2)

    # Execute
    data = load_node_data(config, {"data-path": str(tmp_path)})
    again = load_node_data(config, {"data-path": str(tmp_path), "partition-id": 4})

    # Assert
    assert (len(data.train), len(data.test)) == (240, 60)
    assert data.partition_id == -1 and again.partition_id == 4
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert abs(float(data.train.x.mean())) < 0.5  # normalised like the rest of the federation


def test_changed_data_file_is_read_again(tmp_path):
    digits_npz(tmp_path, n=100)
    config = RunConfig()
    first, _, _ = load_local_splits(config, str(tmp_path), 0)
    digits_npz(tmp_path, n=50)
    os.utime(tmp_path / "data.npz", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second, _, _ = load_local_splits(config, str(tmp_path), 0)
    assert (len(first), len(second)) == (80, 40)


def test_digits_normalisation_matches_the_federated_dataset():
    # Prepare: the raw pixels of the training split that task.datasets standardises
    seed = 3
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, _, _, _ = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )

    # Execute
    mean, std = normalisation("digits", seed)

    # Assert
    expected = load_digits_splits(seed).train.x.numpy()
    np.testing.assert_allclose((x_train - mean[0]) / std[0], expected, atol=1e-5)


# ------------------------------------------------------------- node config
def test_node_config_round_trips_through_flowers_parser(tmp_path):
    folder = tmp_path / "my site"
    config = build_node_config(folder, None, None, 'extra="x y" n=3')
    parsed = parse_config_args([config])
    assert parsed == {"data-path": str(folder.resolve()), "extra": "x y", "n": 3}
    assert parse_config_args([build_node_config(None, 1, 3)]) == {
        "partition-id": 1,
        "num-partitions": 3,
    }


def test_node_config_needs_data(tmp_path):
    with pytest.raises(DeployError, match="--data-path DIR"):
        build_node_config(None, None, None)
    with pytest.raises(DeployError, match="give both"):
        build_node_config(None, 1, None)


def test_flower_command_uses_process_isolation_tls_and_the_key(tmp_path):
    settings = NodeSettings(
        superlink="10.213.7.1:8000",
        ca_cert=tmp_path / "ca.crt",
        auth_key=tmp_path / "key",
        node_config="partition-id=0 num-partitions=2",
        port=9101,
        flwr_home=tmp_path,
    )
    command = flower_command(settings)
    flower = command[command.index("--") + 1 :]
    assert flower[flower.index("--isolation") + 1] == "process"
    assert flower[flower.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert flower[flower.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    assert "--insecure" not in flower


def test_online_marker_gives_the_rejoin_deadline(tmp_path):
    marker = OnlineMarker(tmp_path / "m.json", heartbeat_interval_s=10.0)
    assert marker.rejoin_deadline() is None
    marker.write("123")
    deadline = marker.rejoin_deadline()
    assert deadline is not None and 20 < deadline - time.time() <= 25.5
    marker.clear()
    assert marker.rejoin_deadline() is None


def test_tuned_flower_supernode_caps_the_idle_sleep(monkeypatch):
    # Prepare: remember Flower's attributes so the test leaves them as they were
    loop = flower_supernode._module("flwr.supernode.start_client_internal")
    connection = flower_supernode._module("flwr.supernode.fleet_http_connection")
    heartbeat = flower_supernode._module("flwr.supercore.heartbeat")
    for module, name in (
        (loop, "time"),
        (loop, "pull_objects"),
        (connection, "HEARTBEAT_DEFAULT_INTERVAL"),
        (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))

    # Execute
    flower_supernode.tune_flower(poll_interval_s=0.05, heartbeat_interval_s=12)

    # Assert
    started = time.perf_counter()
    loop.time.sleep(3)
    assert time.perf_counter() - started < 1
    assert loop.time.monotonic() > 0  # the rest of the time module is untouched
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == 12 == heartbeat.HEARTBEAT_DEFAULT_INTERVAL
    with pytest.raises(ValueError, match="10, 1800"):
        flower_supernode.tune_flower(0.1, heartbeat_interval_s=5)


# ---------------------------------------------------------------- connection
def test_connection_is_written_for_flwr_and_keeps_others(tmp_path, pki, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    # Prepare
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "old"\n\n[superlink.old]\naddress = "h:1"\ninsecure = true\n'
    )
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))

    # Execute
    write_connection(tmp_path, "fedcoord", "10.213.7.1:8000", pki.ca_cert)

    # Assert: Flower reads both; ours is the default
    ours = read_superlink_connection(None)
    old = read_superlink_connection("old")
    assert ours.name == "fedcoord" and ours.address == "10.213.7.1:8000"
    assert ours.root_certificates == str(pki.ca_cert.resolve()) and not ours.insecure
    assert old.address == "h:1" and old.insecure


# ------------------------------------------------------------------- worker
class FakeRuntime:
    """Stands in for the SuperNode's Runtime API client in heartbeat tests."""

    def __init__(self, outcomes: list[object]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def SendTaskHeartbeat(self, request: object) -> object:  # noqa: N802 - Flower's name
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def http_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/x")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status))


def test_task_heartbeats_never_signal_the_long_lived_worker():
    from types import SimpleNamespace

    from deploy.worker import task_heartbeat_fn

    # Prepare: ok, a 503 (retry), then a task the SuperNode no longer knows
    client = FakeRuntime(
        [SimpleNamespace(success=True), http_error(503), SimpleNamespace(success=False)]
    )
    heartbeat = task_heartbeat_fn(client)  # type: ignore[arg-type]

    # Execute / Assert: the unknown task is given up quietly, without SIGINT
    assert heartbeat() is True
    assert heartbeat() is False
    assert heartbeat() is True
    assert heartbeat() is True and client.calls == 3


def test_worker_retries_5xx_and_gives_up_on_4xx():
    from deploy.worker import _runtime_retry_invoker

    invoker = _runtime_retry_invoker(max_time_s=5.0)
    outcomes: list[object] = [http_error(503), "ok"]

    def call() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert invoker.invoke(call) == "ok"
    outcomes[:] = [http_error(404), "never"]
    with pytest.raises(httpx.HTTPStatusError):
        invoker.invoke(call)


def test_worker_runs_a_new_app_build_cold_then_restarts(monkeypatch):
    from deploy.apps import AppAllowList
    from deploy.worker import ClientAppWorker

    # Prepare: both builds allowed
    allowed = AppAllowList(frozenset({"a" * 64, "b" * 64}))
    worker = ClientAppWorker("127.0.0.1:1", allowed=allowed, loaded_fab_hash="a" * 64)
    calls: list[str] = []
    monkeypatch.setattr(worker, "run_cold", lambda token: calls.append(f"cold {token}"))
    monkeypatch.setattr(worker, "restart", lambda: calls.append("restart"))
    monkeypatch.setattr(worker, "run_warm", lambda token, _hash: calls.append(f"warm {token}"))

    # Execute
    worker.run_task("t1", "a" * 64)
    worker.run_task("t2", "b" * 64)

    # Assert
    assert calls == ["warm t1", "cold t2", "restart"]


# ---------------------------------------------------------------- superlink
def test_superlink_command_has_tls_auth_and_a_database(pki, tmp_path):
    from deploy.superlink import SuperLinkSettings, check_superlink, superlink_command

    # Prepare
    settings = SuperLinkSettings(
        certs_dir=pki.ca_cert.parent,
        state_dir=tmp_path / "state",
        flwr_home=tmp_path / "home",
        addresses=("10.213.7.1",),
    )

    # Execute
    command = superlink_command(settings)
    in_memory = superlink_command(SuperLinkSettings(**{**vars(settings), "in_memory": True}))

    # Assert
    assert command[command.index("--database") + 1] == str(tmp_path / "state" / "state.db")
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert command[command.index("--ssl-certfile") + 1] == str(pki.server_cert.resolve())
    assert "--database" not in in_memory
    assert any("valid for" in line for line in check_superlink(settings))


def test_superlink_refuses_missing_certificates_and_auth_without_tls(tmp_path):
    from deploy.superlink import SuperLinkSettings, check_superlink

    with pytest.raises(DeployError, match="python -m deploy certs"):
        check_superlink(SuperLinkSettings(tmp_path, tmp_path / "s", tmp_path / "h"))
    with pytest.raises(DeployError, match="needs TLS"):
        check_superlink(SuperLinkSettings(None, tmp_path / "s", tmp_path / "h"))
    pki = create_certificates(tmp_path / "c", ["10.213.7.1"])
    settings = SuperLinkSettings(
        pki.ca_cert.parent, tmp_path / "s", tmp_path / "h", addresses=("10.213.7.9",)
    )
    with pytest.raises(CertificateError, match="10.213.7.9"):
        check_superlink(settings)
