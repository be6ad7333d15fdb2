"""The one error type the CLI turns into a single line and a non-zero exit."""


import reprlib
from typing import Any


class QPlanError(Exception):
    """A user-facing error: the message is one line that says what is wrong and how to fix it."""


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxset = 2, 4, 4, 4, 4
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 60, 60, 40


def shown(value: Any) -> str:
    """``repr(value)`` for a message, bounded as it is built: a few items, a few levels, 60 characters of a
    string (the repr of a huge or self-repeating value is never made)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length():,} bits>"
    return _SHOW.repr(value)
