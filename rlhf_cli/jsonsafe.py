"""JSON that strict readers accept, and JSON read back from files a crash or a hand edit may have damaged.

Writing: Python's json module writes NaN and Infinity for non-finite floats, which is not JSON (jq, JavaScript,
most other languages' parsers refuse the file), and refuses numpy / torch scalars. `json_safe` turns the first into
null and the second into Python numbers, for manifest.json. metrics.jsonl keeps its NaN tokens: its readers here
accept them, and a NaN loss is worth seeing as NaN.

Reading: `read_regular`, `load_json` and `json_lines` raise OSError for a file that cannot be read (anything but a
regular file included: a FIFO there would block a plain open for ever) and ValueError for a file that is not JSON;
`json_lines` skips and counts the lines that are not JSON instead, so one torn line costs one row.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-Infinity) made None, through dicts, lists and tuples at any depth
    (tuples become lists, as JSON reads them back), and numpy / torch scalars, arrays and tensors made Python
    numbers and lists. Anything else is returned as it is; `obj` itself is not changed."""
    if obj is None or isinstance(obj, (str, int)):  # bool is an int
        return obj
    if isinstance(obj, float):  # numpy.float64 is one too: made a plain float
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    # numpy scalars and arrays, torch tensors (0-d ones included): found by what they have, so that neither library
    # is imported here; tolist() gives Python numbers, nested lists for arrays.
    if hasattr(obj, "shape") and callable(getattr(obj, "tolist", None)):
        return json_safe(obj.tolist())
    return obj


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at `path` (a link to one is followed). OSError when there is none, when it
    cannot be read, and for anything else there: a folder, a link loop, a device, a FIFO (opened without blocking
    and refused, where a plain open would wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_json(path: Path) -> Any:
    """The JSON value of the file at `path`: OSError as `read_regular`, ValueError when it is not JSON (bytes that
    are not UTF-8, -16 or -32 included) or nests deeper than the parser can follow."""
    data = read_regular(path)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def json_lines(path: Path) -> tuple[list[Any], int]:
    """(the JSON value of each line of the JSON Lines file at `path`, how many lines are not JSON). Blank lines are
    left out of both; NaN and Infinity tokens read as floats. OSError as `read_regular`."""
    values, bad = [], 0
    for line in read_regular(path).splitlines():
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))  # bytes: the encoding is detected, a BOM allowed
        except (ValueError, RecursionError):  # a torn last line, bytes that are not text
            bad += 1
    return values, bad
