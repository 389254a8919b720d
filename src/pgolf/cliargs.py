"""argparse value types shared by the stage CLIs: a bad number is a one-line usage error, exit 2."""

from __future__ import annotations

import argparse
import math


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (seconds, budgets)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value
