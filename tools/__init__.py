"""Everything that is not one of the paper's ideas: run as `python -m tools.NAME` from the repository root.
Tools import the idea modules' public names; no idea module imports a tool."""

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a length or a count of 0 is refused, not evaluated as nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value
