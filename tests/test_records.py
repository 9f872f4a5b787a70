"""Packed records: one data array and one layout array instead of one array per tensor."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies.records import (
    MAX_LAYOUT_BYTES,
    PACKED_DATA,
    PACKED_LAYOUT,
    MalformedRecordError,
    arrays_to_numpy,
    is_packed,
    numpy_to_arrays,
    pack_arrays,
    record_like,
    unpack_arrays,
)


def model_like() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "head.weight": rng.standard_normal((3, 5)),  # float64, odd byte count before it
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "fc.weight": rng.standard_normal((10, 20)).astype(np.float32),
    }


def layout_record(layout: object, data: np.ndarray) -> ArrayRecord:
    header = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED_DATA: Array(data), PACKED_LAYOUT: Array(header)})


def owner(array: np.ndarray) -> object:
    """The object whose memory a view ends up in (follows ``.base`` to its end)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base if array.base is not None else array


def test_round_trip_keeps_names_order_dtypes_shapes_and_values():
    arrays = model_like()

    restored = arrays_to_numpy(pack_arrays(arrays))

    assert list(restored) == list(arrays)
    for name, value in arrays.items():
        assert restored[name].dtype == value.dtype, name
        assert restored[name].shape == value.shape, name
        np.testing.assert_array_equal(restored[name], value)


def test_unpacked_arrays_are_aligned_read_only_views_of_one_buffer():
    restored = unpack_arrays(pack_arrays(model_like()))

    assert len({id(owner(value)) for value in restored.values()}) == 1
    for value in restored.values():
        assert not value.flags.writeable
        assert value.ctypes.data % value.dtype.itemsize == 0


def test_packed_message_has_a_fixed_handful_of_objects():
    arrays = model_like()

    named = len(get_all_nested_objects(numpy_to_arrays(arrays)))
    packed = len(get_all_nested_objects(pack_arrays(arrays)))

    assert named == 1 + 2 * len(arrays)  # the record, each array and its chunk
    assert packed == 5


def test_record_like_answers_in_the_form_it_was_sent():
    arrays = model_like()

    assert is_packed(record_like(arrays, pack_arrays(arrays)))
    assert not is_packed(record_like(arrays, numpy_to_arrays(arrays)))
    assert list(record_like(arrays, numpy_to_arrays(arrays))) == list(arrays)


def test_object_arrays_are_refused_when_packing():
    with pytest.raises(ValueError, match="'names' has dtype object"):
        pack_arrays({"names": np.array(["a", None], dtype=object)})


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ({"version": 2, "arrays": []}, "not version 1"),
        ({"arrays": [["w", "<f4", [2]]]}, "not version 1"),
        ({"version": 1, "arrays": [["w", "<f4", [2]], ["w", "<f4", [2]]]}, "names an array twice"),
        ({"version": 1, "arrays": [["w", "|O", [2]]]}, "bad packed layout entry"),
        ({"version": 1, "arrays": [["w", "not-a-dtype", [2]]]}, "bad packed layout entry"),
        ({"version": 1, "arrays": [["w", "<f4", [-2]]]}, "bad packed layout entry"),
        ({"version": 1, "arrays": [["w", "<f4"]]}, "bad packed layout entry"),
        ({"version": 1, "arrays": [["w", "<f4", [100]]]}, "ends inside array 'w'"),
        ({"version": 1, "arrays": [["w", "<f4", [1]]]}, "byte\\(s\\) beyond its layout"),
        ({"version": 1}, "not version 1"),
        ([1, 2], "not version 1"),
        ({"version": 1, "arrays": [7]}, "bad packed layout entry 7"),
    ],
)
def test_malformed_layouts_are_refused_with_a_reason(layout, match):
    record = layout_record(layout, np.zeros(8, dtype=np.uint8))

    with pytest.raises(MalformedRecordError, match=match):
        arrays_to_numpy(record)


def test_unreadable_layout_and_extra_or_missing_parts_are_refused():
    good = pack_arrays({"w": np.ones(2, dtype=np.float32)})
    garbage = ArrayRecord(
        {PACKED_DATA: good[PACKED_DATA], PACKED_LAYOUT: Array(np.frombuffer(b"{no", np.uint8))}
    )
    extra = ArrayRecord({**dict(good.items()), "w": Array(np.ones(2, dtype=np.float32))})
    missing = ArrayRecord({PACKED_DATA: good[PACKED_DATA]})

    deep = ArrayRecord(
        {
            PACKED_DATA: good[PACKED_DATA],
            PACKED_LAYOUT: Array(np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8)),
        }
    )

    with pytest.raises(MalformedRecordError, match="unreadable packed layout"):
        arrays_to_numpy(garbage)
    with pytest.raises(MalformedRecordError, match="unreadable packed layout"):
        arrays_to_numpy(deep)
    with pytest.raises(MalformedRecordError, match="holds exactly"):
        arrays_to_numpy(extra)
    with pytest.raises(MalformedRecordError, match="holds exactly"):
        arrays_to_numpy(missing)


def test_packed_data_of_another_dtype_is_refused():
    layout = {"version": 1, "arrays": [["w", "<f4", [2]]]}
    record = layout_record(layout, np.zeros(2, dtype=np.float32))

    with pytest.raises(MalformedRecordError, match="1-d uint8"):
        arrays_to_numpy(record)


# ---------------------------------------------------------------------------
# Arrays from untrusted nodes: everything checked before anything is allocated
# ---------------------------------------------------------------------------


def npy_bytes(value: np.ndarray) -> bytes:
    return Array(value).data


def edited(**fields: object) -> ArrayRecord:
    """A record of one float32 (2, 3) Array ``w`` with some of its fields replaced."""
    record = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    for name, value in fields.items():
        setattr(record["w"], name, value)  # a node's Array is not bound by Array's checks
    return record


def claims(shape: tuple[int, ...], payload: bytes = b"\0" * 4) -> bytes:
    """.npy bytes whose header claims ``shape`` of float32, followed by ``payload``."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    text = text.ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"stype": "torch.Tensor"}, "stype 'torch.Tensor' is not 'numpy.ndarray'"),
        ({"dtype": "object"}, "dtype 'object' is not a plain numeric dtype"),
        ({"dtype": "<U4"}, "dtype '<U4' is not a plain numeric dtype"),
        ({"dtype": "f4,f4"}, "dtype 'f4,f4' is not a plain numeric dtype"),
        ({"dtype": "datetime64[s]"}, "is not a plain numeric dtype"),
        ({"dtype": ">f4"}, "dtype '>f4' is not little-endian"),
        ({"dtype": "not-a-dtype"}, "dtype 'not-a-dtype' is not a dtype"),
        ({"dtype": "S" + "9" * 40}, "is not a dtype name"),
        ({"dtype": {"names": ["a"], "formats": ["f4"]}}, "is not a dtype name"),
        ({"dtype": None}, "dtype None is not a dtype name"),
        ({"shape": (float("inf"), 3)}, "dimension inf is not a non-negative integer"),
        ({"shape": (1e300,)}, "dimension 1e+300 is not a non-negative integer"),
        ({"shape": (2.0, 3)}, "dimension 2.0 is not a non-negative integer"),
        ({"shape": (-2, -3)}, "dimension -2 is not a non-negative integer"),
        ({"shape": (True, 6)}, "dimension True is not a non-negative integer"),
        ({"shape": ("2", 3)}, "dimension '2' is not a non-negative integer"),
        ({"shape": 6}, "shape 6 is not a list"),
        ({"shape": (1,) * 33}, "at most 32 dimensions"),
        ({"data": b""}, "data is empty"),
        ({"data": b"junk"}, "data is not .npy"),
        ({"data": "text"}, "data is a str, not bytes"),
        ({"data": b"\x93NUMPY\x09\x00" + b"\0" * 8}, ".npy format version 9 is not supported"),
        ({"data": b"\x93NUMPY\x02\x00\xff\xff\xff\x7f"}, "header of 2147483647 bytes exceeds"),
        ({"data": b"\x93NUMPY\x01\x00\xff\x00{"}, "header runs past the end of the data"),
        ({"data": npy_bytes(np.zeros((2, 3), np.float32))[:-1]}, "holds 23 byte(s)"),
        ({"data": npy_bytes(np.zeros((2, 3), np.float32)) + b"x"}, "holds 25 byte(s)"),
        ({"data": npy_bytes(np.zeros((3, 2), np.float32))}, "does not match the declared"),
        ({"data": npy_bytes(np.zeros((2, 3), np.float64))}, "does not match the declared"),
        ({"data": npy_bytes(np.zeros((2, 3), ">f4"))}, "'>f4' is not little-endian"),
        ({"data": claims((2, 3)).replace(b"'descr'", b"'descx'")}, "exactly descr, fortran"),
        ({"data": claims((2, 3)).replace(b"False", b"'no' ")}, "fortran_order is not a bool"),
        ({"data": claims((2, 3)).replace(b"{", b"[", 1)}, "not a Python literal"),
        ({"shape": (10**12,), "data": claims((10**12,))}, "needs 4000000000000"),
        ({"shape": (2**62, 2**62), "data": claims((2**62, 2**62))}, "byte(s) after its"),
    ],
)
def test_malformed_arrays_are_refused_with_a_reason_before_any_allocation(fields, match):
    # Prepare
    record = edited(**fields)

    # Execute / Assert
    with pytest.raises(MalformedRecordError, match=f"^array 'w': .*{re.escape(match)}"):
        arrays_to_numpy(record)


def test_a_record_value_that_is_not_an_array_is_refused():
    # Prepare: a node's pickled record is not bound by ArrayRecord's type checks
    record = ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})
    record.__dict__["_data"]["w"] = "not an array"

    # Execute / Assert
    with pytest.raises(MalformedRecordError, match="array 'w': is a str, not an Array"):
        arrays_to_numpy(record)


@pytest.mark.parametrize(
    "value",
    [
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.zeros((0, 3), dtype=np.float16),
        np.array(3, dtype=np.int64),
        np.array([True, False]),
    ],
)
def test_every_plain_npy_layout_numpy_writes_is_read_exactly(value):
    # Execute
    read = arrays_to_numpy(ArrayRecord({"w": Array(value)}))["w"]

    # Assert
    np.testing.assert_array_equal(read, value)
    assert read.dtype == value.dtype and read.shape == value.shape
    assert not read.flags.writeable


def test_a_version_2_header_is_read():
    # Prepare
    buffer = io.BytesIO()
    value = np.arange(4, dtype=np.float32)
    np.lib.format.write_array(buffer, value, version=(2, 0))
    array = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=buffer.getvalue())

    # Execute / Assert
    np.testing.assert_array_equal(arrays_to_numpy(ArrayRecord({"w": array}))["w"], value)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ("Infinity", "dimension inf is not a non-negative integer"),
        ("-Infinity", "dimension -inf is not a non-negative integer"),
        ("NaN", "dimension nan is not a non-negative integer"),
        ("1e300", "dimension 1e+300 is not a non-negative integer"),
        ("2.0", "dimension 2.0 is not a non-negative integer"),
        ('"2"', "dimension '2' is not a non-negative integer"),
        ("true", "dimension True is not a non-negative integer"),
        ("null", "dimension None is not a non-negative integer"),
        ("[2]", "dimension [2] is not a non-negative integer"),
        ("99999999999999999999999", "ends inside array 'w'"),
    ],
)
def test_packed_dimensions_must_be_finite_non_negative_integers(shape, match):
    # Prepare: the layout as a node could write it (JSON allows Infinity and NaN)
    text = f'{{"version": 1, "arrays": [["w", "<f4", [{shape}]]]}}'.encode()
    record = ArrayRecord(
        {
            PACKED_DATA: Array(np.zeros(8, dtype=np.uint8)),
            PACKED_LAYOUT: Array(np.frombuffer(text, dtype=np.uint8)),
        }
    )

    # Execute / Assert
    with pytest.raises(MalformedRecordError, match=re.escape(match)):
        arrays_to_numpy(record)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (["w", "<f4", [2], "extra"], "not [name, dtype, shape]"),
        ([7, "<f4", [2]], "not [name, dtype, shape]"),
        ({"name": "w"}, "not [name, dtype, shape]"),
        ("abc", "not [name, dtype, shape]"),
        (["w", ">f4", [2]], "dtype '>f4' is not little-endian"),
        (["w", ["<f4"], [2]], "is not a dtype name"),
    ],
)
def test_packed_layout_entries_of_another_form_are_refused(entry, match):
    # Prepare
    record = layout_record({"version": 1, "arrays": [entry]}, np.zeros(8, dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(MalformedRecordError, match=re.escape(match)):
        arrays_to_numpy(record)


def test_an_oversized_packed_layout_is_refused_unread():
    # Prepare
    record = ArrayRecord(
        {
            PACKED_DATA: Array(np.zeros(8, dtype=np.uint8)),
            PACKED_LAYOUT: Array(np.full(MAX_LAYOUT_BYTES + 1, ord(" "), dtype=np.uint8)),
        }
    )

    # Execute / Assert
    with pytest.raises(MalformedRecordError, match="at most 1048576 bytes"):
        arrays_to_numpy(record)
