"""Values an edited run.db can hold that no run records: every verb reads them as missing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

from tests.helpers import APP_DIR, make_run, make_run_reaching

HUGE = "9" * 400  # a JSON integer no float holds


def test_a_400_digit_metric_reads_as_missing_in_every_verb(tmp_path):
    # Prepare: a noisy run whose round 2 holds a 400-digit epsilon and train-loss
    make_run(
        tmp_path, "big", config={"strategy": "clipped", "noise-multiplier": 1.0}, state="completed"
    ).close()
    make_run_reaching(tmp_path, "other", [0.1, 0.5])
    with sqlite3.connect(tmp_path / "big" / "run.db") as db:
        metrics = f'{{"epsilon": {HUGE}, "train-loss": {HUGE}}}'
        db.execute("UPDATE rounds SET metrics_json = ? WHERE round = 2", (metrics,))

    # Execute
    results = {
        verb[0] + ("-json" if "--json" in verb else ""): subprocess.run(
            [sys.executable, "-m", "server.ui.cli", "--runs-dir", str(tmp_path), *verb],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=APP_DIR,
            check=False,
        )
        for verb in (
            ["runs"],
            ["status", "big"],
            ["status", "big", "--json"],
            ["compare", "big", "other"],
            ["export", "big", "--format", "tensorboard", "-o", str(tmp_path / "tb")],
        )
    }

    # Assert: no traceback anywhere; runs lists both; the export leaves the value out
    for name, result in results.items():
        assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr, name
        assert result.returncode in (0, 1, 2), name
    assert results["runs"].returncode == 0 and "other" in results["runs"].stdout
    assert results["status"].returncode == 0 and "Traceback" not in results["status"].stdout
    assert results["status-json"].returncode == 0


def test_a_refused_tracking_uri_never_shows_its_password():
    import pytest

    from task.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError) as refused:
        parse_run_config({"tracking-uri": "https://ann:s3cret@mlflow.example:0"})
    assert "s3cret" not in str(refused.value) and "mlflow.example" in str(refused.value)


def test_home_cannot_be_named_as_a_tracking_store_by_another_spelling(tmp_path, monkeypatch):
    import pytest

    from task.config import ConfigError, parse_run_config

    # Prepare: a home folder, and a link to it
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "link").symlink_to(home)
    monkeypatch.setenv("HOME", str(home))

    # Execute / Assert: //HOME, file:////HOME and a link to HOME are HOME
    for uri in (f"/{home}", f"file:///{home}", str(tmp_path / "link"), "//", "file:////"):
        with pytest.raises(ConfigError, match="which MLflow would fill"):
            parse_run_config({"tracking-uri": uri})


def test_a_folder_that_is_not_the_app_is_one_line_and_exit_2(tmp_path):
    # Prepare: a pyproject.toml without Flower's tables
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')

    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "server.launch.simulation", "--app", str(tmp_path)]
        + ["--flwr-home", str(tmp_path / "fh")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=APP_DIR,
        check=False,
    )

    # Assert
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a Flower app" in lines[0]
    assert not (tmp_path / "fh").exists()


def test_links_inside_a_run_folder_are_refused_and_never_written_through(tmp_path):
    import pytest

    from server.app import open_resumed_run
    from server.record.checkpoints import CheckpointError, save_checkpoint
    from server.record.entries import find_run_entries_problem, open_append_no_follow
    from task.config import ConfigError, parse_run_config

    # Prepare: a stopped run whose checkpoints folder and log are links to outside files
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    make_run(runs, "r", state="stopped").close()
    run_dir = runs / "r"
    (run_dir / "flwr-run.log").symlink_to(outside / "victim.txt")
    if (run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").symlink_to(outside)
    config = parse_run_config({"runs-dir": str(runs), "run-name": "r", "resume": True})

    # Execute / Assert: each way in is refused; nothing outside changes
    assert "is a link" in str(find_run_entries_problem(run_dir))
    with pytest.raises(ConfigError, match="is a link"):
        open_resumed_run(config)
    with pytest.raises(CheckpointError, match="is a link"):
        save_checkpoint(run_dir, 3, {}, {}, {})
    with pytest.raises(OSError):
        open_append_no_follow(run_dir / "flwr-run.log")
    assert (outside / "victim.txt").read_text() == "precious\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
