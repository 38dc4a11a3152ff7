"""Sequence classifiers as scorers (a reward model, or any classifier read at one label): loading, the label to read,
encoding a (prompt, response) pair the way the model expects it, and the scores of a batch.

Shared by `rlhf score` (commands/score.py) and the online stages' model reward (rollout/rewards.py). Nothing heavy
is imported at module level: `rlhf score` imports this module before its arguments are checked, and argument errors
and `--help` answer without loading torch or transformers.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    import torch

REDUCTIONS = ("logit", "prob")
TEXTS = ("conversation", "response")


def load_classifier(path: str, setting: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode, fp32) from a folder or hub id, with clear errors (a missing folder, an
    unfetchable hub id, truncated weights end in one message naming them). A causal LM or a classifier without its
    head's weights would score with a random head: refused, naming `setting` (e.g. `stage.reward.model=stage:sft`),
    before loading for a local folder, from transformers' missing keys after loading for a hub id."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models.kind import check_loaded_head, check_scorer
    from rlhf_cli.models.load import TOKENIZER_MARKERS, load_pretrained
    from rlhf_cli.models.reward import quiet_load_report

    check_scorer(path, setting)
    cfg = ModelConfig(name_or_path=path)
    tokenizer = load_pretrained(AutoTokenizer, path, cfg, TOKENIZER_MARKERS)
    with quiet_load_report():  # transformers' table of new keys; check_loaded_head says what matters
        model, info = load_pretrained(
            AutoModelForSequenceClassification, path, cfg, dtype=torch.float32, output_loading_info=True
        )
    check_loaded_head(path, model, info, setting)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # else transformers refuses batches > 1
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return tokenizer, model.eval()


def label_index(config: Any, label: str | None) -> int:
    """The output to read: the only one, or `label` given as an index or as a name of config.id2label."""
    n, names = config.num_labels, {str(v): int(k) for k, v in config.id2label.items()}
    if label is None:
        if n == 1:
            return 0
        raise UserError(f"this classifier has {n} labels ({', '.join(names)}); choose one with label=<index or name>")
    label = str(label)
    index = int(label) if label.isdigit() else names.get(label)
    if index is None or not 0 <= index < n:
        raise UserError(f"label `{label}` is not one of this classifier's labels: {', '.join(names)} (or 0..{n - 1})")
    return index


def uses_sigmoid(config: Any) -> bool:
    """`reduce=prob` is a sigmoid for one label or a multi-label classifier, a softmax over the labels otherwise."""
    return config.num_labels == 1 or config.problem_type == "multi_label_classification"


def encode(
    tokenizer: Any, location: str, row: dict, text: str = "conversation", system: str | None = None
) -> dict[str, list[int]]:
    """Token ids (and token_type_ids for sentence pairs) of one row {"prompt": str or messages, "response": str}, as
    the model expects them: the chat template's rendering, exactly as `rlhf rm` trains (ending at the reply's EOS);
    without a template the tokenizer's sentence pair (prompt, response); `text="response"` the response alone.
    `system` is put before the prompt unless it has a system message. `location` names the row in errors."""
    from rlhf_cli.data import IGNORE_INDEX, DropExample, tokenize_conversation

    if text == "response":
        return dict(tokenizer(row["response"]))
    prompt = row["prompt"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
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
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
        if key in encoded[0]:
            out[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in encoded])
    lengths = torch.tensor([len(e["input_ids"]) for e in encoded])
    out["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
    return {k: v.to(device) for k, v in out.items()}


def classifier_scores(model: Any, batch: dict[str, torch.Tensor], index: int, reduce: str) -> torch.Tensor:
    """The score of each sequence of a right-padded batch (`batch_tensors`, (B, T) each): the head output at label
    `index`, as a logit or (`reduce=prob`) a probability -> (B,) fp32. Decoders are read at the last real token (the
    EOS). `model`: a plain model, a PeftModel or a DeepSpeed engine."""
    from rlhf_cli.models.reward import sequence_logits, unwrap

    logits = sequence_logits(model, **batch).float()  # (B, num_labels)
    if reduce == "prob":
        logits = logits.sigmoid() if uses_sigmoid(unwrap(model).config) else logits.softmax(dim=-1)
    return logits[:, index]
