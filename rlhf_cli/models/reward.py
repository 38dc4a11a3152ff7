"""Reward models: a scalar head on a decoder or encoder backbone, loaded as `AutoModelForSequenceClassification`,
and the score of each sequence read where docs/algorithms.md section 3.2 says (the last real token for decoders).

Two pooling conventions exist in transformers, and the code keys on the head's name:
- decoders (Llama, Qwen2, Mistral, GPT-2...) call their head `score`, run it on every token and pool the rightmost
  token that is not `pad_token_id`. With pad == EOS that is the token *before* the EOS, so we capture the per-token
  head output with a forward hook and read it at the last position of the attention mask instead;
- encoders (BERT, RoBERTa, DeBERTa...) call it `classifier` and pool the first token ([CLS]) through their own
  pooler, where padding cannot matter: their own logits are the score.

Encoder tokenizers have no chat template and usually no EOS. `load_reward_tokenizer` gives them one that renders a
conversation as the usual sentence-pair input, `[CLS] prompt [SEP] reply [SEP]` (EOS = [SEP]), so the preference
data path (chat-template tokenization with a shared prompt) works unchanged and `final/` carries the template.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.errors import UserError
from rlhf_cli.losses.reward import last_token_index
from rlhf_cli.models.load import (
    TOKENIZER_MARKERS,
    apply_lora,
    disable_dropout,
    ensure_distinct_pad,
    is_builtin,
    load_pretrained,
    load_tokenizer,
    resize_for_tokenizer,
    unwrap,
)
from rlhf_cli.models.tiny import build_tiny_llama

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

# Written by `rlhf rm` next to the exported weights: the mean / std of its scores on the held-out replies, so that
# `stage.reward.normalize=rm_stats` uses the statistics of the very model that scores (wherever it is copied).
REWARD_STATS_FILE = "reward_stats.json"

# Prefix-stable (each turn renders the same whatever follows), so SFT's prefix-difference tokenization applies:
# user/system turns are plain text separated by a blank line; an assistant turn is `[SEP] text [SEP]`.
ENCODER_CHAT_TEMPLATE = (
    "{{ cls_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ sep_token }}{{ m['content'] }}"
    "{{ eos_token }}{% else %}{% if not loop.first and messages[loop.index0 - 1]['role'] != 'assistant' %}\n\n"
    "{% endif %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ sep_token }}{% endif %}"
)


def load_reward_tokenizer(model_cfg: ModelConfig) -> Any:
    """`load_tokenizer` for decoders; for an encoder tokenizer (with [CLS]/[SEP], lacking a chat template or an
    EOS) EOS becomes [SEP] and the chat template `model.chat_template` or ENCODER_CHAT_TEMPLATE. Right padding."""
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if is_builtin(name):
        return load_tokenizer(model_cfg)
    tok = load_pretrained(AutoTokenizer, name, model_cfg, TOKENIZER_MARKERS)
    encoder = tok.cls_token is not None and tok.sep_token is not None
    if not encoder or (tok.chat_template and tok.eos_token is not None):
        return load_tokenizer(model_cfg)  # loads again (cheap, cached) and applies the decoder checks
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token
    tok.chat_template = model_cfg.chat_template or tok.chat_template or ENCODER_CHAT_TEMPLATE
    ensure_distinct_pad(tok)
    tok.padding_side = "right"
    return tok


def load_reward_model(model_cfg: ModelConfig, source: str, tokenizer: Any, seed: int = 0) -> PreTrainedModel:
    """A one-label sequence classifier from `source` (a causal-LM folder such as sft/final, any HF folder or hub id,
    decoder or encoder, or `builtin:tiny-llama`), in fp32, matching `tokenizer`, with dropout off.

    A head that the checkpoint does not hold (or holds with another number of labels) is new: its weight is drawn
    from N(0, 1/sqrt(d_model + 1)) with `seed` and its bias is zero (docs/algorithms.md section 3.4); a trained
    one-label head (a reward model) is kept as it is.
    """
    if is_builtin(source):
        model, new_keys = _tiny_reward_model(model_cfg, tokenizer, seed), {"score.weight"}
    else:
        model, new_keys = _pretrained_reward_model(model_cfg, source, tokenizer)
    resize_for_tokenizer(model, tokenizer)
    # The tokenizer's pad (transformers pools on it and refuses batches without one); `sync_special_ids` would
    # also touch the generation config, which sequence classifiers do not have.
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a reward model never generates; no KV cache in its forwards
    disable_dropout(model)
    name, head = scalar_head(model)
    if f"{name}.weight" in new_keys:
        init_reward_head(head, seed)
        log.info("reward head %s: new, N(0, 1/sqrt(%d + 1)), bias 0", name, head.in_features)
    return model


def _reward_config(config: Any) -> Any:
    """One label, dropout probabilities 0 (so functional attention dropout is off too)."""
    config.num_labels = 1
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def _tiny_reward_model(model_cfg: ModelConfig, tokenizer: Any, seed: int) -> PreTrainedModel:
    """The built-in tiny Llama's backbone (seeded as for SFT) under a new `score` head."""
    causal = build_tiny_llama(model_cfg.tiny, tokenizer, seed)
    config = _reward_config(copy.deepcopy(causal.config))
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForSequenceClassification.from_config(
            config, attn_implementation=model_cfg.attn_implementation
        )
    model.model.load_state_dict(causal.model.state_dict())
    return model


def _pretrained_reward_model(model_cfg: ModelConfig, source: str, tokenizer: Any) -> tuple[PreTrainedModel, set]:
    """(model, keys the checkpoint did not provide). A causal LM's lm_head is simply not loaded."""
    config = _reward_config(load_pretrained(AutoConfig, source, model_cfg))
    config.pad_token_id = tokenizer.pad_token_id
    kwargs: dict[str, Any] = {}
    if model_cfg.attn_implementation != "sdpa":
        # sdpa is the schema default, and transformers' own default already picks it where the architecture has it
        # (and eager where not, e.g. DeBERTa); asking for it explicitly would fail on those architectures.
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    with quiet_load_report():
        model, info = load_pretrained(
            AutoModelForSequenceClassification,
            source,
            model_cfg,
            config=config,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # a classifier with another label count gets a new one-label head
            **kwargs,
        )
    new = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    prefix = model.base_model_prefix + "."
    backbone = sorted(k for k in new if k.startswith(prefix))
    if backbone:
        # Head-side modules (score, classifier, a pooler outside the base model) are expected to be new;
        # backbone weights are not, and would silently train from random values.
        listed = ", ".join(backbone[:5]) + (" ..." if len(backbone) > 5 else "")
        log.warning("%s: %d backbone weights missing, initialised randomly: %s", source, len(backbone), listed)
    return model, new


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers logs a MISSING/UNEXPECTED table for every head swap (lm_head out, score in); we report the keys
    that matter ourselves. A filter, not a logger level: a raised level switches on transformers' TP-plan warnings."""

    def drop_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Encoders have a fixed number of learned positions (BERT: 512); a longer input fails with an index error in the
    middle of training, so refuse `data.max_length` beyond it now. Decoders (RoPE) run past their nominal length."""
    limit = getattr(unwrap(model).config, "max_position_embeddings", None)
    if not pools_last_token(model) and limit and max_length > limit:
        raise UserError(
            f"data.max_length={max_length} is longer than the {limit} positions of this encoder; "
            f"set data.max_length={limit} or less"
        )


def pools_last_token(model: nn.Module) -> bool:
    """True for decoder classifiers (head `score`, last-token pooling), False for encoders ([CLS] pooling)."""
    return isinstance(getattr(unwrap(model), "score", None), nn.Module)


def scalar_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the output layer: `score` for decoders, else the last Linear with num_labels outputs
    (`classifier` for BERT/DeBERTa, `classifier.out_proj` for RoBERTa)."""
    inner = unwrap(model)
    if pools_last_token(inner):
        return "score", inner.score
    labels = inner.config.num_labels
    found = [(n, m) for n, m in inner.named_modules() if isinstance(m, nn.Linear) and m.out_features == labels]
    if not found:
        raise UserError(
            f"cannot find the classification head of {type(inner).__name__} (a Linear with num_labels outputs)"
        )
    return found[-1]


def init_reward_head(head: nn.Linear, seed: int) -> None:
    """weight ~ N(0, std = 1/sqrt(d_model + 1)), bias 0 (OAI lm-human-preferences), drawn from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(head.in_features + 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        if head.bias is not None:
            head.bias.zero_()


def apply_reward_lora(model: PreTrainedModel, lora_cfg: LoRAConfig) -> PeftModel:
    """LoRA adapters on the backbone; the head-side modules (score / classifier, a new pooler) train fully.

    Head-side modules (outside the base model: `score`, `classifier`, DeBERTa's new pooler) go to peft's
    `modules_to_save`: trained in full, saved with the adapters, merged into a plain checkpoint on export.
    """
    # peft's SEQ_CLS task adds `classifier` and `score` itself; name only the other head-side modules.
    extra = [
        n
        for n, m in model.named_children()
        if n not in (model.base_model_prefix, "classifier", "score") and next(m.parameters(), None) is not None
    ]
    return apply_lora(model, lora_cfg, "SEQ_CLS", extra or None)


def head_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """A decoder classifier's head output at every token: (B, T) ids -> (B, T, num_labels). Captured with a forward
    hook on `score`, because the model itself returns only the pooled row. `model` may be a DeepSpeed engine or a
    PeftModel; it is called as a whole so their hooks run. Used for sequence scores and for a critic's values."""
    captured: list[torch.Tensor] = []
    handle = unwrap(model).score.register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    return captured[-1]


def sequence_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Head outputs per sequence: input_ids, attention_mask (B, T) -> (B, num_labels).

    Decoders: the head's per-token output (B, T, L) at the last position whose mask is 1 (the EOS of a
    right-padded prompt + reply, even when pad == EOS). Encoders: the model's own ([CLS]-pooled) logits.
    """
    if not pools_last_token(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    per_token = head_outputs(model, input_ids, attention_mask, **kwargs)
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_token_index(attention_mask).to(per_token.device)]


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence of a one-label model: input_ids, attention_mask (B, T) -> (B,)."""
    logits = sequence_logits(model, input_ids, attention_mask)
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output, this one has {logits.shape[-1]} (pick one label)")
    return logits[:, 0]


def packed_sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar reward per sequence of a packed forward (`data.packing`, a decoder): input_ids, position_ids (R, W) and
    last (S,), the flat index of each sequence's last token -> (S,), the head's output there (its own EOS, whatever
    the pad id). No KV cache: with one, transformers would miss the packed sequences and attend across them."""
    from rlhf_cli.data.packing import model_mask

    mask = model_mask(model, batch)  # None, or the shared-prompt layout's explicit mask
    per_token = head_outputs(model, batch["input_ids"], mask, position_ids=batch["position_ids"], use_cache=False)
    if per_token.shape[-1] != 1:
        raise ValueError(f"a reward model has one output, this one has {per_token.shape[-1]} (pick one label)")
    return per_token.reshape(-1)[batch["last"].to(per_token.device)]
