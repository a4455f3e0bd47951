"""argparse ``type=`` converters and flag names shared by the ``train`` and ``eval`` commands."""

from __future__ import annotations

import argparse
from typing import Callable


def _number(convert: Callable, ok: Callable, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive int")
nonnegative_int = _number(int, lambda v: v >= 0, "an int >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")


def comma_list(convert: Callable, what: str) -> Callable[[str], tuple]:
    """A converter of ``"64,128,256"`` into a tuple of ``convert``-ed items."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(item) for item in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def cli_flag(argument: str) -> str:
    """The command-line flag of a Python argument: ``"max_length"`` -> ``"--max-length"``."""
    return "--" + argument.replace("_", "-")
