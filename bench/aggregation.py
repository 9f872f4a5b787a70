"""Benchmark: our streaming aggregators against Flower's and against a memory-copy floor.

Run ``python bench/aggregation.py [--quick]``; prints a markdown table.

For each (clients N, float32 parameters P), on the same N replies (RecordDicts
holding an ArrayRecord and a MetricRecord with ``num-examples``, plus the same
arrays as numpy lists), it times:

- ``floor``: N*P*4 bytes at the copy bandwidth np.copyto reaches on a large
  buffer in this process (each byte read once and written once).

FedAvg group, compared with ``flwr.serverapp.strategy.strategy_utils.
aggregate_arrayrecords(records, "num-examples")``, which deserialises every
Array (np.load), sums ``array * weight`` into fresh temporaries and serialises
the result into an ArrayRecord:

- ``numpy``: our ``fedavg`` from numpy arrays already in memory to the result
  arrays (aggregation math alone);
- ``records``: input and output like Flower's: ``to_numpy_ndarrays()`` per reply,
  ``add``, ``result()``, result serialised into an ArrayRecord;
- ``records, views``: the same, but every Array read as a zero-copy read-only
  view of its .npy bytes (``npy_view``; aggregators never write their inputs);
- ``records, client - global (new arrays)``: ``records`` plus turning each reply
  into an update with ``client - global`` (a fresh array per reply);
- ``records, views, client - global (reused buffer)``: views plus
  ``np.subtract(client, global, out=buffer)`` into one buffer kept across replies;
- ``FedCoordStrategy round``: what the coordinator runs, from reply Messages:
  ``begin_round``, ``add_reply`` per reply (update validation, views, reused
  buffers, fold), ``end_round`` (result + server step), result serialised.

Clipped group, compared with the steps of Flower's
``DifferentialPrivacyServerSideFixedClipping.aggregate_train`` (noise 0) on
RecordDicts: ``to_numpy_ndarrays()``, ``compute_clip_model_update`` against the
global arrays, re-serialisation, then ``aggregate_arrayrecords`` (the wrapper's
uniform-weight check is skipped; it costs nothing):

- ``numpy``: our ``clipped`` from updates already in memory;
- ``records, client - global (new arrays)``,
  ``records, views, client - global (reused buffer)`` and
  ``FedCoordStrategy round``: as above.

The speed-up column divides the Flower time of the same group by the row's
time. Times are the best of a few runs. Peak MiB is the highest total of numpy
and Python memory traced by tracemalloc during one run, above what was
allocated before it (the replies themselves are not counted).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import compute_clip_model_update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from strategies.aggregation import make_aggregator  # noqa: E402
from strategies.records import npy_view, numpy_to_arrays  # noqa: E402
from strategies.strategy import FedCoordStrategy  # noqa: E402

NUM_EXAMPLES_KEY = "num-examples"
CLIP_NORM = 1.0
FULL_SIZES = [(10, 1_660_000), (100, 1_660_000), (20, 11_200_000)]
QUICK_SIZES = [(5, 200_000), (20, 200_000), (4, 1_000_000)]

Updates = list[list[np.ndarray]]


@dataclass
class Measurement:
    group: str
    path: str
    seconds: float
    peak_bytes: int | None


# -- inputs -------------------------------------------------------------------


def layer_shapes(num_parameters: int) -> list[tuple[int, ...]]:
    """A CNN-like layout of weight matrices and biases summing to num_parameters."""
    shapes: list[tuple[int, ...]] = []
    remaining = num_parameters
    for index, fraction in enumerate([0.02, 0.08, 0.15, 0.25]):
        channels = 32 << index
        rows = int(num_parameters * fraction) // channels
        shapes += [(channels, rows), (channels,)]
        remaining -= channels * rows + channels
    shapes.append((remaining,))
    return shapes


def make_updates(num_clients: int, num_parameters: int, seed: int = 0) -> Updates:
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(num_parameters)
    return [
        [rng.standard_normal(shape, dtype=np.float32) * 0.01 for shape in shapes]
        for _ in range(num_clients)
    ]


def make_records(updates: Updates, num_examples: list[int]) -> list[RecordDict]:
    records = []
    for update, examples in zip(updates, num_examples, strict=True):
        arrays = ArrayRecord({f"layer{k}": Array(array) for k, array in enumerate(update)})
        metrics = MetricRecord({NUM_EXAMPLES_KEY: examples})
        records.append(RecordDict({"arrays": arrays, "metrics": metrics}))
    return records


# -- timed paths -----------------------------------------------------------------


def to_array_record(arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({f"layer{k}": Array(array) for k, array in enumerate(arrays)})


def record_arrays(record: RecordDict, zero_copy: bool) -> list[np.ndarray]:
    array_record = record.array_records["arrays"]
    if zero_copy:
        return [npy_view(array) for array in array_record.values()]
    return array_record.to_numpy_ndarrays()


def ours_from_numpy(name: str, updates: Updates, weights: list[int]) -> list[np.ndarray]:
    aggregator = make_aggregator(name)
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    return aggregator.result()


def ours_from_records(
    name: str,
    records: list[RecordDict],
    *,
    views: bool = False,
    global_arrays: list[np.ndarray] | None = None,
    reuse_buffer: bool = False,
) -> ArrayRecord:
    """Aggregate replies; with ``global_arrays``, fold ``client - global`` updates."""
    aggregator = make_aggregator(name)
    buffers = [np.empty_like(g) for g in global_arrays or []] if reuse_buffer else None
    for record in records:
        weight = float(record.metric_records["metrics"][NUM_EXAMPLES_KEY])
        update = record_arrays(record, views)
        if global_arrays is not None and buffers is not None:
            parts = zip(update, global_arrays, buffers, strict=True)
            update = [np.subtract(c, g, out=b) for c, g, b in parts]
        elif global_arrays is not None:
            update = [c - g for c, g in zip(update, global_arrays, strict=True)]
        aggregator.add(update, weight)
    return to_array_record(aggregator.result())


def make_replies(records: list[RecordDict]) -> list[Message]:
    """Reply Messages carrying the records, one node id each."""
    return [
        Message(content=record, metadata=reply_metadata(node_id))  # type: ignore[call-overload]
        for node_id, record in enumerate(records, start=1)
    ]


def reply_metadata(node_id: int) -> Metadata:
    """Metadata of a train reply from ``node_id``, as the SuperLink would deliver it."""
    return Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=1,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )


def strategy_round(name: str, replies: list[Message], global_arrays: list) -> ArrayRecord:
    """One round of FedCoordStrategy as the coordinator drives it."""
    strategy = FedCoordStrategy(aggregator=name, min_train_nodes=1)
    strategy.begin_round(1, {f"layer{k}": g for k, g in enumerate(global_arrays)})
    for reply in replies:
        strategy.add_reply(reply)
    new_global, summary = strategy.end_round()
    assert new_global is not None and summary.accepted == len(replies), summary
    return numpy_to_arrays(new_global)


def flower_fedavg(records: list[RecordDict]) -> ArrayRecord:
    return aggregate_arrayrecords(records, NUM_EXAMPLES_KEY)


def flower_fixed_clipping(
    records: list[RecordDict], global_arrays: list[np.ndarray]
) -> ArrayRecord:
    """Flower's server-side fixed clipping steps, without mutating the replies."""
    clipped_records = []
    for record in records:
        array_record = record.array_records["arrays"]
        reply_arrays = array_record.to_numpy_ndarrays()
        compute_clip_model_update(reply_arrays, global_arrays, CLIP_NORM)
        clipped = ArrayRecord(
            dict(
                zip(array_record.keys(), (Array(np.asarray(v)) for v in reply_arrays), strict=True)
            )
        )
        metrics = record.metric_records["metrics"]
        clipped_records.append(RecordDict({"arrays": clipped, "metrics": metrics}))
    return aggregate_arrayrecords(clipped_records, NUM_EXAMPLES_KEY)


# -- measuring ---------------------------------------------------------------------


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def peak_allocated_bytes(run: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - before


def copy_bandwidth(buffer_bytes: int, repeats: int = 5) -> float:
    """Bytes per second np.copyto copies between two buffers far larger than cache."""
    source = np.ones(buffer_bytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    seconds = best_seconds(lambda: np.copyto(target, source), repeats)
    return source.nbytes / seconds


def max_abs_difference(ours: ArrayRecord, theirs: ArrayRecord) -> float:
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), strict=True)
    )


def timed_paths(
    updates: Updates, weights: list[int], records: list[RecordDict], global_arrays: list
) -> list[tuple[str, str, Callable[[], object]]]:
    """(group, path, run) for every timed path; the first of each group is Flower's."""
    replies = make_replies(records)
    return [
        ("fedavg", "flower aggregate_arrayrecords", lambda: flower_fedavg(records)),
        ("fedavg", "numpy", lambda: ours_from_numpy("fedavg", updates, weights)),
        ("fedavg", "records", lambda: ours_from_records("fedavg", records)),
        ("fedavg", "records, views", lambda: ours_from_records("fedavg", records, views=True)),
        (
            "fedavg",
            "records, client - global (new arrays)",
            lambda: ours_from_records("fedavg", records, global_arrays=global_arrays),
        ),
        (
            "fedavg",
            "records, views, client - global (reused buffer)",
            lambda: ours_from_records(
                "fedavg", records, views=True, global_arrays=global_arrays, reuse_buffer=True
            ),
        ),
        (
            "fedavg",
            "FedCoordStrategy round (validation included)",
            lambda: strategy_round("fedavg", replies, global_arrays),
        ),
        (
            "clipped",
            "flower server-side fixed clipping",
            lambda: flower_fixed_clipping(records, global_arrays),
        ),
        ("clipped", "numpy", lambda: ours_from_numpy("clipped", updates, weights)),
        (
            "clipped",
            "records, client - global (new arrays)",
            lambda: ours_from_records("clipped", records, global_arrays=global_arrays),
        ),
        (
            "clipped",
            "records, views, client - global (reused buffer)",
            lambda: ours_from_records(
                "clipped", records, views=True, global_arrays=global_arrays, reuse_buffer=True
            ),
        ),
        (
            "clipped",
            "FedCoordStrategy round (validation included)",
            lambda: strategy_round("clipped", replies, global_arrays),
        ),
    ]


def measure_size(
    num_clients: int, num_parameters: int, bandwidth: float, repeats: int
) -> tuple[list[Measurement], float]:
    updates = make_updates(num_clients, num_parameters)
    weights = [int(w) for w in np.random.default_rng(1).integers(50, 500, num_clients)]
    records = make_records(updates, weights)
    global_arrays = [np.zeros_like(array) for array in updates[0]]
    floor_seconds = num_clients * num_parameters * 4 / bandwidth
    measurements = [Measurement("-", "floor (copy N*P*4 bytes)", floor_seconds, None)]
    for group, path, run in timed_paths(updates, weights, records, global_arrays):
        seconds = best_seconds(run, repeats)
        measurements.append(Measurement(group, path, seconds, peak_allocated_bytes(run)))
    difference = max(
        max_abs_difference(
            ours_from_records("fedavg", records, views=views), flower_fedavg(records)
        )
        for views in (False, True)
    )
    return measurements, difference


# -- report --------------------------------------------------------------------------


def table_rows(num_clients: int, num_parameters: int, measurements: list[Measurement]) -> list[str]:
    floor = measurements[0].seconds
    flower_seconds = {m.group: m.seconds for m in reversed(measurements) if m.group != "-"}
    rows = []
    for m in measurements:
        peak = "" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:.0f}"
        speed_up = f"{flower_seconds[m.group] / m.seconds:.2f}" if m.group != "-" else ""
        rows.append(
            f"| {num_clients} | {num_parameters / 1e6:.2f}M | {m.group} | {m.path} "
            f"| {m.seconds * 1e3:.1f} | {m.seconds / floor:.2f} | {speed_up} | {peak} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument("--repeats", type=int, default=0, help="best of N (default 5; quick 1)")
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (1 if args.quick else 5)
    bandwidth = copy_bandwidth((64 if args.quick else 512) << 20)
    model_mib = max(p for _, p in sizes) * 4 / 2**20
    print(f"numpy {np.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (np.copyto)")
    print(f"model sizes up to {model_mib:.0f} MiB of float32; best of {repeats} run(s)\n")
    print("| N | P | group | path | time (ms) | x floor | speed-up vs Flower | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    differences = []
    for num_clients, num_parameters in sizes:
        measurements, difference = measure_size(num_clients, num_parameters, bandwidth, repeats)
        differences.append(difference)
        print("\n".join(table_rows(num_clients, num_parameters, measurements)), flush=True)
    print(f"\nmax |ours - Flower| over fedavg results: {max(differences):.2e}")


if __name__ == "__main__":
    main()
