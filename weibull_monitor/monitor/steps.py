"""What ``observe(step)`` accepts as a step: the number of optimizer updates applied so far, a whole number
0 <= step < 2**63 (what the store's INTEGER holds).

Accepted: ``int`` and anything that is one (``numpy.int64``, a 0-d integer tensor: ``operator.index`` works), and a
float holding a whole number (``10.0``, as some loggers pass steps). Refused, with the reason: ``None``, ``bool``,
strings, NaN, +-Inf, fractional floats (``10.9`` is not step 10), negative steps and steps of 2**63 or more.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

__all__ = ["MAX_STEP", "checked_step"]

MAX_STEP = (1 << 63) - 1


def checked_step(value: object) -> tuple[int | None, str | None]:
    """(step, None) for a usable step, else (None, why it is refused)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return None, f"step {value!r} is not a number of optimizer updates"
    try:
        step = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except Exception:
        if not isinstance(value, Real) and not hasattr(value, "__float__"):
            return None, f"step {value!r} ({type(value).__name__}) is not a number of optimizer updates"
        try:
            number = float(value)  # type: ignore[arg-type]
        except Exception:  # a tensor of several elements, an object whose __float__ raises
            return None, f"step {value!r} is not a number of optimizer updates"
        if not math.isfinite(number):
            return None, f"step {value!r} is not finite"
        if number != math.floor(number):
            return None, f"step {value!r} is not a whole number of optimizer updates"
        step = int(number)
    if step < 0:
        return None, f"step {step} is negative (steps count optimizer updates from 0)"
    if step > MAX_STEP:
        return None, f"step {step} is beyond what the run store can hold (2**63 - 1)"
    return step, None
