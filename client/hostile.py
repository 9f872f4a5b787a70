"""Hostile clients: malformed replies of every class, for tests of the trust boundary only.

Off by default: the ``hostile`` run-config key is ``""``. ``"0,1"`` makes
partitions 0 and 1 skip training and evaluation and answer every message with
a malformed reply instead, one kind per round: in round r the i-th hostile
partition (by id) sends train kind ``TRAIN_KINDS[((r - 1) * H + i) % len]`` and
evaluate kind ``EVALUATE_KINDS[((r - 1) * H + i) % len]``, H hostile partitions
in all, so that H partitions cover every kind in ``ceil(len / H)`` rounds.

Each kind is what a node controlling its own ClientApp can send: counts and ids
out of range or of the wrong type, metrics that are not scalars of their kind,
Arrays whose dtype, stype, shape or .npy bytes do not add up, packed layouts
with ``Infinity`` dimensions, and so on. The server must reject every one of
them with a reason, count it against the node and go on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.records import (
    PACKED_DATA,
    PACKED_LAYOUT,
    PACKED_VERSION,
    npy_view,
    numpy_to_arrays,
    pack_arrays,
)
from task import keys

NamedArrays = dict[str, np.ndarray]
Metrics = dict[str, object]
TrainKind = Callable[[NamedArrays, Metrics], RecordDict]


def _reply(record: ArrayRecord | None, metrics: Mapping[str, object]) -> RecordDict:
    """A reply RecordDict holding ``record`` (if any) and ``metrics``."""
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if record is not None:
        content[keys.ARRAYS] = record
    return content


def _first_float(arrays: NamedArrays) -> str:
    return next(name for name, value in arrays.items() if value.dtype.kind == "f")


def _with_array(arrays: NamedArrays, edit: Callable[[Array], None]) -> ArrayRecord:
    """A named record of ``arrays`` whose first float Array is edited by ``edit``."""
    record = numpy_to_arrays(arrays)
    edit(record[_first_float(arrays)])
    return record


def _set(**fields: object) -> Callable[[Array], None]:
    def edit(array: Array) -> None:
        for name, value in fields.items():
            setattr(array, name, value)

    return edit


def _truncate(array: Array) -> None:
    array.data = array.data[:-1]


def _claim_huge(array: Array) -> None:
    """Declare and write a header for 10^12 values, send 4 bytes of them."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    buffer = bytearray(b"\x93NUMPY\x01\x00")
    text = repr(header).encode().ljust(118) + b"\n"
    buffer += len(text).to_bytes(2, "little") + text + b"\x00" * 4
    array.shape, array.data = (10**12,), bytes(buffer)


def _big_endian(arrays: NamedArrays) -> ArrayRecord:
    """A named record whose first float array is sent big-endian (declared and in .npy)."""
    record = numpy_to_arrays(arrays)
    name = _first_float(arrays)
    record[name] = Array(arrays[name].astype(arrays[name].dtype.newbyteorder(">")))
    return record


def _infinite_dim(arrays: NamedArrays) -> ArrayRecord:
    """A packed record whose layout gives the first array the dimension ``Infinity``."""
    entries = [[name, value.dtype.str, list(value.shape)] for name, value in arrays.items()]
    entries[0][2] = [float("inf")]
    text = json.dumps({"version": PACKED_VERSION, "arrays": entries}).encode()  # Infinity
    data = pack_arrays(arrays)[PACKED_DATA]
    return ArrayRecord({PACKED_DATA: data, PACKED_LAYOUT: Array(np.frombuffer(text, np.uint8))})


def _packed_short(arrays: NamedArrays) -> ArrayRecord:
    """A packed record whose data is one byte short of its layout."""
    record = pack_arrays(arrays)
    data = np.array(npy_view(record[PACKED_DATA])[:-1])
    return ArrayRecord({PACKED_DATA: Array(data), PACKED_LAYOUT: record[PACKED_LAYOUT]})


def _unreadable_layout(arrays: NamedArrays) -> ArrayRecord:
    record = pack_arrays(arrays)
    junk = Array(np.frombuffer(b"{not json", np.uint8))
    return ArrayRecord({PACKED_DATA: record[PACKED_DATA], PACKED_LAYOUT: junk})


def _nan_values(arrays: NamedArrays) -> ArrayRecord:
    poisoned = dict(arrays)
    name = _first_float(arrays)
    poisoned[name] = np.full_like(arrays[name], np.nan)
    return pack_arrays(poisoned)


def _wrong_shape(arrays: NamedArrays) -> ArrayRecord:
    reshaped = dict(arrays)
    name = _first_float(arrays)
    reshaped[name] = np.zeros(arrays[name].size + 1, dtype=arrays[name].dtype)
    return pack_arrays(reshaped)


def _metrics(metrics: Metrics, **changes: object) -> Metrics:
    return {**metrics, **{key.replace("_", "-"): value for key, value in changes.items()}}


# Train kinds: (received arrays, honest metrics) -> the malformed reply content.
TRAIN_KINDS: dict[str, TrainKind] = {
    "num-examples-huge": lambda a, m: _reply(pack_arrays(a), _metrics(m, num_examples=1e19)),
    "num-examples-int64": lambda a, m: _reply(pack_arrays(a), _metrics(m, num_examples=2**63 + 1)),
    "num-examples-list": lambda a, m: _reply(pack_arrays(a), _metrics(m, num_examples=[1, 2])),
    "partition-id-huge": lambda a, m: _reply(pack_arrays(a), _metrics(m, partition_id=1e300)),
    "metric-list": lambda a, m: _reply(pack_arrays(a), _metrics(m, train_loss=[0.1, 0.2])),
    "metric-range": lambda a, m: _reply(pack_arrays(a), _metrics(m, train_accuracy=7.5)),
    "metric-nan": lambda a, m: _reply(pack_arrays(a), _metrics(m, train_loss=float("nan"))),
    "too-many-metrics": lambda a, m: _reply(
        pack_arrays(a), {**m, **{f"m{i}": 0.0 for i in range(100)}}
    ),
    "no-arrays": lambda a, m: _reply(None, m),
    "nan-values": lambda a, m: _reply(_nan_values(a), m),
    "wrong-shape": lambda a, m: _reply(_wrong_shape(a), m),
    "array-object-dtype": lambda a, m: _reply(_with_array(a, _set(dtype="object")), m),
    "array-big-endian": lambda a, m: _reply(_big_endian(a), m),
    "array-stype": lambda a, m: _reply(_with_array(a, _set(stype="torch.Tensor")), m),
    "array-not-npy": lambda a, m: _reply(_with_array(a, _set(data=b"junk")), m),
    "array-empty": lambda a, m: _reply(_with_array(a, _set(data=b"")), m),
    "array-short": lambda a, m: _reply(_with_array(a, _truncate), m),
    "array-claims-huge": lambda a, m: _reply(_with_array(a, _claim_huge), m),
    "array-infinite-dim": lambda a, m: _reply(_with_array(a, _set(shape=(float("inf"),))), m),
    "packed-infinite-dim": lambda a, m: _reply(_infinite_dim(a), m),
    "packed-unreadable-layout": lambda a, m: _reply(_unreadable_layout(a), m),
    "packed-short": lambda a, m: _reply(_packed_short(a), m),
}

# Evaluate kinds: honest metrics -> the malformed metrics (None: no metrics at all).
EVALUATE_KINDS: dict[str, Callable[[Metrics], Metrics | None]] = {
    "eval-loss-negative": lambda m: _metrics(m, eval_loss=-1.0),
    "eval-loss-nan": lambda m: _metrics(m, eval_loss=float("nan")),
    "eval-loss-list": lambda m: _metrics(m, eval_loss=[1.0]),
    "eval-accuracy-range": lambda m: _metrics(m, eval_accuracy=1.5),
    "eval-num-examples-huge": lambda m: _metrics(m, num_examples=1e19),
    "eval-num-examples-negative": lambda m: _metrics(m, num_examples=-5),
    "eval-partition-id": lambda m: _metrics(m, partition_id=-7),
    "eval-missing-accuracy": lambda m: {k: v for k, v in m.items() if k != keys.EVAL_ACCURACY},
    "eval-no-metrics": lambda m: None,
}


def kind_index(server_round: int, partition_id: int, partitions: frozenset[int]) -> int:
    """Which kind (modulo the number of kinds) ``partition_id`` sends in ``server_round``."""
    return (server_round - 1) * len(partitions) + sorted(partitions).index(partition_id)


def train_kind(server_round: int, partition_id: int, partitions: frozenset[int]) -> str:
    """The train kind ``partition_id`` sends in ``server_round``."""
    names = list(TRAIN_KINDS)
    return names[kind_index(server_round, partition_id, partitions) % len(names)]


def evaluate_kind(server_round: int, partition_id: int, partitions: frozenset[int]) -> str:
    """The evaluate kind ``partition_id`` sends in ``server_round``."""
    names = list(EVALUATE_KINDS)
    return names[kind_index(server_round, partition_id, partitions) % len(names)]


def hostile_train_content(kind: str, received: NamedArrays, partition_id: int) -> RecordDict:
    """The malformed train reply of ``kind``, built around the received global model."""
    metrics: Metrics = {
        keys.NUM_EXAMPLES: 100,
        keys.PARTITION_ID: partition_id,
        keys.TRAIN_LOSS: 0.5,
        keys.TRAIN_ACCURACY: 0.5,
    }
    return TRAIN_KINDS[kind](dict(received), metrics)


def hostile_evaluate_content(kind: str, partition_id: int) -> RecordDict:
    """The malformed evaluate reply of ``kind``."""
    metrics: Metrics = {
        keys.NUM_EXAMPLES: 50,
        keys.PARTITION_ID: partition_id,
        keys.EVAL_LOSS: 0.5,
        keys.EVAL_ACCURACY: 0.5,
    }
    malformed = EVALUATE_KINDS[kind](metrics)
    return RecordDict() if malformed is None else _reply(None, malformed)
