"""Small shared helpers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


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


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``prog: error: ...``), exit 2.

    The full usage stays available with ``--help``.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (the error names the bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
