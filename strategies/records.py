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

import ast
import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NamedArrays = dict[str, np.ndarray]

_NPY_MAGIC = b"\x93NUMPY"
NPY_STYPE = "numpy.ndarray"
PACKED_DATA = "fedcoord.packed"
PACKED_LAYOUT = "fedcoord.layout"
PACKED_ALIGNMENT = 64
PACKED_VERSION = 1
_PACKABLE_KINDS = "biuf"
# Limits on what a node may declare, checked before anything is allocated from it.
MAX_NDIM = 32
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default max_header_size
MAX_LAYOUT_BYTES = 1 << 20
_MAX_DTYPE_TEXT = 32


class MalformedRecordError(ValueError):
    """An Array or packed record whose layout or data does not add up."""


def validate_dtype(dtype_text: object) -> np.dtype:
    """Return the dtype named by ``dtype_text`` if it is plain, little-endian and numeric.

    Raises
    ------
    MalformedRecordError
        Unless ``dtype_text`` is a short string naming a bool, integer or float
        dtype that is not big-endian (no object, string, structured or datetime dtypes).
    """
    if not isinstance(dtype_text, str) or len(dtype_text) > _MAX_DTYPE_TEXT:
        raise MalformedRecordError(f"dtype {_short(dtype_text)} is not a dtype name")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError, OverflowError, SyntaxError) as error:
        raise MalformedRecordError(f"dtype {dtype_text!r} is not a dtype: {error}") from None
    if dtype.kind not in _PACKABLE_KINDS or dtype.fields is not None:
        raise MalformedRecordError(f"dtype {dtype_text!r} is not a plain numeric dtype")
    if dtype.byteorder not in "<=|":
        raise MalformedRecordError(f"dtype {dtype_text!r} is not little-endian")
    return dtype


def validate_shape(shape: object) -> tuple[int, ...]:
    """Return ``shape`` as a tuple if it is a list of at most 32 non-negative integers.

    Raises
    ------
    MalformedRecordError
        For anything else: a dimension that is a float (``Infinity``, ``1e300``,
        ``2.0``), a bool, a string or negative, or a shape that is not a list.
    """
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise MalformedRecordError(
            f"shape {_short(shape)} is not a list of at most {MAX_NDIM} dimensions"
        )
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise MalformedRecordError(
                f"shape {_short(shape)}: dimension {_short(dim)} is not a non-negative integer"
            )
    return tuple(shape)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _npy_header(data: bytes) -> tuple[str, int]:
    """Return the .npy header text and where the values start, without trusting either."""
    if not data:
        raise MalformedRecordError("data is empty")
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise MalformedRecordError("data is not .npy (no .npy magic string)")
    major = data[6]
    if major == 1:
        start, length = 10, int.from_bytes(data[8:10], "little")
    elif major in (2, 3) and len(data) >= 12:
        start, length = 12, int.from_bytes(data[8:12], "little")
    else:
        raise MalformedRecordError(f".npy format version {major} is not supported")
    if length > MAX_NPY_HEADER_BYTES:
        raise MalformedRecordError(f".npy header of {length} bytes exceeds {MAX_NPY_HEADER_BYTES}")
    if start + length > len(data):
        raise MalformedRecordError(".npy header runs past the end of the data")
    return data[start : start + length].decode("latin1").strip(), start + length


def _npy_header_fields(text: str) -> tuple[str, bool, tuple[int, ...]]:
    """``(descr, fortran_order, shape)`` of a .npy header, parsed as literals only."""
    try:
        header = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise MalformedRecordError(".npy header is not a Python literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise MalformedRecordError(".npy header does not hold exactly descr, fortran_order, shape")
    descr, fortran_order = header["descr"], header["fortran_order"]
    if not isinstance(fortran_order, bool):
        raise MalformedRecordError(".npy header's fortran_order is not a bool")
    if not isinstance(descr, str):
        raise MalformedRecordError(".npy header's descr is not a plain dtype")
    return descr, fortran_order, validate_shape(header["shape"])


def npy_view(array: Array) -> np.ndarray:
    """Return a read-only numpy view of an Array's .npy bytes, without copying them.

    Everything the Array declares is checked before anything is allocated: its
    stype is ``numpy.ndarray``; its dtype is plain, little-endian and numeric
    (:func:`validate_dtype`); its shape is a list of non-negative integers
    (:func:`validate_shape`); its data is a .npy payload whose header names that
    dtype and shape and is followed by exactly the bytes they need. The
    canonical header numpy writes is compared as text (no ``ast.literal_eval``:
    37 us per array measured); any other header is parsed as literals.

    Raises
    ------
    MalformedRecordError
        Naming the first thing that does not add up.
    """
    if not isinstance(array, Array):
        raise MalformedRecordError(f"is a {type(array).__name__}, not an Array")
    if array.stype != NPY_STYPE:
        raise MalformedRecordError(f"stype {_short(array.stype)} is not {NPY_STYPE!r}")
    dtype, shape = validate_dtype(array.dtype), validate_shape(array.shape)
    data = array.data
    if not isinstance(data, bytes):
        raise MalformedRecordError(f"data is a {type(data).__name__}, not bytes")
    text, offset = _npy_header(data)
    descr = np.lib.format.dtype_to_descr(dtype)
    canonical = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    fortran_order = False
    if text != canonical:
        header_descr, fortran_order, header_shape = _npy_header_fields(text)
        if validate_dtype(header_descr) != dtype or header_shape != shape:
            raise MalformedRecordError(
                f".npy header ({header_descr}, {header_shape}) does not match the declared "
                f"dtype and shape ({dtype}, {shape})"
            )
    needed = math.prod(shape) * dtype.itemsize
    if len(data) - offset != needed:
        raise MalformedRecordError(
            f"data holds {len(data) - offset} byte(s) after its .npy header; "
            f"shape {shape} of {dtype} needs {needed}"
        )
    view = np.frombuffer(data, dtype=dtype, offset=offset, count=math.prod(shape))
    view = view.reshape(shape, order="F" if fortran_order else "C")
    view.flags.writeable = False
    return view


def arrays_to_numpy(record: ArrayRecord) -> NamedArrays:
    """Return an ArrayRecord's arrays by name, as read-only zero-copy views.

    Reads named and packed records alike. Copy an array (``np.array(a)``) before
    writing into it.

    Raises
    ------
    MalformedRecordError
        If an Array or a packed record's layout or data does not add up
        (see :func:`npy_view`); nothing is allocated from a claimed size first.
    """
    if is_packed(record):
        return unpack_arrays(record)
    return {name: _named_view(name, array) for name, array in record.items()}


def _named_view(name: str, array: Array) -> np.ndarray:
    try:
        return npy_view(array)
    except MalformedRecordError as error:
        raise MalformedRecordError(f"array {_short(name)}: {error}") from None


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
            f"got {_short(sorted(map(str, record)))}"
        )
    text = _named_view(PACKED_LAYOUT, record[PACKED_LAYOUT])
    if text.dtype != np.uint8 or text.ndim != 1 or text.size > MAX_LAYOUT_BYTES:
        raise MalformedRecordError(
            f"packed layout must be 1-d uint8 of at most {MAX_LAYOUT_BYTES} bytes, "
            f"got {text.dtype} {text.shape}"
        )
    try:
        parsed = json.loads(text.tobytes())
    except (ValueError, RecursionError) as error:
        raise MalformedRecordError(f"unreadable packed layout: {error}") from None
    entries = parsed.get("arrays") if isinstance(parsed, dict) else None
    if not isinstance(entries, list) or parsed.get("version") != PACKED_VERSION:
        raise MalformedRecordError(f"packed layout is not version {PACKED_VERSION}")
    layout = [_layout_entry(entry) for entry in entries]
    if len({name for name, _, _ in layout}) != len(layout):
        raise MalformedRecordError("packed layout names an array twice")
    return layout


def _layout_entry(entry: object) -> tuple[str, np.dtype, tuple[int, ...]]:
    """One ``[name, dtype, shape]`` entry of a packed layout, checked."""
    if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str):
        raise MalformedRecordError(
            f"bad packed layout entry {_short(entry)}: not [name, dtype, shape]"
        )
    name, dtype_text, shape = entry
    try:
        return name, validate_dtype(dtype_text), validate_shape(shape)
    except MalformedRecordError as error:
        raise MalformedRecordError(f"bad packed layout entry for {_short(name)}: {error}") from None


def unpack_arrays(record: ArrayRecord) -> NamedArrays:
    """Read a packed record as named, read-only views into its data (no copy).

    Raises
    ------
    MalformedRecordError
        If the layout is unreadable, names an array twice, or does not match the
        data's length exactly.
    """
    layout = _parse_layout(record)
    data = _named_view(PACKED_DATA, record[PACKED_DATA])
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
