"""The torch-free tokenizer path (models/tokenizer.tokenizer_class) loads exactly what AutoTokenizer loads for the
built-in tokenizer and the checkpoints made from it, and leaves every other folder to AutoTokenizer."""

import json

import pytest
from transformers import AutoTokenizer, TokenizersBackend

from rlhf_cli.config.schema import TinyModelConfig
from rlhf_cli.models.tiny import build_tiny_llama
from rlhf_cli.models.tokenizer import tiny_tokenizer, tiny_tokenizer_path, tokenizer_class

TEXT = "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n4, unlike 5.<|end|>\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint as a stage's `final/` holds it: config.json (model_type llama), weights, tokenizer files."""
    folder = tmp_path_factory.mktemp("final")
    tok = tiny_tokenizer()
    build_tiny_llama(TinyModelConfig(), tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    assert a(TEXT)["input_ids"] == b(TEXT)["input_ids"]
    assert (a.pad_token, a.eos_token, a.bos_token, len(a)) == (b.pad_token, b.eos_token, b.bos_token, len(b))
    assert a.chat_template == b.chat_template
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert a.apply_chat_template(probe, tokenize=False) == b.apply_chat_template(probe, tokenize=False)


def test_builtin_and_its_checkpoints_load_as_autotokenizer_does(checkpoint):
    for folder in (tiny_tokenizer_path(), checkpoint):
        cls = tokenizer_class(str(folder))
        assert cls is TokenizersBackend
        same_tokenizer(cls.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder)))


def edited_copy(src, dst, tokenizer_config=None, config=None):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    for name, edit in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
        if edit:
            data = json.loads((dst / name).read_text())
            data.update(edit)
            (dst / name).write_text(json.dumps(data))
    return str(dst)


@pytest.mark.parametrize(
    "edit",
    [
        {"tokenizer_config": {"tokenizer_class": "Qwen2Tokenizer"}},  # a model-specific class: AutoTokenizer's rules
        {"config": {"model_type": "mistral"}},  # a registered class AutoTokenizer may prefer
        {"tokenizer_config": {"auto_map": {"AutoTokenizer": [None, "tok.MyTokenizer"]}}},  # remote code
    ],
)
def test_anything_else_is_left_to_autotokenizer(checkpoint, tmp_path, edit):
    assert tokenizer_class(edited_copy(checkpoint, tmp_path / "copy", **edit)) is AutoTokenizer


def test_a_hub_id_is_left_to_autotokenizer():
    assert tokenizer_class("Qwen/Qwen2.5-0.5B-Instruct") is AutoTokenizer
