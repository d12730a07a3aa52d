"""Text that reaches a terminal: names from checkpoint files and stores are escaped before they are printed, so a
tensor named with terminal escapes cannot clear the screen, move the cursor or forge lines of a table."""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 and C1 control characters, DEL, line and paragraph separators, and the bidirectional overrides and isolates
# that reorder what a terminal shows ("Trojan source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` on one line, every control character (newlines included) written as an escape (``\\x1b``,
    ``\\x0a``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(text))
