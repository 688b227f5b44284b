"""Everything that is not one of the paper's ideas: run as `python -m tools.NAME` from the repository root.
Tools import the idea modules' public names; no idea module imports a tool."""

import argparse
import sys
from dataclasses import fields


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


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (nan, which every comparison refuses, is not let through)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def model_overrides(items, flag: str = "--set") -> dict:
    """["KEY=VALUE", ...] -> {KEY: value} for ModelConfig fields, values parsed as train.py parses them;
    a bad key or value fails here, naming the flag, not at the first model."""
    import runtime
    from model import ModelConfig
    known = {f.name for f in fields(ModelConfig)}
    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or key not in known:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE with KEY a ModelConfig field")
        out[key] = runtime.parse_value(raw)
    ModelConfig(**out)
    return out


def run(main) -> None:
    """A tool's entry point: bad input (a value, a missing or damaged file) or an output that cannot be written
    (a full disk, a read-only folder: runtime.atomic_write names the file) ends in one line on stderr and exit
    status 1, not a traceback; Ctrl-C in one line too, exit status 130 as the shell's (the tools write their
    outputs whole or not at all: a temporary name, renamed into place)."""
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted (SIGINT): stopped", file=sys.stderr)
        sys.exit(130)
