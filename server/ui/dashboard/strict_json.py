"""Strict JSON at the dashboard's edge: request bodies read with limits, replies without NaN.

A request body is refused with one line saying why (answered 400) when it is not
UTF-8, not JSON, nested deeper than :data:`MAX_JSON_DEPTH`, or holds a number that
is not finite or an integer longer than :data:`MAX_INT_DIGITS` digits (which int64
and SQLite could not hold). Everything the dashboard sends is strict JSON: NaN and
infinities become ``null``.
"""

from __future__ import annotations

import json
import math
import re

MAX_JSON_DEPTH = 8
MAX_INT_DIGITS = 18  # every integer of 18 digits fits in int64
WEIGHT_BODY_KEYS = ("partition", "weight")
WEIGHT_BODY_HINT = 'send {"partition": <integer>, "weight": <number>}'
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class BodyError(ValueError):
    """A request body that is refused, with the reason (answered 400)."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets in strings ignored)."""
    depth = deepest = 0
    for bracket in _BRACKET.finditer(_STRING.sub('""', text)):
        depth = depth + 1 if bracket.group() in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def parse_json_body(raw: bytes) -> object:
    """The JSON value of a request body.

    Raises
    ------
    BodyError
        If the body is not UTF-8 JSON, is nested too deeply, or holds a number
        that is not finite or an integer too long for int64.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("the body must be UTF-8 JSON") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise BodyError(f"the body nests {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as error:
        raise BodyError(f"the body must be JSON ({error.msg} at character {error.pos})") from None


def validate_weight_body(body: object) -> tuple[int, float]:
    """``(partition, weight)`` of a weight request ``{"partition": int, "weight": number}``.

    The range of each is checked where the command is queued
    (:func:`server.record.operations.request_weight`); this checks the shape and types.

    Raises
    ------
    BodyError
        If the body is not an object with exactly these keys, of these types.
    """
    if not isinstance(body, dict):
        raise BodyError(f"the body must be a JSON object: {WEIGHT_BODY_HINT}")
    unknown = sorted(set(body) - set(WEIGHT_BODY_KEYS))
    missing = [key for key in WEIGHT_BODY_KEYS if key not in body]
    if unknown or missing:
        problems = [f"unknown key {key[:40]!r}" for key in unknown[:3]]
        problems += [f"no {key!r}" for key in missing]
        raise BodyError(f"{', '.join(problems)}: {WEIGHT_BODY_HINT}")
    partition, weight = body["partition"], body["weight"]
    if type(partition) is not int:
        raise BodyError(f"partition must be an integer, got {_kind(partition)}")
    if type(weight) not in (int, float):
        raise BodyError(f"weight must be a number, got {_kind(weight)}")
    return partition, float(weight)


def json_safe(value: object) -> object:
    """``value`` with NaN and infinities as None and non-JSON values as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def dumps(value: object) -> str:
    """``value`` as strict JSON text (see :func:`json_safe`)."""
    return json.dumps(json_safe(value), allow_nan=False)


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise BodyError(f"an integer of {digits} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> object:
    raise BodyError(f"{name} is not JSON; send a finite number")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )
