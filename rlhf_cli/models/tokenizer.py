"""Tokenizers: the shipped tiny one, and any other loaded with a pad token distinct from EOS and a chat template
that renders.

Torch-free for the tokenizers it can identify without transformers' AutoTokenizer (which imports torch through
its config classes): the built-in one and the checkpoints made from it. So `rlhf explain` of an online stage, which
must tokenize the prompts to count those it keeps, answers in about a second.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_cli.errors import UserError
from rlhf_cli.models.source import TOKENIZER_MARKERS, is_builtin, load_pretrained, resolve_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf_cli.config.schema import ModelConfig

log = logging.getLogger(__name__)

NEW_PAD_TOKEN = "<|pad|>"
# Tokens that exist in some vocabularies only to serve as padding (or are never produced by the chat format),
# tried in order before adding a new token. Reusing one keeps the vocabulary, and so the embedding matrix, the
# same size as the checkpoint's: no resize, and LoRA adapters stay loadable on the untouched base model.
# Llama 3.1+: <|finetune_right_pad_id|>. Qwen2 chat: <|endoftext|> while eos is <|im_end|> (Qwen's own choice).
# GPT-2 style vocabularies, where <|endoftext|> *is* the eos, never match because the eos is excluded.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|endoftext|>")
# The class AutoTokenizer picks for a folder whose tokenizer_config.json names `TokenizersBackend`, with no
# auto_map, and whose config.json (if any) has one of these model types: their registered tokenizer class is
# neither a corrected hub class nor Mistral's, so AutoTokenizer ends at `TokenizersBackend` too
# (transformers 5 models/auto/tokenization_auto.py; tests/unit/test_tokenizer_class.py checks the equality).
DIRECT_CLASSES = {"TokenizersBackend": ("llama",)}


def tiny_tokenizer_path() -> Path:
    """The shipped tokenizer folder (a plain Hugging Face tokenizer folder inside the installed package)."""
    return Path(str(resources.files("rlhf_cli.assets").joinpath("tiny_tokenizer")))


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Load the shipped tokenizer: pad `<|pad|>` = 0, eos `<|end|>` = 1, no BOS, right padding, chat template."""
    return tokenizer_class(str(tiny_tokenizer_path())).from_pretrained(str(tiny_tokenizer_path()))


def tokenizer_class(name: str) -> Any:
    """The class to load the tokenizer at `name` with: the one named in a local folder's tokenizer_config.json when
    AutoTokenizer is known to pick that same class (`DIRECT_CLASSES`), imported without torch; otherwise
    AutoTokenizer itself, which decides from the model config, hub quirks and remote code."""
    try:
        source, local = resolve_source(name, TOKENIZER_MARKERS)
        folder = Path(source)
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text()) if local else {}
        model_cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    except (UserError, OSError, ValueError):  # let AutoTokenizer's own load report the problem
        tok_cfg, model_cfg = {}, {}
    name_ = tok_cfg.get("tokenizer_class")
    types = DIRECT_CLASSES.get(name_, ())
    if (
        name_
        and "auto_map" not in tok_cfg
        and "auto_map" not in model_cfg
        and model_cfg.get("model_type", "llama") in types
    ):
        import transformers

        return getattr(transformers, name_)
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for `model_cfg`: right padding, a pad token distinct from EOS, and a chat template.

    Embedding rows for a newly added pad token are created by `load_causal_lm` (it resizes whenever
    len(tokenizer) exceeds the checkpoint's embedding rows), so load the tokenizer first and pass it in.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if is_builtin(name):
        tok = tiny_tokenizer()
    else:
        tok = load_pretrained(tokenizer_class(name), name, model_cfg, TOKENIZER_MARKERS)
    if tok.eos_token_id is None:
        raise UserError(
            f"tokenizer '{name}' has no eos_token; every response must end with one. Use another "
            f"tokenizer (model.tokenizer) or a checkpoint whose tokenizer_config.json sets eos_token"
        )
    ensure_distinct_pad(tok)
    if model_cfg.chat_template:
        tok.chat_template = model_cfg.chat_template
    if not tok.chat_template:
        raise UserError(
            f"tokenizer '{name}' has no chat template; set model.chat_template to a Jinja template string "
            f"(rlhf_cli/assets/tiny_tokenizer/tokenizer_config.json has a minimal one)"
        )
    _check_chat_template(tok, from_config=bool(model_cfg.chat_template))
    tok.padding_side = "right"  # offline training batches; generation code switches to left for prompts
    return tok


def ensure_distinct_pad(tok: PreTrainedTokenizerBase) -> bool:
    """Give `tok` a pad token different from its EOS. True when a new token was added (the vocabulary grew).

    pad == eos is treated like no pad (GPT-2, base Qwen): collators that mask `ids == pad` would drop the EOS
    label and reward models would read the score one token early (docs/algorithms.md section 1.5).
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    vocab = tok.get_vocab()
    taken = {tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in taken:
            tok.pad_token = candidate
            log.info("pad token: reusing %s (id %d)", candidate, vocab[candidate])
            return False
    tok.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
    log.info("pad token: added %s (id %d); the model's embeddings will be resized", NEW_PAD_TOKEN, tok.pad_token_id)
    return True


def _check_chat_template(tok: PreTrainedTokenizerBase, from_config: bool) -> None:
    """Render one exchange now, so a broken template fails at load time with the key to fix, not mid-run."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        tok.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # jinja2 syntax/undefined errors and templates' own raise_exception()
        where = "model.chat_template" if from_config else "the tokenizer's chat template (set model.chat_template)"
        raise UserError(f"{where} does not render a user/assistant exchange: {e}") from e
