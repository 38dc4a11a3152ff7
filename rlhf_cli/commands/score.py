"""`rlhf score (run.name=<run> | model=<path>) (prompt=... response=... | input=... output=...)`:
score prompt/response pairs with a reward model or any sequence classifier.

One pair on the command line, `prompt=... response=...`, prints a labelled line: `score: <value> (<model>, <what the
value is>)`. A file, `input=<file.jsonl>` with rows {"prompt": str or message list, "response": str}, is written to
`output=<file.jsonl>`: the rows again, each with a "score" added. A tokenizer with a chat template renders the pair
as a conversation, tokenized exactly as `rlhf rm` trains (the score is read at the reply's EOS); without one
(off-the-shelf encoders) the pair is the tokenizer's sentence pair (prompt, response). `text=response` scores the
response alone (e.g. a toxicity classifier). A classifier with several labels needs `label=<index or name>`;
`reduce=prob` turns the logit into a probability (softmax over the labels; a sigmoid for one label or multi-label
classifiers).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_cli.commands.args import parse_key_values, resolve_checkpoint
from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    import torch

EXAMPLE = 'prompt="Hi" response="Hello!"'


@dataclass
class ScoreArgs:
    # A reward model or classifier: a Hugging Face folder or hub id.
    model: str | None = None
    # Instead of model=: the run whose reward model scores, the folder <run.root>/<run.name>/.
    run: str | None = None
    # The folder that holds the runs.
    root: str = "runs"
    # The stage of the run whose final/ scores.
    stage: str = "rm"
    # A .jsonl / .json / .parquet file of {prompt, response} rows to score (with output=).
    input: str | None = None
    # Where the scored rows go (.jsonl).
    output: str | None = None
    # One pair: the prompt and the response to score.
    prompt: str | None = None
    response: str | None = None
    # A system message before the prompt.
    system: str | None = None
    # A classifier with several labels: the one to read (index or name).
    label: str | None = None
    reduce: str = "logit"  # logit | prob
    text: str = "conversation"  # conversation | response
    batch_size: int = 16


ARGS = ScoreArgs  # for `rlhf score --help`


def parse_args(args: list[str]) -> ScoreArgs:
    a = parse_key_values(args, ScoreArgs, EXAMPLE)
    if a.reduce not in ("logit", "prob"):
        raise UserError(f"reduce must be logit or prob, got `{a.reduce}`")
    if a.text not in ("conversation", "response"):
        raise UserError(f"text must be conversation or response, got `{a.text}`")
    if a.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {a.batch_size}")
    single = a.prompt is not None or a.response is not None
    if (a.input is None) == (not single):
        raise UserError(f"give input=<file.jsonl> output=<file.jsonl>, or one pair: {EXAMPLE}")
    if a.input is not None and a.output is None:
        raise UserError("input= needs output=<file.jsonl> to write the scored rows to")
    if single and (not a.prompt or not a.response):
        raise UserError(f"a single pair needs both prompt= and response= (non-empty), e.g. {EXAMPLE}")
    return a


def read_pairs(path: str) -> list[tuple[str, dict]]:
    """(location, row) of every row of a .jsonl / .json / .parquet file; the first bad row is a UserError."""
    from rlhf_cli.data.adapters import check_messages
    from rlhf_cli.data.sources import BadRow, read_local_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"input: no such file {path} (relative paths start from {Path.cwd()})")
    rows = []
    for location, row in read_local_file(file):
        try:
            if isinstance(row, BadRow):
                raise row
            prompt = row.get("prompt")
            if isinstance(prompt, list):
                check_messages(prompt, location, "prompt", final_assistant=False)
            elif not isinstance(prompt, str) or not prompt.strip():
                raise BadRow(location, "field 'prompt' must be a non-empty string or a list of messages")
            if not isinstance(row.get("response"), str) or not row["response"].strip():
                raise BadRow(location, "field 'response' must be a non-empty string")
        except BadRow as bad:
            raise UserError(f"{bad}; each row needs 'prompt' (string or messages) and 'response' (string)") from None
        rows.append((location, row))
    if not rows:
        raise UserError(f"input: {path} holds no rows")
    return rows


def label_index(config: Any, label: str | None) -> int:
    """The output to read: the only one, or `label` given as an index or as a name of config.id2label."""
    n, names = config.num_labels, {str(v): int(k) for k, v in config.id2label.items()}
    if label is None:
        if n == 1:
            return 0
        raise UserError(f"this classifier has {n} labels ({', '.join(names)}); choose one with label=<index or name>")
    index = int(label) if label.isdigit() else names.get(label)
    if index is None or not 0 <= index < n:
        raise UserError(f"label `{label}` is not one of this classifier's labels: {', '.join(names)} (or 0..{n - 1})")
    return index


def encode(tokenizer: Any, location: str, row: dict, a: ScoreArgs) -> dict[str, list[int]]:
    """Token ids (and token_type_ids for sentence pairs) of one row, as the model expects them."""
    from rlhf_cli.data import IGNORE_INDEX, DropExample, tokenize_conversation

    if a.text == "response":
        return dict(tokenizer(row["response"]))
    prompt = row["prompt"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if a.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": a.system}, *messages]
    if not tokenizer.chat_template:
        return dict(tokenizer("\n\n".join(m["content"] for m in messages), row["response"]))
    try:
        ex = tokenize_conversation(
            tokenizer, [*messages, {"role": "assistant", "content": row["response"]}], max_length=sys.maxsize
        )
    except (DropExample, ValueError) as err:
        raise UserError(f"{location}: cannot render this pair with the chat template: {err}") from None
    # As in training: the reply ends at its last trained token (the EOS), not at template glue after it.
    end = max(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX) + 1
    return {"input_ids": ex.input_ids[:end]}


def batch_tensors(encoded: list[dict[str, list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors; the attention mask comes from lengths (pad may equal EOS)."""
    import torch  # here, not at the top: argument errors and --help answer without loading torch

    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
        if key in encoded[0]:
            out[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in encoded])
    lengths = torch.tensor([len(e["input_ids"]) for e in encoded])
    out["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
    return {k: v.to(device) for k, v in out.items()}


def load(path: str) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode) from a folder or hub id, with clear errors."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models.load import TOKENIZER_MARKERS, load_pretrained

    cfg = ModelConfig(name_or_path=path)
    tokenizer = load_pretrained(AutoTokenizer, path, cfg, TOKENIZER_MARKERS)
    model = load_pretrained(AutoModelForSequenceClassification, path, cfg, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # else transformers refuses batches > 1
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return tokenizer, model.eval()


def reading(config: Any, path: str, index: int, reduce: str) -> str:
    """What a score is, for the single-pair line: `reward model runs/x/rm/final, logit of label 0`."""
    kind = "reward model" if config.num_labels == 1 else "classifier"
    name = (config.id2label or {}).get(index)
    label = f"label {index}" + (f" ({name})" if name and name != f"LABEL_{index}" else "")
    return f"{kind} {path}, {'probability' if reduce == 'prob' else 'logit'} of {label}"


def score_rows(rows: list[tuple[str, dict]], path: str, a: ScoreArgs) -> tuple[list[float], str]:
    """The score of every row, and what a score is (`reading`)."""
    import torch

    with torch.no_grad():
        return _score_rows(rows, path, a)


def _score_rows(rows: list[tuple[str, dict]], path: str, a: ScoreArgs) -> tuple[list[float], str]:
    import torch

    from rlhf_cli.models.reward import sequence_logits

    tokenizer, model = load(path)
    index = label_index(model.config, a.label)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded = [encode(tokenizer, location, row, a) for location, row in rows]
    for (location, _), enc in zip(rows, encoded, strict=True):
        if limit and len(enc["input_ids"]) > limit:
            raise UserError(f"{location}: {len(enc['input_ids'])} tokens, more than the model's {limit} positions")
    sigmoid = model.config.num_labels == 1 or model.config.problem_type == "multi_label_classification"
    scores: list[float] = []
    for j in range(0, len(encoded), a.batch_size):
        batch = batch_tensors(encoded[j : j + a.batch_size], tokenizer.pad_token_id, device)
        logits = sequence_logits(model, **batch).float()  # (B, num_labels)
        if a.reduce == "prob":
            logits = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
        scores += logits[:, index].tolist()
    return scores, reading(model.config, path, index, a.reduce)


def main(args: list[str]) -> int:
    a = parse_args(args)
    path = resolve_checkpoint(a.model, a.run, a.root, a.stage)
    if a.input is None:
        (score,), what = score_rows([("command line", {"prompt": a.prompt, "response": a.response})], path, a)
        print(f"score: {score:.6g} ({what})")
        return 0
    rows = read_pairs(a.input)
    scores, _ = score_rows(rows, path, a)
    out = Path(a.output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for (_, row), score in zip(rows, scores, strict=True):
            fh.write(json.dumps({**row, "score": score}) + "\n")
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    print(f"scored {len(scores)} rows with {path} -> {out} (mean {mean:.4g}, std {std:.4g})", file=sys.stderr)
    return 0
