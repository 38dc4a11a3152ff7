"""Load tokenizers and causal LMs from `builtin:tiny-llama`, a local Hugging Face folder (a run-dir stage output
included) or a hub id; wrap them with LoRA; produce the plain model that `final/` is written from.

Every failure a user can fix (a missing folder, no network, no chat template, a LoRA target that does not exist)
becomes a `UserError` naming the path or key and what to do.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models.tiny import BUILTIN_TINY, build_tiny_llama, tiny_tokenizer
from rlhf_cli.models.weights import check_weight_files, error_summary, is_unreadable_file_error

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

NEW_PAD_TOKEN = "<|pad|>"
# Tokens that exist in some vocabularies only to serve as padding (or are never produced by the chat format),
# tried in order before adding a new token. Reusing one keeps the vocabulary, and so the embedding matrix, the
# same size as the checkpoint's: no resize, and LoRA adapters stay loadable on the untouched base model.
# Llama 3.1+: <|finetune_right_pad_id|>. Qwen2 chat: <|endoftext|> while eos is <|im_end|> (Qwen's own choice).
# GPT-2 style vocabularies, where <|endoftext|> *is* the eos, never match because the eos is excluded.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|endoftext|>")
# A folder marker per kind of load, used to accept a run-dir stage folder (`runs/x/sft`) for its `final/`.
MODEL_MARKER, TOKENIZER_MARKERS = ("config.json",), ("tokenizer_config.json", "tokenizer.json")



def is_builtin(name: str | None) -> bool:
    """True for `builtin:*` names; an unknown builtin is a UserError rather than a hub lookup."""
    if name is None or not name.startswith("builtin:"):
        return False
    if name != BUILTIN_TINY:
        raise UserError(
            f"unknown built-in model '{name}' (model.name_or_path / model.tokenizer); the only one is '{BUILTIN_TINY}'"
        )
    return True


def resolve_source(name: str, markers: tuple[str, ...] = MODEL_MARKER) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it a local folder).

    An existing folder is used as is, or its `final/` when the folder is a run-dir stage output
    (e.g. `runs/demo/sft`) that holds the model one level down. A name that cannot be a hub id (absolute or
    relative path syntax, too many slashes, illegal characters) and does not exist is a "no such folder" error,
    so a typo in a path never turns into a confusing hub lookup.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        final = path / "final"
        if not any((path / m).exists() for m in markers) and any((final / m).exists() for m in markers):
            return str(final), True
        return str(path), True
    if path.exists():
        raise UserError(f"'{name}' is a file; expected a Hugging Face model folder or a hub id")
    if _looks_like_path(name):
        raise UserError(
            f"'{name}': no such folder. Check model.name_or_path / model.tokenizer (relative paths start from "
            f"the current directory: {Path.cwd()}), or give a hub id like 'org/model'."
        )
    return name, False


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _load_failed(name: str, local: bool, revision: str | None, err: BaseException) -> UserError:
    """The UserError for an OSError from from_pretrained: a broken local folder, or a hub id not fetchable."""
    reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    if local:
        return UserError(f"'{name}' is not a loadable Hugging Face folder: {reason}")
    offline = " (HF_HUB_OFFLINE is set)" if hf_constants.is_offline_mode() else ""
    rev = f" at revision '{revision}'" if revision else ""
    return UserError(
        f"could not fetch '{name}'{rev} from the Hugging Face hub{offline}: {reason}. Check the id (and that "
        f"you have access if it is gated); if you meant a local folder, it does not exist here. Without network "
        f"or with HF_HUB_OFFLINE=1 the files must already be in the HF cache (`hf download {name}` on a machine "
        f"with network), or point model.name_or_path to a local folder."
    )


def load_pretrained(
    auto_cls: Any, name: str, model_cfg: ModelConfig, markers: tuple[str, ...] = MODEL_MARKER, **kwargs: Any
) -> Any:
    """`auto_cls.from_pretrained(name, revision, trust_remote_code, **kwargs)` with user-fixable failures turned
    into UserError. Shared by every loader (tokenizer, causal LM, and sequence-classification heads)."""
    source, local = resolve_source(name, markers)
    if local and _reads_weights(auto_cls):
        check_weight_files(Path(source))
    try:
        return auto_cls.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except OSError as e:  # includes huggingface_hub's HTTP, offline and not-found errors
        if is_unreadable_file_error(e):
            raise _corrupt_weights(name, source, local, e) from e
        raise _load_failed(name, local, model_cfg.revision, e) from e
    except (ImportError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"'{name}' ships its own code; set model.trust_remote_code=true to run it") from e
        about_attention = "attention" in str(e).lower() or "attn" in str(e).lower()
        if "attn_implementation" in kwargs and (about_attention or isinstance(e, ImportError)):
            raise _attn_error(model_cfg, e) from e
        if isinstance(e, ImportError):
            raise UserError(f"loading '{name}' needs a package that is not installed: {e}") from e
        raise
    except Exception as e:  # a weight file the header check could not judge (a hub download, an old .bin)
        if not is_unreadable_file_error(e):
            raise
        raise _corrupt_weights(name, source, local, e) from e


def _reads_weights(auto_cls: Any) -> bool:
    """False for loaders that read only JSON (configs, tokenizers): the folder's weights are not theirs to judge."""
    light = (AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase)
    return not (isinstance(auto_cls, type) and issubclass(auto_cls, light))


def _corrupt_weights(name: str, source: str, local: bool, err: BaseException) -> UserError:
    """The UserError for a weight file the library could not read (the fallback of `check_weight_files`)."""
    what = error_summary(err)
    if local:
        return UserError(f"the weights in {source} are incomplete or corrupt ({what}): re-export or re-download them")
    return UserError(
        f"the cached weights of '{name}' are incomplete or corrupt ({what}): remove them from the Hugging Face cache "
        f"(`hf cache rm model/{name}`; the cache is {hf_constants.HF_HUB_CACHE}) and download them again"
    )


def _attn_error(model_cfg: ModelConfig, err: BaseException) -> UserError:
    return UserError(
        f"model.attn_implementation='{model_cfg.attn_implementation}' is not usable here: "
        f"{str(err).strip().rstrip('.')}. 'sdpa' and 'eager' always work."
    )


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for `model_cfg`: right padding, a pad token distinct from EOS, and a chat template.

    Embedding rows for a newly added pad token are created by `load_causal_lm` (it resizes whenever
    len(tokenizer) exceeds the checkpoint's embedding rows), so load the tokenizer first and pass it in.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if is_builtin(name):
        tok = tiny_tokenizer()
    else:
        tok = load_pretrained(AutoTokenizer, name, model_cfg, TOKENIZER_MARKERS)
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
    label and reward models would read the score one token early (ALGORITHMS.md section 1).
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


def load_causal_lm(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM matching `tokenizer`: embeddings cover every token id, pad/eos ids agree with the tokenizer.

    `seed` only matters for the built-in model (random init). Dropout and gradient checkpointing are the
    caller's business (see `enable_gradient_checkpointing`).
    """
    if is_builtin(model_cfg.name_or_path):
        model = build_tiny_llama(model_cfg.tiny, tokenizer, seed).to(dtype)
        if model.config._attn_implementation != model_cfg.attn_implementation:
            try:
                model.set_attn_implementation(model_cfg.attn_implementation)
            except (ImportError, ValueError) as e:
                raise _attn_error(model_cfg, e) from e
    else:
        model = load_pretrained(
            AutoModelForCausalLM,
            model_cfg.name_or_path,
            model_cfg,
            dtype=dtype,
            attn_implementation=model_cfg.attn_implementation,
        )
    resize_for_tokenizer(model, tokenizer)
    sync_special_ids(model, tokenizer)
    fp32_output_head(model)
    return model


class FP32OutputHead(nn.Linear):
    """An LM head that computes its logits in fp32 whatever the dtype of its weights and inputs: (..., d) -> (..., V)
    fp32. Under bf16 a bf16 head rounds every logit before the log-softmax (about 1e-2 nats per token, 0.5 nats
    summed over a 255-token reply: the size of a DPO margin), and upcasting the rounded logits does not undo it
    (ALGORITHMS.md section 1). Only the positions that reach the head pay for it (`logits_to_keep`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.float(), bias)


def fp32_output_head(model: PreTrainedModel) -> None:
    """Make the model's output projection an `FP32OutputHead`, in place. The class of the existing module is
    swapped rather than the module replaced, so its parameters stay the same objects: tied embeddings stay tied,
    state-dict names and checkpoints are unchanged, and DeepSpeed's ZeRO-3 hooks gather its weight as before."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = FP32OutputHead


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the embedding (and untied output) matrices to len(tokenizer) rows if they are smaller. True if grown.

    Never shrinks: many checkpoints pad their matrices beyond the tokenizer (Qwen: 151936 rows for 151665
    tokens). New rows are the mean of the old rows, deterministic and cheap (transformers' mean_resizing samples
    from a full covariance, minutes of CPU for a large hidden size); a new pad row is masked out of every loss,
    and a mean output row keeps its logit at the average, so the model does not start emitting it.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight[old:] = emb.weight[:old].float().mean(dim=0).to(emb.weight.dtype)
    log.info("resized embeddings from %d to %d rows", old, len(tokenizer))
    return True


def sync_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make model.config and model.generation_config agree with the tokenizer's pad and eos.

    The config's eos becomes the tokenizer's eos unless it is a list that already holds it (Llama 3 Instruct).
    Generation stops at the tokenizer's eos first and at the checkpoint's own stop ids too, so a chat model
    still stops on its other end-of-turn tokens.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = pad
    if not (isinstance(model.config.eos_token_id, list) and eos in model.config.eos_token_id):
        model.config.eos_token_id = eos
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id
    gen = getattr(model, "generation_config", None)  # sequence classifiers have none
    if gen is None:
        return
    gen.pad_token_id = pad
    old = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [eos] + [i for i in old if i is not None and i != eos and i != pad]
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops


def disable_dropout(model: nn.Module) -> None:
    """Dropout off, for preference and RL training (ALGORITHMS.md section 9): else pi/pi_ref != 1 at step 0.

    Sets p = 0 in every nn.Dropout, and zeroes the float `*dropout*` attributes that attention modules
    copy from the config at build time (Llama/Qwen attention dropout is functional, not an nn.Dropout)
    and the config's own probabilities, so a saved checkpoint keeps them off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (PreTrainedModel or PeftModel).

    Non-reentrant checkpointing needs no `enable_input_require_grads` hack for frozen (LoRA) embeddings, and
    use_cache=False stops every training forward from building a KV cache it throws away. Set
    `config.use_cache = True` again on the model you export.
    """
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(
    model: PreTrainedModel, lora_cfg: LoRAConfig, task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
) -> PeftModel:  # fmt: skip
    """Wrap `model` (in place, peft's way) with LoRA adapters; only adapter weights (and `modules_to_save`,
    trained in full) stay trainable. Reward models pass peft's task type "SEQ_CLS", which keeps their head trainable."""
    from peft import LoraConfig, TaskType, get_peft_model  # here: only LoRA runs pay for importing peft

    if lora_cfg.r < 1 or lora_cfg.alpha <= 0:
        raise UserError(f"model.lora: r must be >= 1 and alpha > 0 (got r={lora_cfg.r}, alpha={lora_cfg.alpha})")
    _check_lora_targets(model, list(lora_cfg.target_modules))
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type=TaskType(task_type),
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def _check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """peft only fails when *no* target matches; a partly wrong list (Llama names on GPT-2) would silently
    train fewer layers than asked. Every name must match a module name or its last components, as in peft."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not targets or missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            }
        )
        raise UserError(
            f"model.lora.target_modules: {missing or '[] (empty)'} not found in {type(model).__name__}; "
            f"its linear layers are {linear}"
        )


def merged_for_export(model: nn.Module, merge: bool = True) -> nn.Module:
    """The model to write to `final/`: LoRA merged into a plain model when `merge` (model.lora.merge) is true.

    Merges a deep copy, so the live PeftModel keeps its adapters and optimizer references (the stage may go on
    training, evaluating or writing a resume checkpoint after export); merging in place and unmerging later would
    add rounding error to the base weights. The cost is one extra model in memory during export.
    Not a PeftModel, or merge is false: `model` itself (a PeftModel then saves as an adapter folder).
    """
    if not is_peft_model(model) or not merge:
        return model
    return copy.deepcopy(model).merge_and_unload()


def is_peft_model(model: Any) -> bool:
    """isinstance(model, PeftModel) without importing peft: a PeftModel only exists once something imported peft."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)
