"""`fedcoord compare` on run directories written through the run store (no server needed)."""

import json
import math
import sqlite3
from pathlib import Path

import pytest

from server.record.compare import compare_run_dirs, differing_keys, mean_std, time_to_target
from server.record.compare import round_points as points_of
from server.ui import cli
from tests.helpers import make_run_reaching


def run_cli(capsys, runs_dir: Path, *args: object) -> tuple[int, str, str]:
    code = cli.main(["--runs-dir", str(runs_dir), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    make_run_reaching(runs, "avg", [0.1, 0.5, 0.8, 0.9], duration_s=10.0)
    make_run_reaching(
        runs, "med", [0.1, 0.4, 0.6, 0.7], duration_s=20.0, strategy="median", rejected=1
    )
    return runs


# ------------------------------------------------------------------ numbers
def test_differing_keys_leave_out_names_and_put_strategy_first_and_seed_last():
    # Prepare
    configs = [
        {"strategy": "fedavg", "seed": 1, "lr": 0.1, "run-name": "a", "model": "m"},
        {"strategy": "median", "seed": 2, "lr": 0.1, "run-name": "b", "model": "m"},
        {"strategy": "median", "seed": 2, "lr": 0.2, "run-name": "c", "model": "m"},
    ]

    # Execute / Assert
    assert differing_keys(configs) == ["strategy", "lr", "seed"]
    assert differing_keys(configs[1:2]) == []


def test_time_to_target_is_the_first_round_that_reaches_it_and_the_time_spent_in_rounds():
    # Prepare: rounds of 10 s each, round 0 included
    rows = [
        {"round": r, "duration_s": 10.0, "central_accuracy": a, "rejected": 0, "metrics_json": "{}"}
        for r, a in enumerate([0.1, 0.5, None, 0.9, 0.95])
    ]

    # Execute
    points = points_of(rows)

    # Assert
    assert time_to_target(points, 0.9) == (3, 40.0)
    assert time_to_target(points, 0.5) == (1, 20.0)
    assert time_to_target(points, 0.99) == (None, None)


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([0.8, 0.9, 1.0]) == {
        "mean": pytest.approx(0.9),
        "std": pytest.approx(0.1),
        "n": 3,
    }
    assert mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_mean_std_leaves_out_infinities_and_never_raises_on_overflow():
    assert mean_std([math.inf, 1.0, math.nan]) == {"mean": 1.0, "std": None, "n": 1}
    huge = mean_std([1e308, 1e308, -1e308])  # fsum overflows: missing, not an error
    assert huge["n"] == 3 and huge["mean"] is None or math.isfinite(huge["mean"])


def test_impossible_numbers_are_missing_and_never_a_traceback(tmp_path, capsys):
    # Prepare: rows that pass the schema check but no run can write: accuracies of
    # 1e308 in two seeds, durations summing past float range, an infinite duration
    runs = tmp_path / "runs"
    make_run_reaching(runs, "big-1", [1e308, 1e308], seed=1)
    make_run_reaching(runs, "big-2", [1e308, 1e308], seed=2)
    make_run_reaching(runs, "sums-inf", [0.1, 0.2, 0.3], duration_s=1e308, seed=3)
    make_run_reaching(runs, "inf-wall", [0.1, 0.2], seed=4)
    with sqlite3.connect(runs / "inf-wall" / "run.db") as db:
        db.execute("UPDATE rounds SET duration_s = 1e999")
    names = ["big-1", "big-2", "sums-inf", "inf-wall"]
    png = tmp_path / "compare.png"

    # Execute
    code, out, err = run_cli(capsys, runs, "compare", *names, "--target", "0.2", "-o", png)
    data = compare_run_dirs([runs / name for name in names], target=0.2)

    # Assert: '-' where the number cannot be one; the PNG is written
    assert code == 0 and err == "" and png.read_bytes().startswith(b"\x89PNG")
    assert max(len(line) for line in out.splitlines()) < 160
    big, _, sums, inf = data["runs"]
    assert big["final_accuracy"] is None and big["best_accuracy"] is None
    assert sums["wall_time_s"] is None and sums["target_round"] == 1
    assert sums["target_time_s"] is None and inf["wall_time_s"] is None
    assert inf["curve"]["elapsed_s"] == [None, None]
    assert data["over_seeds"][0]["final_accuracy"]["n"] == 2  # the two finite ones


def test_names_with_bidi_or_zero_width_characters_are_shown_escaped(tmp_path, capsys):
    # Prepare: names the run-name rule allows (existing runs keep them)
    runs = tmp_path / "runs"
    make_run_reaching(runs, "evil\u202egnp.exe", [0.1, 0.9], seed=1)
    make_run_reaching(runs, "a\u200bb", [0.1, 0.5], seed=2)

    # Execute
    code, out, _ = run_cli(capsys, runs, "compare", "evil\u202egnp.exe", "a\u200bb")

    # Assert: the table holds their literals, never the characters themselves
    assert code == 0 and "\u202e" not in out and "\u200b" not in out
    assert "'evil\\u202egnp.exe'" in out and "'a\\u200bb'" in out


def test_comparison_of_known_runs(runs_dir):
    # Execute
    comparison = compare_run_dirs([runs_dir / "avg", runs_dir / "med"], target=0.6)

    # Assert
    assert comparison["differing_keys"] == ["strategy"]
    avg, med = comparison["runs"]
    assert (avg["final_accuracy"], avg["best_accuracy"]) == (0.9, 0.9)
    assert (avg["target_round"], avg["target_time_s"]) == (2, 30.0)
    assert (med["target_round"], med["target_time_s"]) == (2, 60.0)
    assert (med["rejected"], avg["rejected"]) == (3, 0)
    assert avg["epsilon"] is None and avg["label"] == "strategy=fedavg"
    assert avg["rounds"] == 3 and avg["num_rounds"] == 3 and avg["state"] == "completed"
    assert comparison["over_seeds"] == []


def test_runs_over_seeds_get_mean_and_std_per_other_combination(tmp_path):
    # Prepare: two strategies x two seeds
    runs = tmp_path / "runs"
    dirs = [
        make_run_reaching(runs, f"{strategy}-{seed}", [0.1, final], strategy=strategy, seed=seed)
        for strategy, finals in (("fedavg", (0.8, 0.9)), ("median", (0.6, 0.7)))
        for seed, final in zip((1, 2), finals, strict=True)
    ]

    # Execute
    comparison = compare_run_dirs(dirs, target=0.85)

    # Assert
    summaries = {s["label"]: s for s in comparison["over_seeds"]}
    assert set(summaries) == {"strategy=fedavg", "strategy=median"}
    fedavg = summaries["strategy=fedavg"]
    assert fedavg["runs"] == 2 and fedavg["reached_target"] == 1
    assert fedavg["final_accuracy"]["mean"] == pytest.approx(0.85)
    assert fedavg["final_accuracy"]["std"] == pytest.approx(math.sqrt(0.005))
    assert summaries["strategy=median"]["reached_target"] == 0


# --------------------------------------------------------------------- CLI
def test_compare_prints_the_table_with_target_columns(runs_dir, capsys):
    # Execute
    code, out, err = run_cli(capsys, runs_dir, "compare", "avg", "med", "--target", "0.6")

    # Assert
    assert code == 0 and err == ""
    header, avg, med = out.splitlines()
    assert header.split() == [
        "RUN", "STATE", "STRATEGY", "CONFIG", "ROUNDS", "FINAL", "BEST",
        "ROUND@0.6", "TIME@0.6", "REJECTED", "EPSILON",
    ]  # fmt: skip
    assert avg.split() == [
        "avg", "completed", "fedavg", "-", "3/3", "0.9000", "0.9000", "2", "30.0s", "0", "-"
    ]  # fmt: skip
    assert med.split()[2] == "median" and med.split()[7:10] == ["2", "60.0s", "3"]


def test_target_never_reached_is_a_dash_and_epsilon_is_shown_when_recorded(tmp_path, capsys):
    # Prepare
    runs = tmp_path / "runs"
    make_run_reaching(runs, "dp", [0.1, 0.3, 0.4], strategy="clipped", epsilons=[0.0, 1.5, 2.25])
    make_run_reaching(runs, "nodp", [0.1, 0.3, 0.5], epsilons=[math.inf] * 3)

    # Execute
    code, out, _ = run_cli(capsys, runs, "compare", "dp", "nodp", "--target", "0.45")

    # Assert
    assert code == 0
    dp, nodp = (line.split() for line in out.splitlines()[1:])
    assert dp[7:] == ["-", "-", "0", "2.25"]
    assert nodp[7:] == ["2", "30.0s", "0", "inf"]
    data = compare_run_dirs([runs / "dp", runs / "nodp"])
    assert [run["epsilon_text"] for run in data["runs"]] == ["2.25", "inf"]  # JSON: no infinity


def test_compare_json_and_png(runs_dir, tmp_path, capsys):
    # Execute
    png = tmp_path / "out" / "compare.png"
    code, out, err = run_cli(capsys, runs_dir, "compare", "avg", "med", "--json", "-o", png)

    # Assert: stdout is one JSON object; the PNG exists
    assert code == 0 and f"wrote {png}" in err
    data = json.loads(out)
    assert [run["run_name"] for run in data["runs"]] == ["avg", "med"]
    assert data["runs"][1]["curve"]["central_accuracy"] == [0.1, 0.4, 0.6, 0.7]
    assert data["target"] is None and data["runs"][0]["target_round"] is None
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["avg"], "compare needs at least two runs (only 'avg'); name another run"),
        (["avg", "avg"], "run 'avg' is named twice; name each run once"),
        (["avg", "nope"], "no run 'nope' in"),
        (["avg", "../avg"], "invalid run name '../avg'"),
        (["avg", "med", "--target", "1.5"], "target must be an accuracy in [0, 1], got 1.5"),
        (["avg", "med", "--target", "nan"], "target must be an accuracy in [0, 1], got nan"),
        (["avg", "med", "-o", "x.txt"], "-o x.txt: name a .png file"),
        (["avg", "broken"], "run 'broken' is unreadable: run.db is empty; leave broken out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs_dir, capsys, args, message):
    # Prepare: a run whose run.db is empty
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.db").write_bytes(b"")

    # Execute
    code, out, err = run_cli(capsys, runs_dir, "compare", *args)

    # Assert
    assert code == 2 and out == ""
    assert err.startswith("fedcoord: ") and message in err and len(err.splitlines()) == 1
