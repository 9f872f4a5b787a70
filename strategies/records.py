"""Conversions between Flower's ArrayRecord and named numpy arrays.

Reading a reply's arrays is on the hot path of every round: ``npy_view`` reads an
``Array`` as a zero-copy, read-only view of its .npy bytes instead of parsing the
header and copying the values (``Array.numpy()``). Views are safe because nothing
here writes into a reply's arrays: updates are computed into separate buffers,
and aggregators copy whatever they keep.

Packed records. Flower moves every ``Array`` of a message as separate objects
(the array and each of its chunks), one HTTPS request and, on a SuperLink with a
database, several SQL statements each; a model of 8 tensors is 20 objects per
message. Between fedcoord's own ServerApp and ClientApp a model travels as a
*packed* record instead: one ``uint8`` array holding every tensor's bytes
(each at a 64-byte aligned offset) and one holding its layout as JSON (names,
dtypes, shapes, in order), 8 objects per message. ``arrays_to_numpy`` reads both
forms; the ClientApp answers in the form it was sent, so Flower's own
strategies (``Strategy.start``) still get named records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NamedArrays = dict[str, np.ndarray]

_NPY_MAGIC = b"\x93NUMPY"
PACKED_DATA = "fedcoord.packed"
PACKED_LAYOUT = "fedcoord.layout"
PACKED_ALIGNMENT = 64
PACKED_VERSION = 1
_PACKABLE_KINDS = "biuf"


class MalformedRecordError(ValueError):
    """A packed record whose layout or data does not add up."""


def npy_view(array: Array) -> np.ndarray:
    """Return a read-only numpy view of an Array's .npy bytes, without copying them.

    Uses the dtype and shape the Array declares, after checking that its .npy
    header says the same (no ``ast.literal_eval`` of the header, 37 us per array
    measured); anything unexpected (object dtype, Fortran order, another header)
    falls back to ``Array.numpy()``, which parses and copies.
    """
    dtype, shape = np.dtype(array.dtype), tuple(array.shape)
    offset = len(array.data) - math.prod(shape) * dtype.itemsize
    header = array.data[: max(offset, 0)]
    descr = np.lib.format.dtype_to_descr(dtype)
    expected = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    if dtype.hasobject or not header.startswith(_NPY_MAGIC) or expected.encode() not in header:
        return array.numpy()
    view = np.frombuffer(array.data, dtype=dtype, offset=offset).reshape(shape)
    view.flags.writeable = False
    return view


def arrays_to_numpy(record: ArrayRecord) -> NamedArrays:
    """Return an ArrayRecord's arrays by name, as read-only zero-copy views.

    Reads named and packed records alike. Copy an array (``np.array(a)``) before
    writing into it.

    Raises
    ------
    MalformedRecordError
        If a packed record's layout or data does not add up.
    """
    if is_packed(record):
        return unpack_arrays(record)
    return {name: npy_view(array) for name, array in record.items()}


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is a packed record (see the module docstring)."""
    return PACKED_DATA in record or PACKED_LAYOUT in record


def _packed_offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Each array's 64-byte aligned start in the packed data, and the data's length."""
    offsets, end = [], 0
    for size in sizes:
        start = -(-end // PACKED_ALIGNMENT) * PACKED_ALIGNMENT
        offsets.append(start)
        end = start + size
    return offsets, end


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Serialise named arrays into a packed record: one data array, one layout array.

    Raises
    ------
    ValueError
        If an array's dtype is not boolean, integer or floating point.
    """
    values = [np.asarray(value, order="C") for value in arrays.values()]
    for name, value in zip(arrays, values, strict=True):
        if value.dtype.kind not in _PACKABLE_KINDS:
            raise ValueError(f"array {name!r} has dtype {value.dtype}, which cannot be packed")
    layout = [[name, v.dtype.str, list(v.shape)] for name, v in zip(arrays, values, strict=True)]
    offsets, length = _packed_offsets([value.nbytes for value in values])
    data = np.zeros(length, dtype=np.uint8)
    for offset, value in zip(offsets, values, strict=True):
        data[offset : offset + value.nbytes] = value.reshape(-1).view(np.uint8)
    header = json.dumps({"version": PACKED_VERSION, "arrays": layout}).encode()
    return ArrayRecord(
        {PACKED_DATA: Array(data), PACKED_LAYOUT: Array(np.frombuffer(header, dtype=np.uint8))}
    )


def _parse_layout(record: ArrayRecord) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if set(record) != {PACKED_DATA, PACKED_LAYOUT}:
        raise MalformedRecordError(
            f"a packed record holds exactly {PACKED_DATA!r} and {PACKED_LAYOUT!r}, "
            f"got {sorted(record)}"
        )
    try:
        parsed = json.loads(npy_view(record[PACKED_LAYOUT]).tobytes())
        entries = parsed.get("arrays") if parsed.get("version") == PACKED_VERSION else None
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise MalformedRecordError(f"unreadable packed layout: {error}") from None
    if not isinstance(entries, list):
        raise MalformedRecordError(f"packed layout is not version {PACKED_VERSION}")
    layout: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for entry in entries:
        try:
            name, dtype_text, shape = entry
            dtype = np.dtype(dtype_text)
            dims = tuple(int(dim) for dim in shape)
        except (ValueError, TypeError) as error:
            raise MalformedRecordError(f"bad packed layout entry {entry!r}: {error}") from None
        if (
            not isinstance(name, str)
            or dtype.kind not in _PACKABLE_KINDS
            or min(dims, default=0) < 0
        ):
            raise MalformedRecordError(f"bad packed layout entry {entry!r}")
        layout.append((name, dtype, dims))
    if len({name for name, _, _ in layout}) != len(layout):
        raise MalformedRecordError("packed layout names an array twice")
    return layout


def unpack_arrays(record: ArrayRecord) -> NamedArrays:
    """Read a packed record as named, read-only views into its data (no copy).

    Raises
    ------
    MalformedRecordError
        If the layout is unreadable, names an array twice, or does not match the
        data's length exactly.
    """
    layout = _parse_layout(record)
    data = npy_view(record[PACKED_DATA])
    if data.dtype != np.uint8 or data.ndim != 1:
        raise MalformedRecordError(f"packed data must be 1-d uint8, got {data.dtype} {data.shape}")
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in layout]
    offsets, length = _packed_offsets(sizes)
    arrays: NamedArrays = {}
    for (name, dtype, shape), offset, size in zip(layout, offsets, sizes, strict=True):
        if offset + size > data.size:
            raise MalformedRecordError(f"packed data ends inside array {name!r}")
        arrays[name] = data[offset : offset + size].view(dtype).reshape(shape)
    if length != data.size:
        raise MalformedRecordError(
            f"packed data has {data.size - length} byte(s) beyond its layout"
        )
    return arrays


def record_like(arrays: Mapping[str, np.ndarray], received: ArrayRecord) -> ArrayRecord:
    """Serialise ``arrays`` in the form of ``received``: packed if it was packed."""
    return pack_arrays(arrays) if is_packed(received) else numpy_to_arrays(arrays)


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Serialise named numpy arrays into an ArrayRecord, keeping their order and shapes.

    ``np.asarray(order="C")``, not ``np.ascontiguousarray``, which turns 0-d arrays
    (BatchNorm's ``num_batches_tracked``) into shape ``(1,)``.
    """
    return ArrayRecord(
        {name: Array(np.asarray(value, order="C")) for name, value in arrays.items()}
    )
