"""Reading raw rows from a local file, the package's built-in assets, or a Hugging Face hub dataset.

Every row comes with a location string so a bad row can be reported where the user can find it:
`path:LINE` (1-based, as editors count) for JSON lines, `path:row N` (0-based, as `data[N]` / pandas
index) for a .json list or .parquet file, `<hub id>[split] row N` (0-based, as `ds[N]`) for a hub dataset.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.errors import DataError

# Files shipped with the package; `builtin:<name>` reads `<ASSETS_DIR>/<name>.jsonl`.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# Suffixes that mark a source as a local file rather than a hub id (hub ids such as
# "databricks/databricks-dolly-15k" contain slashes too, so a slash alone proves nothing).
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class BadRow(Exception):
    """A row that cannot become an example: where it is and why. Raised by adapters, collected by callers.

    `load_rows` also puts a BadRow in place of the row dict for a line that is not valid JSON, so the
    `bad_rows` policy treats unreadable lines and malformed rows the same way.
    """

    location: str
    reason: str

    def __post_init__(self) -> None:
        super().__init__(f"{self.location}: {self.reason}")

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


Row = dict | BadRow


def load_rows(source: str, split: str = "train", subset: str | None = None) -> list[tuple[str, Row]]:
    """Read every row of `source` as (location, row) pairs, in file order.

    `row` is the decoded JSON object, or a BadRow when the line is not valid JSON / not an object.
    A local file or builtin asset holds one split, `train`; another split name must be a path to a
    second local file (e.g. `data.eval_split=data/eval.jsonl`).
    """
    if source.startswith("builtin:"):
        path = _builtin_path(source[len("builtin:") :])
        return _single_split(path, split, source)
    path = Path(source).expanduser()
    if path.is_file():
        return _single_split(path, split, source)
    if path.is_dir():
        # A folder of data files: `datasets` picks the split from the file names (train.jsonl, test.jsonl...).
        return _load_hub(str(path), split, subset)
    if source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise DataError(
            f"data.source: file not found: {source} (resolved from {Path.cwd()}). "
            "Check the path, or use a hub dataset id or builtin:<name>."
        )
    return _load_hub(source, split, subset)


def builtin_file(name: str) -> Path | None:
    """The packaged file of `builtin:<name>`, or None when there is none."""
    path = ASSETS_DIR / f"{name}.jsonl"
    return path if path.is_file() else None


def _builtin_path(name: str) -> Path:
    path = ASSETS_DIR / f"{name}.jsonl"
    if builtin_file(name) is None:
        available = sorted(p.stem for p in ASSETS_DIR.glob("*.jsonl"))
        raise DataError(
            f"data.source: no built-in dataset 'builtin:{name}' (looked for {path}). "
            f"Available: {', '.join('builtin:' + a for a in available) or 'none'}."
        )
    return path


def _single_split(path: Path, split: str, source: str) -> list[tuple[str, Row]]:
    if split == "train":
        return read_local_file(path)
    other = Path(split).expanduser()
    if other.is_file():
        return read_local_file(other)
    raise DataError(
        f"data split '{split}': {source} is a single file, which has only the 'train' split. "
        "Set data.eval_split=null to hold out data.eval_fraction of it, or set the split to the path of "
        "another local file."
    )


def read_local_file(path: Path) -> list[tuple[str, Row]]:
    """Rows of one local .jsonl[.gz] / .json[.gz] / .parquet file (format chosen by suffix)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _read_parquet(path)
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.source: cannot read {path}: {err}") from err
    if name.endswith((".json", ".json.gz")):
        return _read_json_text(path, text)
    return _read_json_lines(path, text)


def _read_text(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _read_json_lines(path: Path, text: str) -> list[tuple[str, Row]]:
    rows: list[tuple[str, Row]] = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        location = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((location, BadRow(location, f"not valid JSON ({err.msg} at column {err.colno})")))
            continue
        rows.append((location, row if isinstance(row, dict) else _not_an_object(location, row)))
    return rows


def _read_json_text(path: Path, text: str) -> list[tuple[str, Row]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # Several top-level values: a JSON-lines file with a .json name, which `datasets` accepts too.
            return _read_json_lines(path, text)
        raise DataError(f"data.source: {path}:{err.lineno} is not valid JSON ({err.msg}).") from err
    if not isinstance(data, list):
        raise DataError(
            f"data.source: {path} holds a JSON {type(data).__name__}; expected a list of row objects "
            "(or one object per line in a .jsonl file)."
        )
    rows: list[tuple[str, Row]] = []
    for i, row in enumerate(data):
        location = f"{path}:row {i}"
        rows.append((location, row if isinstance(row, dict) else _not_an_object(location, row)))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Row]]:
    # pyarrow comes with `datasets`; reading directly avoids copying a local file into the HF cache.
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise DataError(f"data.source: cannot read parquet file {path}: {err}") from err
    return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist())]


def _load_hub(source: str, split: str, subset: str | None) -> list[tuple[str, Row]]:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except (DatasetsError, OSError, ValueError) as err:
        # ValueError covers an unknown split or config name; OSError covers network and file errors.
        raise DataError(
            f"data.source: cannot load dataset '{source}' (subset={subset}, split={split}): {str(err).rstrip('.')}. "
            "Check the hub id, data.subset and data.split, or point data.source at a local file."
        ) from err
    return [(f"{source}[{split}] row {i}", dict(row)) for i, row in enumerate(ds)]


def _not_an_object(location: str, value: object) -> BadRow:
    return BadRow(location, f"expected a JSON object, got {type(value).__name__}")
