"""A corrupt, foreign or half-written run.db on the dashboard: unreadable, never a 500.

Every page and endpoint is asked about each kind of damage over HTTP (Starlette
TestClient, server errors returned as responses instead of raised), and every JSON
it serves is parsed strictly (no NaN, no Infinity).
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.record.store import DB_NAME, RoundRecord
from server.ui.dashboard import DashboardSettings, create_app
from server.ui.dashboard.security import LOOPBACK_NAMES
from tests.helpers import ACTION, LOCAL, TestClient, checkpointed_copy, execute, make_run, write_db


def edit_run(run_dir: Path, script: str) -> None:
    """A good run whose rows are then edited with ``script``."""
    make_run(run_dir.parent, run_dir.name).close()
    execute(run_dir, script)


META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"


def version(value: str) -> str:
    """A script making a meta table that holds only ``schema_version`` = ``value``."""
    return f"{META} INSERT INTO meta VALUES ('schema_version', {value});"


# Damage that leaves nothing to show: the run is unreadable everywhere.
DAMAGE: dict[str, Callable[[Path, bytes], None]] = {
    "empty": lambda d, good: write_db(d, b""),
    "random": lambda d, good: write_db(d, os.urandom(8192)),
    "truncated": lambda d, good: write_db(d, good[:3000]),
    "header-only": lambda d, good: write_db(d, good[:100]),
    "foreign-schema": lambda d, good: execute(d, "CREATE TABLE t (x); INSERT INTO t VALUES (1);"),
    "no-version": lambda d, good: execute(d, META),
    "other-version": lambda d, good: execute(d, version("'9'")),
    "text-version": lambda d, good: execute(d, version("'x'")),
    "half-filled": lambda d, good: execute(d, version("'1'")),
    "no-run-row": lambda d, good: edit_run(d, "DELETE FROM run;"),
    "text-rounds-count": lambda d, good: edit_run(d, "UPDATE run SET num_rounds = 'many';"),
}
# Damage to one part: what can be read is shown, the rest is unreadable.
PARTIAL_DAMAGE = {
    "text-created-at": "UPDATE run SET created_at = 'yesterday';",
    "dropped-column": "ALTER TABLE rounds DROP COLUMN note;",
    "dropped-table": "DROP TABLE rejections;",
    "dropped-nodes": "DROP TABLE nodes;",
}
READS = [
    "/runs/{}",
    "/api/runs/{}",
    "/api/runs/{}/charts/accuracy.svg",
    "/api/runs/{}/charts/clients.svg",
]
ACTIONS = ["pause", "resume", "stop"]


def strict_json(text: str) -> object:
    """Parse ``text`` refusing NaN and infinities, as a strict JSON reader does."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in served JSON")

    return json.loads(text, parse_constant=refuse)


def client_of(runs_dir: Path) -> TestClient:
    """A loopback dashboard whose server errors come back as 500 responses."""
    settings = DashboardSettings(
        runs_dir, allowed_hosts=LOOPBACK_NAMES, stream_interval_s=0.05, stream_max_s=5.0
    )
    return TestClient(create_app(settings), base_url=LOCAL, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory per kind of damage, made once for the module."""
    runs = tmp_path_factory.mktemp("damaged") / "runs"
    good = checkpointed_copy(tmp_path_factory.mktemp("source"))
    for name, damage in DAMAGE.items():
        damage(runs / name, good)
    return runs


@pytest.fixture()
def runs_dir(tmp_path: Path, damaged_runs: Path) -> Path:
    """A good live run beside a copy of each damaged run (a test may write to its copy)."""
    runs = tmp_path / "runs"
    shutil.copytree(damaged_runs, runs, symlinks=True)
    make_run(runs, "good")
    return runs


def test_runs_list_shows_each_damaged_run_as_unreadable_and_goes_on(runs_dir):
    # Execute
    response = client_of(runs_dir).get("/api/runs")

    # Assert
    assert response.status_code == 200
    runs = {run["run_name"]: run for run in strict_json(response.text)["runs"]}
    assert runs["good"]["state"] == "running" and runs["good"]["current_round"] == 2
    for name in DAMAGE:
        assert runs[name]["state"] == "unreadable", name
        message = runs[name]["message"]
        assert message.startswith(f"run '{name}' is unreadable: ") and "\n" not in message
        assert message.count("unreadable") == 1, message
    assert [run["run_name"] for run in strict_json(response.text)["runs"]][0] == "good"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("path", READS)
def test_pages_data_and_charts_of_a_damaged_run_answer_409_with_the_reason(runs_dir, damage, path):
    # Execute
    response = client_of(runs_dir).get(path.format(damage))

    # Assert
    assert response.status_code == 409, response.text
    assert f"run '{damage}' is unreadable: " in response.text
    if path.startswith("/api/"):
        assert strict_json(response.text)["state"] == "unreadable"
    else:
        assert "<h1>Unreadable run</h1>" in response.text


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_actions_on_a_damaged_run_answer_409_unreadable(runs_dir, damage):
    # Prepare
    client = client_of(runs_dir)

    # Execute
    responses = [client.post(f"/api/runs/{damage}/{action}", headers=ACTION) for action in ACTIONS]
    responses.append(
        client.post(
            f"/api/runs/{damage}/weight", headers=ACTION, json={"partition": 0, "weight": 1.0}
        )
    )

    # Assert
    for response in responses:
        assert response.status_code == 409, response.text
        assert strict_json(response.text)["state"] == "unreadable"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_stream_of_a_damaged_run_ends_with_one_problem_event(runs_dir, damage):
    # Execute
    response = client_of(runs_dir).get(f"/api/runs/{damage}/stream")

    # Assert: one problem event, and the stream ends (a loop would run for stream_max_s)
    assert response.status_code == 200
    blocks = [block for block in response.text.split("\n\n") if block.startswith("event:")]
    assert len(blocks) == 1 and blocks[0].startswith("event: problem\n")
    problem = strict_json(blocks[0].split("data: ", 1)[1])
    assert problem["state"] == "unreadable"
    assert problem["error"].startswith(f"run '{damage}' is unreadable: ")


@pytest.mark.parametrize("damage", sorted(PARTIAL_DAMAGE))
def test_partly_damaged_run_shows_what_it_can_and_never_gives_a_500(tmp_path, damage):
    # Prepare
    runs = tmp_path / "runs"
    edit_run(runs / "partly", PARTIAL_DAMAGE[damage])
    client = client_of(runs)
    paths = ["/api/runs", *(path.format("partly") for path in READS), "/api/runs/partly/stream"]

    # Execute
    responses = {path: client.get(path) for path in paths}
    actions = [client.post(f"/api/runs/partly/{action}", headers=ACTION) for action in ACTIONS]

    # Assert
    for path, response in responses.items():
        assert response.status_code in (200, 409), (path, response.text)
    for response in actions:
        assert response.status_code in (202, 409), response.text
    listed = strict_json(responses["/api/runs"].text)["runs"]
    assert [run["run_name"] for run in listed] == ["partly"]
    if responses["/api/runs/partly"].status_code == 409:
        assert "is unreadable: " in strict_json(responses["/api/runs/partly"].text)["error"]


def test_reading_a_damaged_run_db_never_changes_it(runs_dir):
    # Prepare
    client = client_of(runs_dir)
    before = {name: digest(runs_dir / name / DB_NAME) for name in DAMAGE}

    # Execute
    client.get("/api/runs")
    for name in DAMAGE:
        for path in [*READS, "/api/runs/{}/stream"]:
            client.get(path.format(name))

    # Assert
    assert {name: digest(runs_dir / name / DB_NAME) for name in DAMAGE} == before


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------- stored values of the wrong kind
ODD_VALUES = {
    "nan-and-inf": "UPDATE rounds SET central_loss = 9e999, train_loss = -9e999, "
    "duration_s = 9e999; UPDATE run SET heartbeat_at = 9e999;",
    "huge-numbers": "UPDATE rounds SET sampled = 9223372036854775807, accepted = "
    "9223372036854775807, round = round + 4000000000000000000, central_accuracy = 1e308; "
    "UPDATE run SET num_rounds = 9223372036854775807, current_round = 9223372036854775806;",
    "negative-counts": "UPDATE rounds SET accepted = -5, rejected = -7, failed = -1, "
    "central_accuracy = -3.5; UPDATE run SET num_rounds = -2;",
    "text-in-numbers": "UPDATE rounds SET central_accuracy = 'high', accepted = 'some', "
    "duration_s = 'long'; UPDATE nodes SET num_examples = 'many', weight = 'heavy';",
    "blobs": "UPDATE rounds SET note = x'00ff', central_loss = x'0102'; "
    "UPDATE events SET message = x'c3'; UPDATE nodes SET device = x'fffe';",
    "nested-config": 'UPDATE run SET config_json = \'{"strategy": '
    + "[" * 5000
    + "]" * 5000
    + ', "seed": {"a": 1}, "dataset": "digits"}\';',
    "not-json-config": "UPDATE run SET config_json = '{not json';",
    "null-state": "UPDATE run SET state = 12, phase = x'00';",
}


@pytest.mark.parametrize("odd", sorted(ODD_VALUES))
def test_odd_stored_values_never_give_a_500_and_json_stays_strict(tmp_path, odd):
    # Prepare
    runs = tmp_path / "runs"
    store = make_run(runs, "odd", state="completed")
    store.record_round(RoundRecord(3, 0.0, 1.0, 3, 3, 0, 0, True, {}, model_hash="h"))
    store.close()
    execute(runs / "odd", ODD_VALUES[odd])
    client = client_of(runs)
    paths = ["/api/runs", *(path.format("odd") for path in READS), "/api/runs/odd/stream"]

    # Execute
    responses = {path: client.get(path) for path in paths}

    # Assert: shown (200) or unreadable (409), JSON strict, never a server error
    for path, response in responses.items():
        assert response.status_code in (200, 409), (path, response.text)
        if response.headers["content-type"].startswith("application/json"):
            strict_json(response.text)
    for block in responses["/api/runs/odd/stream"].text.split("\n\n"):
        if block.startswith("event:"):
            strict_json(block.split("data: ", 1)[1])
