"""Line-by-line reading of the UTF-8 data files the commands take (JSONL, TSV), with every
error at ``file:line``: the training rows and the evaluation corpus, queries and qrels."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Iterator, Union

__all__ = ["text_lines", "parse_json_line"]

PathLike = Union[str, "os.PathLike[str]"]


def _split_lines(text: str) -> list[str]:
    """The lines of ``text`` without their breaks; ``\\n``, ``\\r\\n`` and ``\\r`` end a line, as
    in Python's text mode (``str.splitlines`` would also split inside JSON strings at U+2028)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def text_lines(path: PathLike, *, error: type[ValueError] = ValueError) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its break) for every non-blank line of a UTF-8 file.

    A ``.gz`` suffix reads through gzip; a byte-order mark at the start is skipped. Raises
    ``FileNotFoundError`` for a missing file and ``error`` (a ValueError subclass) starting with
    ``file:line:`` for bytes that are not UTF-8 (with the column and the byte) or a damaged
    gzip stream. Reads bytes line by line (so a line number is known when decoding fails) and
    streams: the file is never held whole.

    Example:
        >>> for lineno, line in text_lines("rows.jsonl"):  # doctest: +SKIP
        ...     row = parse_json_line(line, f"rows.jsonl:{lineno}")
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}: no such file")
    lineno = 0
    try:
        with gzip.open(name, "rb") if name.endswith(".gz") else open(name, "rb") as f:
            for raw in f:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    # The sentinel keeps an empty last piece and makes its length the 1-based column.
                    before = _split_lines(raw[: e.start].decode("utf-8") + "|")
                    raise error(
                        f"{name}:{lineno + len(before)}: not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                        f"column {len(before[-1])} ({e.reason}); save the file as UTF-8 (e.g. iconv -f "
                        "latin1 -t utf-8)"
                    ) from None
                if lineno == 0 and text.startswith("\ufeff"):
                    text = text[1:]
                for line in _split_lines(text):
                    lineno += 1
                    if line.strip():
                        yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise error(f"{name}:{lineno + 1}: damaged gzip data ({e})") from None


def parse_json_line(line: str, where: str, *, error: type[ValueError] = ValueError):
    """``json.loads(line)``; a failure raises ``error`` starting with ``where`` (``file:line``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an over-long integer, nesting too deep
        raise error(f"{where}: invalid JSON ({e})") from None
