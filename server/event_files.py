"""TensorBoard event files of a run's rounds, written without TensorBoard.

``fedcoord export RUN --format tensorboard -o DIR`` writes one event file in
``DIR/RUN/``, one event per round with its scalars (``results.round_scalars``) at
``step=round``; ``tensorboard --logdir DIR`` then shows every run exported there.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length,
data, masked CRC-32C of the data), each holding one ``tensorflow.Event``
protobuf. The few fields written here are encoded by hand, so the default
install needs neither TensorBoard nor TensorFlow. Formats:
https://github.com/tensorflow/tensorboard/blob/master/tensorboard/summary/writer/record_writer.py
and ``tensorboard/compat/proto/event.proto``, ``summary.proto``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from server.results import round_scalars

FILE_VERSION = "brain.Event:2"
# Protobuf wire types.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLYNOMIAL if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC TFRecord stores: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 as protobuf encodes it: two's complement
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == _BYTES:
        return key + _varint(len(payload)) + payload
    return key + payload


def encode_event(
    wall_time: float, step: int, scalars: Mapping[str, float] | None = None, file_version: str = ""
) -> bytes:
    """A ``tensorflow.Event``: wall_time (1), step (2), file_version (3), summary (5).

    Each scalar is a ``Summary.Value`` with tag (1) and simple_value (2, float32).
    """
    event = _field(1, _FIXED64, struct.pack("<d", wall_time)) + _field(2, _VARINT, _varint(step))
    if file_version:
        event += _field(3, _BYTES, file_version.encode())
    if scalars:
        values = b"".join(
            _field(
                1,
                _BYTES,
                _field(1, _BYTES, tag.encode()) + _field(2, _FIXED32, struct.pack("<f", value)),
            )
            for tag, value in scalars.items()
        )
        event += _field(5, _BYTES, values)
    return event


def event_file_name(created_at: float) -> str:
    """``events.out.tfevents.<created>.fedcoord``: TensorBoard reads files named ``*tfevents*``."""
    return f"events.out.tfevents.{int(created_at)}.fedcoord"


def write_round_events(
    rows: Iterable[Mapping[str, object]], run_name: str, created_at: float, output_dir: Path
) -> Path:
    """Write the rounds' scalars as ``output_dir/run_name/events.out.tfevents...``; return it.

    The file is written whole under a temporary name and renamed, so a second
    export of the same run replaces the first instead of doubling its points.
    """
    run_dir = output_dir / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / event_file_name(created_at)
    temporary = run_dir / f".tmp-export-{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(tf_record(encode_event(created_at, 0, file_version=FILE_VERSION)))
        for row in rows:
            event = encode_event(float(row["ended_at"]), int(row["round"]), round_scalars(row))  # type: ignore[arg-type, call-overload]
            file.write(tf_record(event))
    os.replace(temporary, path)
    return path
