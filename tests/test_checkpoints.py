import numpy as np
import pytest

from server.record.checkpoints import (
    CheckpointError,
    checkpoint_path,
    files_to_prune,
    load_checkpoint,
    save_checkpoint,
)
from server.record.store import RoundRecord
from server.record.verify import verify_run
from tests.helpers import make_run, round_record


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.bias": rng.normal(size=(10,)).astype(np.float32),
    }


def test_checkpoint_round_trips_arrays_order_and_state(tmp_path):
    # Prepare
    model = arrays(0)
    state = {"m_t/fc.bias": np.ones(10, dtype=np.float32), "rng": np.arange(5, dtype=np.uint8)}

    # Execute
    path, digest = save_checkpoint(tmp_path, 3, model, state, {"model": "simple-cnn"})
    loaded = load_checkpoint(path, digest)

    # Assert
    assert path == checkpoint_path(tmp_path, 3)
    assert list(loaded.arrays) == list(model)
    for name, value in model.items():
        assert loaded.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.arrays[name], value)
    np.testing.assert_array_equal(loaded.strategy_state["rng"], state["rng"])
    assert loaded.server_round == 3 and loaded.metadata["model"] == "simple-cnn"
    assert not list(path.parent.glob(".tmp-*"))


def test_a_checkpoint_altered_by_one_byte_is_refused(tmp_path):
    # Prepare
    path, digest = save_checkpoint(tmp_path, 1, arrays(0), {}, {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(CheckpointError, match="is altered") as error:
        load_checkpoint(path, digest)
    assert str(path) in str(error.value)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope.safetensors", "0" * 64)


def test_pruning_keeps_the_last_three_and_the_best():
    # Prepare
    history = [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.8), (6, 0.75)]

    # Execute
    pruned = files_to_prune(history)

    # Assert
    assert pruned == [1, 3]


def checkpointed_round(server_round: int) -> RoundRecord:
    metrics = {"central-accuracy": 0.1 * server_round}
    return round_record(
        server_round, ended_at=1.0, sampled=2, rejected=0, updated=True, metrics=metrics
    )


# Three rounds, each with its checkpoint.
CHECKPOINTED_RUN = {
    "config": {"seed": 1},
    "num_rounds": 3,
    "state": None,
    "rounds": range(1, 4),
    "nodes": False,
    "record_fn": checkpointed_round,
    "model_fn": arrays,
}


def test_verify_passes_an_intact_run_and_names_an_altered_checkpoint(tmp_path):
    # Prepare
    store = make_run(tmp_path, **CHECKPOINTED_RUN)
    problems, _ = verify_run(store.run_dir)
    assert problems == []
    target = checkpoint_path(store.run_dir, 2)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert len(problems) == 1
    assert str(target) in problems[0] and "round 2" in problems[0]


def test_verify_detects_an_edited_round_row(tmp_path):
    # Prepare
    store = make_run(tmp_path, **CHECKPOINTED_RUN)
    store._db.execute("UPDATE rounds SET metrics_json = '{}' WHERE round = 2")

    # Execute
    problems, _ = verify_run(store.run_dir)

    # Assert
    assert any("round 2: chain hash" in p for p in problems)


def test_round_and_checkpoint_rows_are_written_together_and_truncated(tmp_path):
    # Prepare
    store = make_run(tmp_path, **CHECKPOINTED_RUN)

    # Execute
    deleted = store.truncate_after(1)

    # Assert
    assert deleted == 2
    assert [r["round"] for r in store.rounds()] == [1]
    assert [c["round"] for c in store.checkpoints()] == [1]
    assert store.run_row()["current_round"] == 1
