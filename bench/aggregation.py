"""Benchmark: our streaming aggregators against Flower's and against a memory-copy floor.

Run ``python bench/aggregation.py [--quick]``; prints a markdown table.

For each (clients N, float32 parameters P) it times, on the same replies:

- ``floor``: N*P*4 bytes at the copy bandwidth np.copyto reaches on a large
  buffer in this process (each byte read once and written once);
- ``flower``: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``
  on N reply RecordDicts (ArrayRecord + MetricRecord with ``num-examples``):
  deserialising every Array, the weighted sum, and serialising the result into
  an ArrayRecord;
- ``fedavg numpy`` / ``clipped numpy``: our aggregator from numpy arrays already
  in memory to the list of result arrays (aggregation math alone);
- ``fedavg records`` / ``clipped records``: our aggregator on the same
  RecordDicts, input to output like Flower's: ``to_numpy_ndarrays()`` per reply
  (np.load: a fresh copy of every array), ``add``, ``result()``, and the result
  serialised into an ArrayRecord;
- ``... records, views``: the same, but each Array is read as a zero-copy,
  read-only numpy view of its .npy bytes (``npy_view``), which is safe because
  aggregators never write to their inputs;
- ``fedavg records, client - global (new arrays)``: ``records`` plus the
  subtraction that turns a reply into an update, allocating fresh arrays per
  reply (``client - global``);
- ``fedavg records, views, client - global (reused buffer)``: views plus the
  subtraction into one buffer reused for every reply
  (``np.subtract(client, global, out=buffer)``): what a coordinator can reach.

Times are the best of a few runs. Peak MiB is the highest total of numpy and
Python memory traced by tracemalloc during one run, above what was allocated
before it (the replies themselves are not counted).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies.aggregators import make_aggregator  # noqa: E402

NUM_EXAMPLES_KEY = "num-examples"
FULL_SIZES = [(10, 1_660_000), (100, 1_660_000), (20, 11_200_000)]
QUICK_SIZES = [(5, 200_000), (20, 200_000), (4, 1_000_000)]

Updates = list[list[np.ndarray]]


@dataclass
class Measurement:
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


def npy_view(array: Array) -> np.ndarray:
    """Return a read-only numpy view of an Array's .npy bytes, without copying them.

    Uses the dtype and shape the Array declares, after checking that its .npy
    header says the same (no ``ast.literal_eval`` of the header, 37 us per array
    here); anything unexpected falls back to ``Array.numpy()``.
    """
    dtype, shape = np.dtype(array.dtype), tuple(array.shape)
    offset = len(array.data) - math.prod(shape) * dtype.itemsize
    header = array.data[: max(offset, 0)]
    descr = np.lib.format.dtype_to_descr(dtype)
    expected = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    if dtype.hasobject or not header.startswith(b"\x93NUMPY") or expected.encode() not in header:
        return array.numpy()
    return np.frombuffer(array.data, dtype=dtype, offset=offset).reshape(shape)


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


def ours_from_records(name: str, records: list[RecordDict], zero_copy: bool = False) -> ArrayRecord:
    aggregator = make_aggregator(name)
    for record in records:
        weight = float(record.metric_records["metrics"][NUM_EXAMPLES_KEY])
        aggregator.add(record_arrays(record, zero_copy), weight)
    return to_array_record(aggregator.result())


def ours_from_records_minus_global(
    name: str, records: list[RecordDict], global_arrays: list[np.ndarray], zero_copy: bool
) -> ArrayRecord:
    """Fold ``client - global``: into fresh arrays, or (zero_copy) into one reused buffer."""
    aggregator = make_aggregator(name)
    buffers = [np.empty_like(g) for g in global_arrays] if zero_copy else None
    for record in records:
        weight = float(record.metric_records["metrics"][NUM_EXAMPLES_KEY])
        client = record_arrays(record, zero_copy)
        if buffers is None:
            update = [c - g for c, g in zip(client, global_arrays, strict=True)]
        else:
            update = [
                np.subtract(c, g, out=b)
                for c, g, b in zip(client, global_arrays, buffers, strict=True)
            ]
        aggregator.add(update, weight)
    return to_array_record(aggregator.result())


def flower(records: list[RecordDict]) -> ArrayRecord:
    return aggregate_arrayrecords(records, NUM_EXAMPLES_KEY)


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


def measure_size(
    num_clients: int, num_parameters: int, bandwidth: float, repeats: int
) -> tuple[list[Measurement], float]:
    updates = make_updates(num_clients, num_parameters)
    weights = [int(w) for w in np.random.default_rng(1).integers(50, 500, num_clients)]
    records = make_records(updates, weights)
    global_arrays = [np.zeros_like(array) for array in updates[0]]
    paths: dict[str, Callable[[], object]] = {
        "flower aggregate_arrayrecords": lambda: flower(records),
        "fedavg numpy": lambda: ours_from_numpy("fedavg", updates, weights),
        "fedavg records": lambda: ours_from_records("fedavg", records),
        "fedavg records, views": lambda: ours_from_records("fedavg", records, zero_copy=True),
        "fedavg records, client - global (new arrays)": lambda: ours_from_records_minus_global(
            "fedavg", records, global_arrays, zero_copy=False
        ),
        "fedavg records, views, client - global (reused buffer)": (
            lambda: ours_from_records_minus_global("fedavg", records, global_arrays, True)
        ),
        "clipped numpy": lambda: ours_from_numpy("clipped", updates, weights),
        "clipped records": lambda: ours_from_records("clipped", records),
        "clipped records, views": lambda: ours_from_records("clipped", records, zero_copy=True),
    }
    floor = Measurement(
        "floor (copy N*P*4 bytes)", num_clients * num_parameters * 4 / bandwidth, None
    )
    measurements = [floor]
    for path, run in paths.items():
        seconds = best_seconds(run, repeats)
        measurements.append(Measurement(path, seconds, peak_allocated_bytes(run)))
    difference = max(
        max_abs_difference(ours_from_records("fedavg", records, zero_copy), flower(records))
        for zero_copy in (False, True)
    )
    return measurements, difference


# -- report --------------------------------------------------------------------------


def table_rows(num_clients: int, num_parameters: int, measurements: list[Measurement]) -> list[str]:
    floor = measurements[0].seconds
    flower_seconds = next(m.seconds for m in measurements if m.path.startswith("flower"))
    rows = []
    for m in measurements:
        peak = "" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:.0f}"
        rows.append(
            f"| {num_clients} | {num_parameters / 1e6:.2f}M | {m.path} | {m.seconds * 1e3:.1f} "
            f"| {m.seconds / floor:.2f} | {flower_seconds / m.seconds:.2f} | {peak} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = 1 if args.quick else 5
    bandwidth = copy_bandwidth((64 if args.quick else 512) << 20)
    model_mib = max(p for _, p in sizes) * 4 / 2**20
    print(f"numpy {np.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (np.copyto)")
    print(f"model sizes up to {model_mib:.0f} MiB of float32; best of {repeats} run(s)\n")
    print("| N | P | path | time (ms) | x floor | speed-up vs Flower | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    differences = []
    for num_clients, num_parameters in sizes:
        measurements, difference = measure_size(num_clients, num_parameters, bandwidth, repeats)
        differences.append(difference)
        print("\n".join(table_rows(num_clients, num_parameters, measurements)), flush=True)
    print(f"\nmax |ours - Flower| over fedavg results: {max(differences):.2e}")


if __name__ == "__main__":
    main()
