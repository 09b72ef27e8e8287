"""Checks of settings, shared by every record that validates its fields.

Each check raises a ValueError that names the field, says what is valid and shows what was
given, so a bad value in a config, on the command line or in the Python API fails at once and
clearly, never as a NaN that trains silently or a traceback from deep inside a step.
"""

from __future__ import annotations

import enum
import math
import os
from typing import Any, Iterable, TypeVar, Union

E = TypeVar("E", bound=enum.Enum)
PathLike = Union[str, "os.PathLike[str]"]  # what every function taking a file or folder accepts


def parse_enum(kind: type[E], value: Any, field: str) -> E:
    """``kind(value)``, or a ValueError listing the valid values of ``field``."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in kind)
        raise ValueError(f"{field} must be one of {valid}; got {value!r}") from None


def is_number(value: Any) -> bool:
    """True for a finite int or float (bools, NaN and infinities are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(field: str, value: Any, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in the interval [low, high] (ends excluded where ``*_open``)."""
    if not is_number(value) or (value <= low if low_open else value < low) or \
            (value >= high if high_open else value > high):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{field} must be a finite number in {left}{low:g}, {high:g}{right}; got {value!r}")


def check_positive(field: str, value: Any, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``)."""
    if not is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{field} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def check_fraction(field: str, value: Any) -> None:
    """A finite number in [0, 1]."""
    check_number(field, value, 0.0, 1.0)


def check_integer(field: str, value: Any, minimum: int = 1) -> None:
    """An int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{field} must be {wanted}, got {value!r}")


def check_bool(field: str, value: Any) -> None:
    """True or False, not a string such as "False" (which Python would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false; got {value!r}")


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def parse_bool(field: str, value: Any) -> bool:
    """A boolean from True / False, 1 / 0, or the words true / false / 1 / 0 (any case); anything
    else is refused (a string "False" must never be read as true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{field} must be true or false (also 1 / 0); got {value!r}")


def check_choice(field: str, value: Any, valid: Iterable[Any]) -> None:
    """One of ``valid``."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{field} must be one of {valid}; got {value!r}")


def check_known_keys(what: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Refuse keys of ``given`` that are not in ``valid``, naming the valid ones."""
    valid = sorted(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid ones are {valid}")
