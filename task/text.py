"""Text from outside (a node, a file on disk) made safe to print to a terminal or a log.

A node controls its device string and its error texts, and a run folder's files
can be edited: shown raw, a control sequence could set the terminal title, erase
lines or fake a result, and a bidi or zero-width character could reorder or hide
what a table shows. Every such character is shown as its Python escape instead.
"""

from __future__ import annotations


def escape_unprintable(text: str, limit: int | None = None) -> str:
    r"""``text`` with each character that is not printable shown as its escape.

    Control characters (ESC, CR, BEL, newlines), bidi controls (U+202E) and
    zero-width characters (U+200B) become ``\x1b``, ``\u202e``, ...; a backslash
    stays as it is. ``limit`` cuts the result to that many characters.
    """
    if not text.isprintable():
        text = "".join(char if char.isprintable() else _escape(char) for char in text)
    return text if limit is None else text[:limit]


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
