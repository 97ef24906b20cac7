"""Parsing of configuration enums with an error that lists the valid values."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: str, what: str) -> E:
    """Return the member of ``cls`` whose value is ``value``.

    Raises:
        ValueError: no such member; the message names ``what`` and lists the valid values.
    """
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in cls)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None
