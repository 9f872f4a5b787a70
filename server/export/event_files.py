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

import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from server.record.results import round_scalars

FILE_VERSION = "brain.Event:2"
# Protobuf wire types.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8
# 9999-12-31T23:59:59Z: the latest wall time an export accepts.
LATEST_TIME = 253402300799.0


class EventFileError(ValueError):
    """A run whose rows cannot become an event file; the message is one line."""


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


def _checked_time(value: object, what: str) -> float:
    """``value`` as a wall time, or EventFileError when it is not one (a changed run.db)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= LATEST_TIME
    ):
        raise EventFileError(
            f"{what} in run.db is {repr(value)[:60]}, not a time between 1970 and 9999; "
            "--format csv or jsonl export the rows as stored"
        )
    return float(value)


def _float32_scalars(
    scalars: Mapping[str, float], server_round: int, left_out: list[str]
) -> dict[str, float]:
    """The scalars TensorBoard can hold (float32, UTF-8 tags); the others named in ``left_out``."""
    kept = {}
    for tag, value in scalars.items():
        try:
            tag.encode()
            struct.pack("<f", value)
        except (OverflowError, UnicodeError):
            left_out.append(f"{tag[:60]!r} at round {server_round}")
            continue
        kept[tag] = value
    return kept


def write_round_events(
    rows: Iterable[Mapping[str, object]], run_name: str, created_at: object, output_dir: Path
) -> tuple[Path, list[str]]:
    """Write the rounds' scalars as ``output_dir/run_name/events.out.tfevents...``.

    Return the file and the values left out, each as ``'TAG' at round K``: a value
    beyond float32's range (about 3.4e38; TensorBoard stores float32) is left out, as
    are NaN and infinities (``results.round_scalars``), so no chart gets an inf point.
    ``run_name`` must be one plain path component (the run folder's name), and every
    time (``created_at``, each round's ``ended_at``) a finite time in [1970, 9999]:
    otherwise EventFileError, before anything is written. The file is written whole
    under a temporary name and renamed, so a second export of the same run replaces
    the first instead of doubling its points; on any failure the temporary file is
    removed.
    """
    if run_name in ("", ".", "..") or "/" in run_name or "\0" in run_name:
        raise EventFileError(f"{run_name!r} is not a run folder name")
    start = _checked_time(created_at, f"{run_name}: created_at")
    events: list[bytes] = []
    left_out: list[str] = []
    for row in rows:
        server_round = row.get("round")
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise EventFileError(
                f"{run_name}: a round number in run.db is {repr(server_round)[:60]}, not an integer"
            )
        ended_at = _checked_time(
            row.get("ended_at"), f"{run_name}: round {server_round}'s ended_at"
        )
        scalars = _float32_scalars(round_scalars(row), server_round, left_out)
        events.append(encode_event(ended_at, server_round, scalars))
    run_dir = output_dir / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / event_file_name(start)
    temporary = run_dir / f".tmp-export-{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            file.write(tf_record(encode_event(start, 0, file_version=FILE_VERSION)))
            for event in events:
                file.write(tf_record(event))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path, left_out
