"""The web dashboard over HTTP (Starlette TestClient) on run directories the tests write."""

import json
import math
import sqlite3
import time
from pathlib import Path

import pytest

from server.record.store import RoundRecord, RunStore
from server.ui import cli
from server.ui.dashboard import DashboardSettings, create_app, dashboard_settings, startup_lines
from server.ui.dashboard.charts import nice_ticks, render_chart
from server.ui.dashboard.security import LOOPBACK_NAMES, host_name, is_loopback
from server.ui.dashboard.views import RunNameError, validate_run_name
from tests.helpers import ACTION, LOCAL, TestClient, local_client, make_run


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "live")
    make_run(runs, "done", state="completed", rounds=range(6))
    return runs


# ------------------------------------------------------------------ reads
def test_runs_list_has_state_round_best_accuracy_and_age(runs_dir):
    # Execute
    response = local_client(runs_dir).get("/api/runs")

    # Assert
    assert response.status_code == 200
    data = response.json()
    assert data["runs_dir"] == str(runs_dir)
    runs = {run["run_name"]: run for run in data["runs"]}
    assert [run["run_name"] for run in data["runs"]] == ["done", "live"]  # newest first
    assert runs["live"]["state"] == "running" and runs["live"]["current_round"] == 2
    assert runs["live"]["num_rounds"] == 5 and runs["live"]["best_accuracy"] == pytest.approx(0.6)
    assert runs["done"]["state"] == "completed" and runs["done"]["age_s"] >= 0


def test_run_detail_has_rounds_nodes_rejection_reasons_and_events(runs_dir):
    # Execute
    detail = local_client(runs_dir).get("/api/runs/live").json()

    # Assert
    assert detail["status"]["run_name"] == "live" and detail["status"]["state"] == "running"
    assert [r["round"] for r in detail["rounds"]] == [0, 1, 2]
    assert detail["config"] == {"strategy": "fedavg", "seed": 1}
    assert {n["node_id"] for n in detail["nodes"]} == {"11", "12"}
    assert detail["rejections"][0]["reason"] == "array 'w' contains NaN"
    assert detail["rejections"][0]["round"] == 1
    assert detail["events"][-1]["message"] == "run started"
    assert detail["pending_commands"] == []


def test_nan_metrics_are_sent_as_null(tmp_path):
    # Prepare
    store = make_run(tmp_path, "nan", rounds=range(1))
    store.record_round(
        RoundRecord(1, 0.0, 1.0, 3, 3, 0, 0, True, {"central-loss": math.nan}, model_hash="h")
    )

    # Execute
    response = local_client(tmp_path).get("/api/runs/nan")

    # Assert
    assert response.status_code == 200
    assert response.json()["rounds"][1]["central_loss"] is None


def test_pages_and_static_files_are_served(runs_dir):
    # Prepare
    client = local_client(runs_dir)

    # Execute / Assert
    assert 'data-page="runs"' in client.get("/").text
    assert 'data-page="run"' in client.get("/runs/live").text
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/static/dashboard.css").status_code == 200
    missing = client.get("/runs/nope")
    assert missing.status_code == 404 and "no run" in missing.text


@pytest.mark.parametrize("chart", ["accuracy", "loss", "clients"])
def test_charts_are_svg_with_labelled_axes(runs_dir, chart):
    # Execute
    response = local_client(runs_dir).get(f"/api/runs/done/charts/{chart}.svg")

    # Assert
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.text.startswith("<svg") and ">round</text>" in response.text
    assert "<script" not in response.text


def test_unknown_chart_is_404(runs_dir):
    assert local_client(runs_dir).get("/api/runs/done/charts/secret.svg").status_code == 404


def test_chart_of_a_run_without_rounds_says_so():
    # Execute
    svg = render_chart("accuracy", [], num_rounds=10)

    # Assert
    assert "no rounds yet" in svg and ">accuracy</text>" in svg


def test_nice_ticks_cover_the_range_at_round_steps():
    assert nice_ticks(1.0, 6) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(40, 8, integer=True) == [0, 10, 20, 30, 40]
    assert nice_ticks(3, 5, integer=True) == [0, 1, 2, 3]


def test_stream_of_a_finished_run_sends_one_snapshot_and_ends(runs_dir):
    # Execute
    response = local_client(runs_dir).get("/api/runs/done/stream")

    # Assert
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block.startswith("event: run")]
    assert len(events) == 1
    snapshot = json.loads(events[0].split("data: ", 1)[1])
    assert snapshot["status"]["state"] == "completed" and len(snapshot["rounds"]) == 6


def test_stream_of_a_live_run_follows_it_until_its_time_is_up(runs_dir):
    # Prepare
    client = local_client(
        runs_dir, stream_interval_s=0.05, stream_keepalive_s=0.1, stream_max_s=0.5
    )

    # Execute
    response = client.get("/api/runs/live/stream")

    # Assert: snapshots at least every keepalive while the run is live
    events = [block for block in response.text.split("\n\n") if block.startswith("event: run")]
    assert len(events) >= 2
    assert json.loads(events[-1].split("data: ", 1)[1])["status"]["state"] == "running"


def test_compare_answers_the_table_and_both_charts(runs_dir):
    # Prepare
    client = local_client(runs_dir)
    query = [("run", "live"), ("run", "done"), ("target", "0.5")]

    # Execute
    data = client.get("/api/compare", params=query).json()
    charts = {
        axis: client.get(f"/api/compare/{axis}.svg", params=query) for axis in ("round", "time")
    }

    # Assert: the table of `fedcoord compare --json`; one line a run in each chart
    assert [run["run_name"] for run in data["runs"]] == ["live", "done"]
    live = data["runs"][0]
    assert (live["target_round"], live["target_time_s"], live["rejected"]) == (2, 6.0, 3)
    assert live["final_accuracy"] == pytest.approx(0.6) and data["target"] == 0.5
    for axis, x_label in (("round", ">round</text>"), ("time", ">seconds in rounds</text>")):
        svg = charts[axis].text
        assert charts[axis].headers["content-type"].startswith("image/svg+xml")
        assert x_label in svg and ">live</text>" in svg and ">done</text>" in svg
        assert svg.count("<polyline") == 2 and "<script" not in svg


def test_compare_of_impossible_numbers_answers_200_not_500(runs_dir):
    # Prepare: rows that pass the schema check: an infinite round duration, and
    # accuracies of 1e308 in two runs that differ only in seed (summed over seeds)
    for name, change in (
        ("endless", "duration_s = 1e999"),
        ("big", "central_accuracy = 1e308"),
        ("huge", "duration_s = 1.7e308"),
    ):
        make_run(runs_dir, name).close()
        with sqlite3.connect(runs_dir / name / "run.db") as db:
            db.execute(f"UPDATE rounds SET {change}")  # noqa: S608 (fixed text)
    client = local_client(runs_dir)
    query = [("run", "endless"), ("run", "big"), ("run", "huge"), ("run", "done")]

    # Execute
    responses = [client.get(path, params=query) for path in ("/api/compare", *SVG_PATHS)]

    # Assert
    assert [response.status_code for response in responses] == [200, 200, 200]
    endless, big, huge, _ = responses[0].json()["runs"]
    assert endless["wall_time_s"] is None and huge["wall_time_s"] is None
    assert big["final_accuracy"] is None and "inf" not in responses[2].text


def test_nice_ticks_of_infinite_or_huge_ranges_do_not_overflow():
    assert nice_ticks(math.inf, 6) == nice_ticks(1.0, 6)
    assert all(math.isfinite(tick) for tick in nice_ticks(1.7e308, 6))


SVG_PATHS = ("/api/compare/round.svg", "/api/compare/time.svg")


@pytest.mark.parametrize(
    ("path", "query", "status", "error"),
    [
        ("/api/compare", [("run", "live")], 400, "compare needs at least two runs"),
        ("/api/compare", [("run", "live"), ("run", "live")], 400, "'live' is named twice"),
        ("/api/compare", [("run", "live"), ("run", "../done")], 400, "invalid run name"),
        ("/api/compare", [("run", "live"), ("run", "nope")], 404, "no run 'nope'"),
        ("/api/compare", [("run", "live"), ("run", "broken")], 409, "run 'broken' is unreadable"),
        ("/api/compare", [("run", "live"), ("run", "done"), ("target", "2")], 400, "in [0, 1]"),
        ("/api/compare", [("run", "live"), ("run", "done"), ("target", "x")], 400, "got 'x'"),
        ("/api/compare/loss.svg", [("run", "live"), ("run", "done")], 404, "unknown chart"),
        ("/api/compare/time.svg", [("run", "live")], 400, "compare needs at least two runs"),
    ],
)
def test_compare_refuses_bad_input_with_a_json_error(runs_dir, path, query, status, error):
    # Prepare: a run whose run.db is random bytes
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.db").write_bytes(b"\x13 not a database " * 300)

    # Execute
    response = local_client(runs_dir).get(path, params=query)

    # Assert
    assert response.status_code == status and error in response.json()["error"]


# ---------------------------------------------------------------- actions
def test_pause_queues_the_command_and_says_what_happens(runs_dir):
    # Execute
    response = local_client(runs_dir).post("/api/runs/live/pause", headers=ACTION)

    # Assert
    assert response.status_code == 202
    assert "pause queued for live" in response.json()["message"]
    store = RunStore(runs_dir / "live")
    assert [c["command"] for c in store.pending_commands()] == ["pause"]
    detail = local_client(runs_dir).get("/api/runs/live").json()
    assert [c["command"] for c in detail["pending_commands"]] == ["pause"]


@pytest.mark.parametrize(
    ("run", "command", "message"),
    [
        ("done", "pause", "cannot pause a run that is completed"),
        ("done", "resume", "cannot resume a run that is completed"),
        ("live", "resume", "cannot resume a run that is running"),
    ],
)
def test_invalid_transition_is_409_with_the_reason_and_queues_nothing(
    runs_dir, run, command, message
):
    # Execute
    response = local_client(runs_dir).post(f"/api/runs/{run}/{command}", headers=ACTION)

    # Assert
    assert response.status_code == 409
    assert message in response.json()["error"]
    assert RunStore(runs_dir / run).pending_commands() == []


def test_stale_heartbeat_refuses_commands(runs_dir):
    # Prepare
    RunStore(runs_dir / "live").update_run(heartbeat_at=time.time() - 60)

    # Execute
    response = local_client(runs_dir).post("/api/runs/live/stop", headers=ACTION)

    # Assert
    assert response.status_code == 409
    assert "cannot stop a run that is interrupted" in response.json()["error"]


def test_unknown_action_is_404(runs_dir):
    response = local_client(runs_dir).post("/api/runs/live/explode", headers=ACTION)
    assert response.status_code == 404
    assert RunStore(runs_dir / "live").pending_commands() == []


def test_weight_is_validated_and_queued(runs_dir):
    # Prepare
    client = local_client(runs_dir)

    # Execute
    ok = client.post("/api/runs/live/weight", headers=ACTION, json={"partition": 0, "weight": 2.5})
    negative = client.post(
        "/api/runs/live/weight", headers=ACTION, json={"partition": 0, "weight": -1}
    )
    wrong_type = client.post("/api/runs/live/weight", headers=ACTION, json={"partition": "0"})
    not_json = client.post("/api/runs/live/weight", headers=ACTION, content=b"partition=0")
    finished = client.post(
        "/api/runs/done/weight", headers=ACTION, json={"partition": 0, "weight": 1}
    )

    # Assert
    assert ok.status_code == 202 and "partition 0 weight 2.5 queued" in ok.json()["message"]
    assert (
        negative.status_code == 409 and "weight must be finite and >= 0" in negative.json()["error"]
    )
    assert wrong_type.status_code == 400 and not_json.status_code == 400
    assert finished.status_code == 409 and "completed" in finished.json()["error"]
    commands = RunStore(runs_dir / "live").pending_commands()
    assert [(c["command"], c["argument"]) for c in commands] == [("weight", "0=2.5")]


def test_unknown_run_is_404(runs_dir):
    # Prepare
    client = local_client(runs_dir)

    # Execute
    read = client.get("/api/runs/nope")
    act = client.post("/api/runs/nope/pause", headers=ACTION)

    # Assert
    assert read.status_code == 404 and "no run 'nope'" in read.json()["error"]
    assert act.status_code == 404


# --------------------------------------------------------------- security
@pytest.fixture()
def outside(tmp_path: Path, runs_dir: Path) -> RunStore:
    """A run beside the runs directory and a link to it from inside: neither reachable."""
    store = make_run(tmp_path, "outside-secret")
    (runs_dir / "link").symlink_to(tmp_path / "outside-secret")
    return store


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/%2e%2e",
        "/api/runs/%2E%2E",
        "/api/runs/..%2Foutside-secret",
        "/api/runs/%2e%2e%2foutside-secret",
        "/api/runs/%2Ftmp",
        "/api/runs/%2e%2e%5coutside-secret",
        "/api/runs/link",
        "/api/runs/%2e%2e/charts/accuracy.svg",
        "/api/runs/link/stream",
        "/runs/%2e%2e",
        "/runs/link",
    ],
)
def test_traversal_and_links_out_of_the_runs_directory_are_refused(runs_dir, outside, path):
    # Execute
    response = local_client(runs_dir).get(path)

    # Assert: refused (405: a name with an encoded '/' can only fall on a POST route)
    assert response.status_code in (400, 404, 405)
    assert "outside-secret" not in response.text.replace("outside-secret'", "")
    assert '"status"' not in response.text


@pytest.mark.parametrize(
    "path", ["/api/runs/%2e%2e/pause", "/api/runs/link/stop", "/api/runs/..%2Foutside-secret/stop"]
)
def test_traversal_cannot_queue_commands(runs_dir, outside, path):
    # Execute
    response = local_client(runs_dir).post(path, headers=ACTION)

    # Assert
    assert response.status_code in (400, 404)
    assert outside.pending_commands() == []


def test_runs_list_leaves_out_links(runs_dir, outside):
    names = [run["run_name"] for run in local_client(runs_dir).get("/api/runs").json()["runs"]]
    assert sorted(names) == ["done", "live"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b", "x..y", "/etc", "a\x00b"])
def test_run_names_must_be_plain_folder_names(name):
    with pytest.raises(RunNameError):
        validate_run_name(name)


def test_cross_site_posts_are_refused(runs_dir):
    # Prepare
    client = local_client(runs_dir)

    # Execute: a plain form post, a foreign Origin, a cross-site fetch
    bare = client.post("/api/runs/live/pause")
    foreign = client.post(
        "/api/runs/live/pause", headers={**ACTION, "Origin": "https://evil.example"}
    )
    cross = client.post("/api/runs/live/pause", headers={**ACTION, "Sec-Fetch-Site": "cross-site"})
    same = client.post(
        "/api/runs/live/pause",
        headers={**ACTION, "Origin": LOCAL, "Sec-Fetch-Site": "same-origin"},
    )

    # Assert
    for refused in (bare, foreign, cross):
        assert refused.status_code == 403
        assert "cross-site request refused" in refused.json()["error"]
    assert same.status_code == 202
    assert [c["command"] for c in RunStore(runs_dir / "live").pending_commands()] == ["pause"]


def test_loopback_binding_answers_loopback_host_names_only(runs_dir):
    # Prepare: a DNS-rebinding page would send its own host name
    client = local_client(runs_dir)

    # Execute
    rebound = client.get("/api/runs", headers={"Host": "evil.example:8765"})
    local = client.get("/api/runs", headers={"Host": "localhost:8765"})

    # Assert
    assert rebound.status_code == 400 and local.status_code == 200


def test_responses_carry_security_headers(runs_dir):
    response = local_client(runs_dir).get("/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def token_client(runs_dir: Path, **client_options: object) -> TestClient:
    """A client of the dashboard bound to a network address: a token is needed."""
    settings = DashboardSettings(runs_dir, token="s3cret-token", login_code="one-time-code")
    return TestClient(create_app(settings), base_url="http://192.0.2.10:8765", **client_options)


@pytest.mark.parametrize(
    "path",
    ["/api/runs", "/api/runs/live", "/api/runs/done/stream", "/api/runs/live/charts/loss.svg"],
)
def test_token_is_required_for_the_data(runs_dir, path):
    # Prepare
    client = token_client(runs_dir)

    # Execute
    missing = client.get(path)
    wrong = client.get(path, headers={"X-Fedcoord-Token": "guess"})
    wrong_cookie = token_client(runs_dir, cookies={"fedcoord_token": "guess"}).get(path)
    right = client.get(path, headers={"X-Fedcoord-Token": "s3cret-token"})
    bearer = client.get(path, headers={"Authorization": "Bearer s3cret-token"})

    # Assert
    assert missing.status_code == wrong.status_code == wrong_cookie.status_code == 401
    assert "token" in missing.json()["error"]
    assert right.status_code == bearer.status_code == 200


def test_token_is_required_for_pages_but_not_static_files(runs_dir):
    # Prepare
    client = token_client(runs_dir)

    # Execute / Assert
    page = client.get("/")
    assert page.status_code == 401 and "login link" in page.text
    assert client.get("/runs/live").status_code == 401
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/%2e%2e/static/run.html").status_code == 401
    assert client.get("/loginx").status_code == 401


def test_token_is_required_for_actions(runs_dir):
    # Prepare
    client = token_client(runs_dir)

    # Execute
    missing = client.post("/api/runs/live/pause", headers=ACTION)
    wrong = client.post("/api/runs/live/pause", headers={**ACTION, "X-Fedcoord-Token": "guess"})
    no_csrf_header = client.post(
        "/api/runs/live/pause", headers={"X-Fedcoord-Token": "s3cret-token"}
    )
    right = client.post(
        "/api/runs/live/pause", headers={**ACTION, "X-Fedcoord-Token": "s3cret-token"}
    )

    # Assert: the token alone does not make a cross-site post acceptable
    assert missing.status_code == wrong.status_code == 401
    assert no_csrf_header.status_code == 403
    assert right.status_code == 202
    assert [c["command"] for c in RunStore(runs_dir / "live").pending_commands()] == ["pause"]


def test_one_time_login_link_sets_the_cookie_once(runs_dir):
    # Prepare
    client = token_client(runs_dir)

    # Execute
    wrong = client.get("/login?code=guess", follow_redirects=False)
    first = client.get("/login?code=one-time-code", follow_redirects=False)
    with_cookie = client.get("/api/runs")
    signed_in_again = client.get("/login?code=one-time-code", follow_redirects=False)
    again = TestClient(client.app, base_url="http://192.0.2.10:8765").get(
        "/login?code=one-time-code", follow_redirects=False
    )

    # Assert
    assert wrong.status_code == 403
    assert first.status_code == 303 and first.headers["location"] == "/"
    cookie = first.headers["set-cookie"]
    assert "fedcoord_token=s3cret-token" in cookie and "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower()
    assert with_cookie.status_code == 200
    assert signed_in_again.status_code == 303  # already signed in: no error
    assert again.status_code == 403


def test_settings_need_a_token_off_loopback_only(tmp_path):
    # Execute
    local = dashboard_settings(tmp_path, "127.0.0.1")
    exposed = dashboard_settings(tmp_path, "0.0.0.0")
    lines = startup_lines(exposed, "0.0.0.0", 9000)

    # Assert
    assert local.token is None and local.allowed_hosts == LOOPBACK_NAMES
    assert exposed.token and len(exposed.token) >= 40 and exposed.allowed_hosts is None
    assert any(f"/login?code={exposed.login_code}" in line for line in lines)
    assert any(exposed.token in line for line in lines)
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")
    assert host_name("[::1]:8765") == "::1" and host_name("localhost:1") == "localhost"


def test_cli_accepts_runs_dir_before_or_after_the_subcommand():
    # Execute
    before = cli.build_parser().parse_args(["--runs-dir", "/a", "dashboard"])
    after = cli.build_parser().parse_args(["dashboard", "--runs-dir", "/b", "--port", "9000"])

    # Assert
    assert before.runs_dir == "/a" and before.host == "127.0.0.1" and before.port == 8765
    assert after.runs_dir == "/b" and after.port == 9000 and after.func is cli.cmd_dashboard
