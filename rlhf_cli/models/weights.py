"""Is a weight file whole? Cheap checks of the files a model folder or a checkpoint holds (headers, not tensors), and
the errors that mean a file is cut short or corrupt, so that one message can name the file and the fix instead of a
library traceback."""

from __future__ import annotations

import errno
import json
import pickle
import zipfile
from pathlib import Path

from safetensors import SafetensorError

from rlhf_cli.errors import UserError

# (single file, index of shards) in transformers' order of preference: it reads safetensors when they exist.
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # a LoRA adapter folder (model.lora.merge=false)


def is_unreadable_file_error(err: BaseException) -> bool:
    """True for the errors safetensors and torch.load raise on a truncated or corrupt file (not on a wrong config).
    torch raises a plain RuntimeError for a truncated file: "PytorchStreamReader failed reading zip archive" for the
    zip format, "unexpected EOF ... The file might be corrupted" for the older pickle one; and an OSError EINVAL when
    the cut leaves part of the zip directory (its reader then seeks before the start of the file)."""
    if isinstance(err, (SafetensorError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)):
        return True
    if isinstance(err, OSError):
        return err.errno == errno.EINVAL
    markers = ("PytorchStreamReader", "unexpected EOF", "might be corrupted")
    return isinstance(err, RuntimeError) and any(m in str(err) for m in markers)


def error_summary(err: BaseException) -> str:
    """`Type: first line of the message`, for a library error quoted inside one of ours."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else 'no detail'}"


def check_weight_files(folder: Path) -> None:
    """Refuse, before from_pretrained, a local folder whose weights are truncated or missing (an interrupted copy or
    download): the library's own error names neither the file nor the fix. Cheap: it reads headers, not tensors."""
    for path in weight_files(folder):
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else torch_file_problem(path)
        if problem:
            raise UserError(f"{path} is incomplete or corrupt ({problem}): re-export or re-download it")


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers reads from `folder`: the single file or every shard its index names (the
    safetensors layout when there is one), and a LoRA adapter's. A shard named by the index but absent is an error."""
    found: list[Path] = []
    for single, index in WEIGHT_LAYOUTS:
        if (folder / single).is_file():
            found.append(folder / single)
        elif (folder / index).is_file():
            found += _index_shards(folder / index)
        if found:
            break
    found += [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()][:1]
    return found


def _index_shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each one present."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index} is incomplete or corrupt (not a shard index): re-export or re-download it") from None
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise UserError(
            f"{index} names {', '.join(missing)}, missing from {index.parent}: the folder is incomplete; "
            f"re-export or re-download it"
        )
    return [index.parent / name for name in shards]


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None. The format: an 8-byte little-endian header length,
    a JSON header of tensor byte ranges (`data_offsets`, relative to the end of the header), then the data; a
    complete file ends exactly where the last range does."""
    size = path.stat().st_size
    if size < 8:
        return f"file is {size} bytes, less than the 8-byte header length"
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if 8 + length > size:
            return f"file is {size} bytes, its header alone says {8 + length}"
        try:
            header = json.loads(fh.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "its header is not a safetensors header"
    return None if expected == size else f"file is {size} bytes, its header says {expected}"


def torch_file_problem(path: Path) -> str | None:
    """What is wrong with a file written by torch.save (a .bin, a DeepSpeed .pt), or None. Since torch 1.6 it is a zip
    archive whose directory sits at the end, so a truncated one has none; an older pickle file has no cheap check (its
    load error is caught by `is_unreadable_file_error`)."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return f"file is {path.stat().st_size} bytes and its zip directory is missing or damaged"
