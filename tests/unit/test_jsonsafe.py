"""rlhf_cli/jsonsafe.py: values made strict JSON for the manifest, and files read back whatever is in them."""

from __future__ import annotations

import json
import math
import os

import pytest

from rlhf_cli.jsonsafe import json_lines, json_safe, load_json, read_regular

NAN, INF = float("nan"), float("inf")


def _strict(value) -> str:
    """JSON as a strict parser takes it: json.dumps refuses NaN and Infinity with allow_nan=False."""
    return json.dumps(value, allow_nan=False, sort_keys=True)


def test_non_finite_floats_become_null_at_any_depth():
    value = {"loss": NAN, "kl": [0.5, INF, (-INF, 1.0)], "summary": {"headline": {"loss": [3.1, NAN]}}, "ok": 2.5}
    assert json_safe(value) == {
        "loss": None,
        "kl": [0.5, None, [None, 1.0]],
        "summary": {"headline": {"loss": [3.1, None]}},
        "ok": 2.5,
    }
    assert _strict(json_safe(value))


def test_everything_else_is_kept_as_it_is():
    value = {"n": 3, "big": 10**30, "flag": True, "none": None, "text": "NaN", "empty": [], "nested": {}}
    assert json_safe(value) == value and type(json_safe(True)) is bool
    assert json_safe((1, "a")) == [1, "a"]  # a tuple as JSON reads it back
    marker = object()
    assert json_safe(marker) is marker  # not JSON: json.dumps still says so


def test_the_input_is_not_changed():
    value = {"a": [NAN, {"b": INF}]}
    json_safe(value)
    assert math.isnan(value["a"][0]) and value["a"][1]["b"] == INF


def test_numpy_values_become_python_numbers():
    np = pytest.importorskip("numpy")
    value = {
        "f32": np.float32(0.5),
        "f64": np.float64(1.5),
        "i64": np.int64(7),
        "nan32": np.float32("nan"),
        "flag": np.bool_(True),
        "array": np.array([1.0, np.nan]),
        "grid": np.zeros((2, 2), dtype=np.int32),
    }
    out = json_safe(value)
    assert out == {
        "f32": 0.5,
        "f64": 1.5,
        "i64": 7,
        "nan32": None,
        "flag": True,
        "array": [1.0, None],
        "grid": [[0, 0], [0, 0]],
    }
    assert type(out["f64"]) is float and type(out["i64"]) is int and type(out["flag"]) is bool
    assert _strict(out)


def test_torch_values_become_python_numbers():
    torch = pytest.importorskip("torch")
    value = {
        "loss": torch.tensor(2.5),
        "nan": torch.tensor(float("nan")),
        "bf16": torch.tensor(0.5, dtype=torch.bfloat16),
        "steps": torch.tensor([1, 2]),
        "grad": torch.tensor(1.0, requires_grad=True) * 2,
    }
    out = json_safe(value)
    assert out == {"loss": 2.5, "nan": None, "bf16": 0.5, "steps": [1, 2], "grad": 2.0}
    assert _strict(out)


# ---------------------------------------------------------------- reading


def test_json_lines_skips_and_counts_what_is_not_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"step": 1, "loss": NaN}\n\n[1]\n\xff\xfe garbage\n{"step": 2, "kl": Infinity}\r\n{"step": 3, "lo'
    )  # a torn last line
    values, bad = json_lines(path)
    assert bad == 2 and values[1:] == [[1], {"step": 2, "kl": INF}]
    assert math.isnan(values[0]["loss"])  # NaN tokens, as json.dumps writes them, are read


def test_load_json_names_what_is_not_json(tmp_path):
    path = tmp_path / "manifest.json"
    for data, message in ((b"\xff{}", "utf-8"), (b"[" * 100_000, "nested too deeply"), (b"", "Expecting value")):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            load_json(path)
    path.write_text('\ufeff{"run": "demo"}', encoding="utf-8")  # a BOM from an editor
    assert load_json(path) == {"run": "demo"}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("folder", "Is a directory"),
        ("fifo", "not a regular file"),
        ("loop", "Too many levels of symbolic links"),
        ("missing", "No such file or directory"),
    ],
)
def test_read_regular_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, kind, message):
    path = tmp_path / "x"
    {
        "folder": path.mkdir,
        "fifo": lambda: os.mkfifo(path),
        "loop": lambda: path.symlink_to("x"),
        "missing": lambda: None,
    }[kind]()
    with pytest.raises(OSError) as info:
        read_regular(path)  # a FIFO opened the plain way would wait here for a writer
    assert info.value.strerror == message
