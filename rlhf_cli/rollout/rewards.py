"""Where a response's score comes from, behind one interface: `score(prompts, seq, texts) -> (B,) scores`.

- `ModelReward`: a reward model (this run's `stage:rm`) or any sequence classifier (a chosen label's logit or
  probability). When it shares the policy's tokenizer, it reads the rollout's own token ids (prompt + response
  through EOS), exactly the ids it was trained on, and the score is taken at the last real token. Otherwise the
  texts are re-rendered with its own tokenizer, as `rlhf score` does.
- `FunctionReward`: a Python function `module:function(prompts, responses) -> list[float]` (verifiable tasks).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.errors import UserError
from rlhf_cli.models.load import disable_dropout
from rlhf_cli.rollout.generation import Sequences


def load_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import `module:function` (stage.reward.function)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"stage.reward.function=`{spec}`: expected `module:function`, e.g. "
                        "rlhf_cli.tasks.word_order:gold_reward")  # fmt: skip
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the `rlhf` console script does not put the current directory there
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"stage.reward.function=`{spec}`: cannot import `{module_name}` ({err}); the module "
                        "must be importable from the current directory or the Python path") from None  # fmt: skip
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"stage.reward.function=`{spec}`: `{module_name}` has no function `{name}`")
    return fn


class FunctionReward:
    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)

    def describe(self) -> str:
        return f"function {self.spec}"

    def score(self, prompts: list[Any], seq: Sequences, responses: list[str]) -> torch.Tensor:
        out = self.fn([p.text for p in prompts], responses)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise UserError(f"stage.reward.function {self.spec} must return a list of numbers") from None
        if len(values) != len(responses) or not all(math.isfinite(v) for v in values):
            raise UserError(f"stage.reward.function {self.spec} returned {len(values)} values for {len(responses)} "
                            "responses, or a value that is not finite; it must return one finite number per "
                            "response")  # fmt: skip
        return torch.tensor(values, dtype=torch.float32, device=seq.input_ids.device)


class ModelReward:
    def __init__(self, reward_cfg: Any, path: str, policy_tokenizer: Any, ds: Any, micro: int, dist: Any,
                 offload: bool):  # fmt: skip
        from rlhf_cli.commands.score import label_index, load

        self.cfg, self.path, self.dist, self.offload = reward_cfg, path, dist, offload
        self.tokenizer, model = load(path)
        disable_dropout(model)
        self.index = label_index(model.config, reward_cfg.label)
        self.sigmoid = model.config.num_labels == 1 or model.config.problem_type == "multi_label_classification"
        self.same_tokens = same_tokenizer(self.tokenizer, policy_tokenizer)
        self.model = eng.frozen(model, ds, micro, torch.device("cpu") if offload else dist.device)

    def describe(self) -> str:
        how = "rollout token ids" if self.same_tokens else "texts re-tokenized with its own tokenizer"
        return f"model {self.path} (label {self.index}, {self.cfg.reduce}; {how})"

    @torch.no_grad()
    def score(self, prompts: list[Any], seq: Sequences, responses: list[str]) -> torch.Tensor:
        from rlhf_cli.models.reward import sequence_logits

        batch = self._encode(prompts, seq, responses)
        with eng.on_device(self.model, self.dist.device, self.offload) as model:
            logits = sequence_logits(model, **batch).float()
        if self.cfg.reduce == "prob":
            logits = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        return logits[:, self.index]

    def _encode(self, prompts: list[Any], seq: Sequences, responses: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded ids of prompt + response through EOS (the last real token is the EOS when there is one)."""
        from rlhf_cli.commands.score import ScoreArgs, batch_tensors, encode

        if self.same_tokens:
            lengths = seq.response_mask.sum(1).long().tolist()
            rows = [{"input_ids": list(p.input_ids) + seq.response_ids[i, : lengths[i]].tolist()}
                    for i, p in enumerate(prompts)]  # fmt: skip
        else:
            args = ScoreArgs(reduce=self.cfg.reduce)
            rows = [encode(self.tokenizer, "rollout", {"prompt": p.messages, "response": r or " "}, args)
                    for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
        return batch_tensors(rows, self.tokenizer.pad_token_id, self.dist.device)


def same_tokenizer(a: Any, b: Any) -> bool:
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))  # fmt: skip


def build_reward(st: Any, run: Any, ds: Any, tokenizer: Any, dist: Any) -> FunctionReward | ModelReward:
    """The reward source named by `stage.reward` (a function wins over a model)."""
    r = st.reward
    if r.function:
        return FunctionReward(r.function)
    if not r.model:
        raise UserError("no reward: set stage.reward.model (e.g. stage:rm) or stage.reward.function=module:function")
    from rlhf_cli.models.load import resolve_source

    path, _ = resolve_source(run.resolve_source(r.model))
    return ModelReward(r, path, tokenizer, ds, st.eval_batch_size, dist, st.offload_frozen)
