"""``fedcoord verify``: check the round hash chain and the checkpoint files."""

from __future__ import annotations

from pathlib import Path

from server.checkpoints import CHECKPOINT_DIR, file_sha256
from server.store import GENESIS_HASH, RunStore, chain_hash


def verify_chain(rounds: list[dict[str, object]]) -> list[str]:
    """Problems in the chain of round rows (empty list when intact)."""
    problems = []
    previous = GENESIS_HASH
    expected_round = rounds[0]["round"] if rounds else 0
    for row in rounds:
        if row["round"] != expected_round:
            problems.append(f"round {expected_round} is missing (next row is {row['round']})")
        expected = chain_hash(
            previous,
            str(row["model_hash"]),
            int(row["round"]),
            str(row["metrics_json"]),  # type: ignore[call-overload]
        )
        if expected != row["chain_hash"]:
            problems.append(
                f"round {row['round']}: chain hash does not match its row and the one "
                "before it (the row was edited, or a row before it was)"
            )
        previous = str(row["chain_hash"])
        expected_round = int(row["round"]) + 1  # type: ignore[call-overload]
    return problems


def verify_checkpoints(
    run_dir: Path, checkpoints: list[dict[str, object]], rounds: list[dict[str, object]]
) -> list[str]:
    """Problems with checkpoint files: missing, altered, or without a round row."""
    problems = []
    round_numbers = {row["round"] for row in rounds}
    for row in checkpoints:
        path = run_dir / CHECKPOINT_DIR / str(row["path"])
        if not path.is_file():
            problems.append(f"checkpoint {path} of round {row['round']} is missing")
            continue
        actual = file_sha256(path)
        if actual != row["sha256"]:
            problems.append(
                f"checkpoint {path} of round {row['round']} is altered: sha256 {actual}, "
                f"run.db records {row['sha256']}"
            )
        if row["round"] not in round_numbers:
            problems.append(f"checkpoint {path} has no round row {row['round']}")
    return problems


def verify_run(run_dir: Path) -> tuple[list[str], str]:
    """All problems of one run, and a one-line summary of what was checked."""
    store = RunStore(run_dir)
    try:
        rounds, checkpoints = store.rounds(), store.checkpoints()
    finally:
        store.close()
    problems = verify_chain(rounds) + verify_checkpoints(run_dir, checkpoints, rounds)
    summary = f"{len(rounds)} round rows, {len(checkpoints)} checkpoints"
    return problems, summary
