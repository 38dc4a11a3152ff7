"""Train the built-in tiny model's tokenizer and write rlhf_cli/assets/tiny_tokenizer/.

A byte-level BPE (so any text round-trips, even characters the sample data never shows) trained on the text of
rlhf_cli/assets/sample_dolly.jsonl, with the chat special tokens below. Deterministic: same data -> same
tokenizer.json.

    python scripts/make_tiny_tokenizer.py                   # rewrites the shipped folder
    python scripts/make_tiny_tokenizer.py --out /tmp/tok
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "rlhf_cli" / "assets"
DEFAULT_DATA = ASSETS / "sample_dolly.jsonl"
DEFAULT_OUT = ASSETS / "tiny_tokenizer"
VOCAB_SIZE = 2048

PAD, END = "<|pad|>", "<|end|>"
# The trainer gives special tokens the first ids in this order: <|pad|> = 0, <|end|> = 1, roles 2..4.
# No BOS token: the template starts every turn with a role marker already, and without one there is no way for
# `tokenizer(text)` and `apply_chat_template` to disagree about a leading BOS (the usual double-BOS bug).
SPECIAL_TOKENS = [PAD, END, "<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is "<|role|>\n" + content + "<|end|>\n"; the assistant's trained tokens are content + <|end|> + "\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(data_path: Path) -> list[str]:
    """The text fields of every row, in file order (the order matters for determinism only, not for merges)."""
    texts: list[str] = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.extend(row[k] for k in ("instruction", "context", "response") if row[k])
    return texts


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Newlines and digits each stand alone, then GPT-2 style byte-level splitting.

    Isolating "\\n" makes the chat template prefix-stable: the "\\n" after `<|assistant|>` can never merge with
    the start of the content, so the generation prompt's ids are a prefix of the full conversation's ids.
    Single digits make arithmetic learnable for a tiny model (the Llama-1/2 choice), instead of arbitrary
    number chunks like "152" vs "15"+"2".
    """
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is noise; stops merging before vocab_size on a tiny corpus
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_hf(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        padding_side="right",  # offline training batches are right-padded; generation code sets "left" itself
        clean_up_tokenization_spaces=False,  # would alter text like "a ." on decode; byte-level needs no cleanup
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build(data_path: Path, out: Path) -> PreTrainedTokenizerFast:
    hf = to_hf(train(corpus(data_path)))
    # save_jinja_files=False keeps the template inside tokenizer_config.json: the package ships
    # `rlhf_cli/assets/*/*.json` only, and a separate chat_template.jinja would be left out of the wheel.
    hf.save_pretrained(str(out), save_jinja_files=False)
    return hf


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    hf = build(args.data, args.out)
    print(f"wrote tokenizer ({len(hf)} tokens, pad={hf.pad_token_id}, eos={hf.eos_token_id}) to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
