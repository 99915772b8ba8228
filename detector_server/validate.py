"""Checks of option values shared by every part of the project: one rule for what an integer is.

Use `check_int(value, field, minimum=...)` wherever an option must be a whole number: `True` and
`False` are refused everywhere (in Python they are ints, in a config file or an RPC they are a
mistake), as are floats such as 2.0, and the error names the field. `is_int` is the bare test.
Test: tests/runtime/test_validate.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError, ReweightOODError

__all__ = ["is_int", "check_int", "check_number"]


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[ReweightOODError] = InputError) -> int:
    """`value` as an int, or `error` naming `field` when it is not an integer in [minimum, maximum]."""
    if not is_int(value) or (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            want = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            want = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum,
                                                                       f"an integer >= {minimum}")
        elif maximum is not None:
            want = f"an integer <= {maximum}"
        else:
            want = "an integer"
        raise error(f"expected {want}, got {value!r}", field=field)
    return int(value)


def check_number(value: Any, field: str, *, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None,
                 error: type[ReweightOODError] = InputError) -> float:
    """`value` as a finite float (ints accepted, bools not), within the bounds given.

    minimum/maximum are inclusive bounds, `above` an exclusive lower bound. NaN and infinities
    are refused: no setting of this project means anything at infinity.
    """
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (minimum is None or value >= minimum)
          and (maximum is None or value <= maximum) and (above is None or value > above))
    if not ok:
        parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None
                 else "", f"<= {maximum}" if maximum is not None else ""]
        bounds = " and ".join(p for p in parts if p)
        raise error(f"expected a finite number{' ' + bounds if bounds else ''}, got {value!r}",
                    field=field)
    return float(value)
