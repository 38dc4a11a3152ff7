"""A model folder whose `model.safetensors` is cut short (an interrupted copy or download) ends in one clear message
naming the file, exit code 2 and no traceback, from a stage and from the tools."""

import contextlib
import io

import pytest
from conftest import FAST, rlhf
from test_errors import _one_clear_error

from rlhf_cli import cli
from rlhf_cli.config.schema import TinyModelConfig
from rlhf_cli.models import build_tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def cut_folder(tmp_path_factory):
    """(folder, the message naming its cut model.safetensors)."""
    folder = tmp_path_factory.mktemp("cut") / "model"
    tok = tiny_tokenizer()
    tiny = TinyModelConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    build_tiny_llama(tiny, tok, 0).save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(full - 1000)
    return folder, f"{weights} is incomplete or corrupt (file is {full - 1000} bytes, its header says {full})"


def _in_process(*args):
    """`rlhf ...` in this process (dispatch, error handling and exit code as on the command line)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, err.getvalue()


@pytest.mark.parametrize("tool", ["generate", "score"])
def test_tools_name_the_cut_file(cut_folder, tool):
    folder, message = cut_folder
    code, err = _in_process(tool, f"model={folder}", "prompt=Hi", *(["response=Hello"] if tool == "score" else []))
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err and "re-export or re-download it" in err


def test_stage_names_the_cut_file(cut_folder, runs, tmp_path):
    folder, message = cut_folder
    res = rlhf("sft", *FAST, f"run.root={runs}", f"model.name_or_path={folder}", cwd=tmp_path)
    _one_clear_error(res, message, "re-export or re-download it")
