"""Packed records: one data array and one layout array instead of one array per tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies.records import (
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
