"""`rlhf score [run.name=demo | model=<path>] (prompt=... response=... | input=... output=...)`:
score prompt/response pairs with a reward model or any sequence classifier: the run's rm/final (run.name= defaults to
`demo`, as in the stages), or model=.

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
from typing import Any

from rlhf_cli.commands.args import DEFAULT_RUN, parse_key_values, resolve_checkpoint
from rlhf_cli.errors import UserError

# Light at import (torch and transformers load inside them): the loading, label and encoding helpers the online
# stages share with this command.
from rlhf_cli.models.classifier import REDUCTIONS, TEXTS, batch_tensors, classifier_scores, encode, label_index
from rlhf_cli.models.classifier import load_classifier as load
from rlhf_cli.models.kind import check_scorer

EXAMPLE = 'prompt="Hi" response="Hello!"'


@dataclass
class ScoreArgs:
    # A reward model or classifier: a Hugging Face folder or hub id.
    model: str | None = None
    # Instead of model=: the run whose reward model scores, the folder <run.root>/<run.name>/ (the stages' default run
    # unless model= is given).
    run: str | None = DEFAULT_RUN
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
    if a.reduce not in REDUCTIONS:
        raise UserError(f"reduce must be logit or prob, got `{a.reduce}`")
    if a.text not in TEXTS:
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

    tokenizer, model = load(path, model_setting(a))
    index = label_index(model.config, a.label)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded = [encode(tokenizer, location, row, a.text, a.system) for location, row in rows]
    for (location, _), enc in zip(rows, encoded, strict=True):
        if limit and len(enc["input_ids"]) > limit:
            raise UserError(f"{location}: {len(enc['input_ids'])} tokens, more than the model's {limit} positions")
    scores: list[float] = []
    for j in range(0, len(encoded), a.batch_size):
        batch = batch_tensors(encoded[j : j + a.batch_size], tokenizer.pad_token_id, device)
        scores += classifier_scores(model, batch, index, a.reduce).tolist()
    return scores, reading(model.config, path, index, a.reduce)


def model_setting(a: ScoreArgs) -> str:
    """The arguments that name the model, for messages: `model=<path>` or `run.name=<run> stage=<stage>`."""
    return f"model={a.model}" if a.model is not None else f"run.name={a.run} stage={a.stage}"


def main(args: list[str]) -> int:
    a = parse_args(args)
    path = resolve_checkpoint(a.model, a.run, a.root, a.stage)
    # Before reading the input or importing torch: a causal LM would score with a random head (made-up scores).
    check_scorer(path, model_setting(a), f"; `rlhf generate {model_setting(a)}` answers with a causal LM")
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
