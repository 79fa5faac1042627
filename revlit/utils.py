"""Small shared helpers."""

from __future__ import annotations

import math


def as_float(value: float | int | str, name: str = "value") -> float:
    """A float from a number or a fraction string such as ``"8/255"``.

    Raises:
        ValueError: one line naming the parameter when the value is not a finite number.
    """
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"{name}: cannot read '{value}' as a number (e.g. 0.5 or 8/255)"
            ) from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value}")
    return out
