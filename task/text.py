"""Text from outside (a node, a file on disk) made safe to print to a terminal or a log.

A node controls its device string and its error texts, and a run folder's files
can be edited: shown raw, a control sequence could set the terminal title, erase
lines or fake a result, and a bidi or zero-width character could reorder or hide
what a table shows. Every such character is shown as its Python escape instead.
"""

from __future__ import annotations

import unicodedata


def escape_unprintable(text: str, limit: int | None = None) -> str:
    r"""``text`` with each character that is not printable shown as its escape.

    Control characters (ESC, CR, BEL, newlines), bidi controls (U+202E) and
    zero-width characters (U+200B) become ``\x1b``, ``\u202e``, ...; a backslash
    stays as it is. ``limit`` cuts the result to that many characters.
    """
    if not text.isprintable() or not text.isascii():
        text = "".join(_escape(char) if _hidden(char) else char for char in text)
    return text if limit is None else text[:limit]


def escape_lines(text: str) -> str:
    """``text`` escaped line by line: its own line breaks stay, everything else as above."""
    return "\n".join(escape_unprintable(line) for line in text.split("\n"))


# Printable by Python's measure, yet invisible or blank: fillers, variation selectors,
# the combining grapheme joiner, the braille blank and Khmer's inherent vowels.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def _hidden(char: str) -> bool:
    """Whether ``char`` is not printable, or prints as nothing a reader could see."""
    if not char.isprintable() or char in _INVISIBLE:
        return True
    code = ord(char)
    variation = 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF
    return variation or unicodedata.category(char) in ("Mn", "Me", "Cf", "Co", "Cn")


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
