"""Where a response's score comes from, behind one interface: `score(prompts, seq, texts) -> (B,) scores`.

- `ModelReward`: a reward model (this run's `stage:rm`) or any sequence classifier (a chosen label's logit or
  probability). When it shares the policy's tokenizer, it reads the rollout's own token ids (prompt + response
  through EOS), exactly the ids it was trained on, and the score is taken at the last real token. Otherwise the
  texts are re-rendered with its own tokenizer, as `rlhf score` does.
- `FunctionReward`: a Python function `module:function(prompts, responses) -> list[float]` (verifiable tasks), or
  a weighted sum of several (`stage.reward.functions`).

`score(..., allow_invalid=True)` turns what a reward function could not judge (None, NaN, inf) into a NaN score, for
the stages that drop such a sample (rejection sampling) or give it no advantage (GRPO); PPO keeps the default, where
it is an error. Shaping the scores (normalisation, clipping, the missing-EOS rule) is rollout/scoring.py's.

A user's function that raises (a reward term or a gold metric) ends in one UserError naming the setting, the function,
the exception and the frames of the user's own code, never a traceback through ours (`call_user_function`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.functions import cannot_import, importable_path, is_model_source, split_function
from rlhf_cli.errors import UserError
from rlhf_cli.models.classifier import batch_tensors, classifier_scores, encode, label_index, load_classifier
from rlhf_cli.models.load import disable_dropout
from rlhf_cli.rollout.generation import Sequences


def load_function(spec: str, key: str = "stage.reward.function") -> Callable[[list[str], list[str]], list[float]]:
    """Import `module:function` (stage.reward.function, or the setting `key` that names it in errors, e.g. a gold
    metric's)."""
    module_name, name = split_function(spec, key)
    importable_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise cannot_import(spec, key, module_name, err) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}=`{spec}`: `{module_name}` has no function `{name}`")
    return fn


def check_scores(values: Any, n: int, what: str, allow_invalid: bool = False) -> list[float]:
    """What a scoring function returned for `n` responses, as floats. One number per response, finite unless
    `allow_invalid`, where None / NaN / inf become NaN (a response the function could not judge); anything else is a
    UserError that starts with `what` (e.g. "stage.reward.function m:f")."""
    try:
        out = [math.nan if v is None and allow_invalid else float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{what} must return a list of numbers") from None
    if len(out) != n or not (allow_invalid or all(math.isfinite(v) for v in out)):
        raise UserError(
            f"{what} returned {len(out)} values for {n} responses, or a value that is not finite; it "
            "must return one finite number per response"
        )
    return [v if math.isfinite(v) else math.nan for v in out]


class RewardFunctionError(UserError):
    """A user's reward or gold function raised: the message names the setting, the function, the exception and the
    user's own frames."""


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../rlhf_cli
MAX_FRAMES = 8  # of a deeper stack, the outermost half (the user's entry) and the innermost (where it failed)


def call_user_function(fn: Callable, spec: str, key: str, prompts: list[str], responses: list[str]) -> Any:
    """`fn(prompts, responses)`, the function `spec` that the setting `key` names; an exception in it becomes a
    RewardFunctionError (see `describe_failure`), without the chained traceback of ours."""
    try:
        return fn(prompts, responses)
    except Exception as err:  # a KeyboardInterrupt / SystemExit passes: it is not the function's mistake
        raise RewardFunctionError(describe_failure(err, fn, spec, key)) from None


def describe_failure(err: Exception, fn: Callable, spec: str, key: str) -> str:
    """`key=`spec` raised Type: message`, then the traceback frames of the user's code (outside this package, or in
    the function's own file when it is one of ours, e.g. rlhf_cli/tasks), then how the function is called."""
    own = getattr(getattr(inspect.unwrap(fn), "__code__", None), "co_filename", None)
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if f.filename == own or not os.path.abspath(f.filename).startswith(PACKAGE_DIR + os.sep)
    ]
    lines = [f"{key}=`{spec}` raised {traceback.format_exception_only(err)[-1].strip()}"]
    half = MAX_FRAMES // 2
    shown = [frames] if len(frames) <= MAX_FRAMES else [frames[:half], frames[-half:]]
    for i, part in enumerate(shown):
        if i:
            lines.append(f"  ... {len(frames) - MAX_FRAMES} frame(s) left out")
        lines += [entry.rstrip() for entry in traceback.format_list(part)]
    name = spec.partition(":")[2]
    lines.append(
        f"{name} is called as {name}(prompts, responses) with two lists of str and must return one number "
        "per response; fix it, or call it on a few replies by hand to see why it fails"
    )
    return "\n".join(lines)


def guarded(fn: Callable, spec: str, key: str, together: bool = False) -> Callable:
    """`fn` (a gold metric's function) called through `call_user_function`, with its own name and module (messages
    name it by them); `together`: see FunctionReward."""

    @functools.wraps(fn)
    def call(prompts: list[str], responses: list[str]) -> Any:
        failure, out = None, None
        try:
            out = call_user_function(fn, spec, key, prompts, responses)
        except RewardFunctionError as err:
            failure = err
        raise_together(failure, together)
        return out

    return call


def raise_together(failure: UserError | None, together: bool) -> None:
    """Raise `failure` (this rank's, or None). With `together` and several ranks this is a collective: when any rank
    failed, every rank raises the first failing rank's message with "(on rank r)" after its first line, so the
    stage ends on all ranks at once with one message that rank 0 prints and records, instead of the other ranks
    waiting on a collective that the failed rank never joins."""
    import torch.distributed as tdist

    several = together and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    if not several or not eng.any_rank(failure is not None):
        if failure is not None:
            raise failure
        return
    messages: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(messages, None if failure is None else str(failure))
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    head, _, rest = message.partition("\n")
    raise RewardFunctionError(f"{head} (on rank {rank})" + (f"\n{rest}" if rest else ""))


class FunctionReward:
    """One Python function (`stage.reward.function`), or several weighted ones (`stage.reward.functions`): the score
    is the weighted sum, NaN where a term with a non-zero weight could not judge. With several, `last_terms` holds
    each function's scores of the last call ((B,) tensors, by function name) for the stage to log.

    `together`: every rank calls `score` at the same points (the critic-free stages and PPO), so a function that
    raised on one rank stops every rank with its message (`raise_together`); leave it off where ranks
    score different numbers of batches (rejection sampling's chunks), as that check is a collective."""

    def __init__(
        self, terms: str | list[tuple[str, float]], key: str = "stage.reward.function", together: bool = False
    ):
        self.key, self.together = key, together
        terms = [(terms, 1.0)] if isinstance(terms, str) else terms
        self.terms = [(spec, float(weight), load_function(spec, key)) for spec, weight in terms]
        names = [spec.partition(":")[2] for spec, _, _ in self.terms]
        self.names = names if len(set(names)) == len(names) else [spec for spec, _, _ in self.terms]
        self.last_terms: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        if len(self.terms) == 1 and self.key == "stage.reward.function":
            return f"function {self.terms[0][0]}"
        return "functions " + " + ".join(f"{weight:g} x {spec}" for spec, weight, _ in self.terms)

    def score(
        self, prompts: list[Any], seq: Sequences, responses: list[str], allow_invalid: bool = False
    ) -> torch.Tensor:
        """(B,) fp32 on the rollout's device; NaN where a function could not judge (only with `allow_invalid`)."""
        failure, total = None, None
        try:
            total = self._weighted_sum([p.text for p in prompts], responses, seq.input_ids.device, allow_invalid)
        except UserError as err:  # the user's function raised, or returned something that is not a score
            failure = err
        raise_together(failure, self.together)
        return total

    def _weighted_sum(
        self, texts: list[str], responses: list[str], device: torch.device, allow_invalid: bool
    ) -> torch.Tensor:
        total = torch.zeros(len(responses), dtype=torch.float32, device=device)
        for name, (spec, weight, fn) in zip(self.names, self.terms, strict=True):
            # A weight-0 term is only logged: its None / NaN must neither drop the sample (0 x NaN is NaN) nor be
            # an error where unscorable samples are (PPO).
            values = call_user_function(fn, spec, self.key, texts, responses)
            values = check_scores(values, len(responses), f"{self.key} {spec}", allow_invalid or weight == 0)
            term = torch.tensor(values, dtype=torch.float32, device=device)
            if self.key == "stage.reward.functions":
                self.last_terms[name] = term
            if weight:
                total += weight * term
        return total


class ModelReward:
    def __init__(
        self, reward_cfg: Any, path: str, policy_tokenizer: Any, ds: Any, micro: int, dist: Any, offload: bool
    ):
        self.cfg, self.path, self.dist, self.offload = reward_cfg, path, dist, offload
        self.tokenizer, model = load_classifier(path)
        disable_dropout(model)
        self.index = label_index(model.config, reward_cfg.label)
        self.same_tokens = same_tokenizer(self.tokenizer, policy_tokenizer)
        self.model = eng.frozen(model, ds, micro, torch.device("cpu") if offload else dist.device)

    def describe(self) -> str:
        how = "rollout token ids" if self.same_tokens else "texts re-tokenized with its own tokenizer"
        if self.cfg.text == "response":
            how = "the response text alone"
        return f"model {self.path} (label {self.index}, {self.cfg.reduce}; {how})"

    @torch.no_grad()
    def score(
        self, prompts: list[Any], seq: Sequences, responses: list[str], allow_invalid: bool = False
    ) -> torch.Tensor:
        """(B,) fp32: the chosen label's logit or probability (a model always gives a number: `allow_invalid` is
        accepted for the common interface)."""
        batch = self._encode(prompts, seq, responses)
        with eng.on_device(self.model, self.dist.device, self.offload) as model:
            return classifier_scores(model, batch, self.index, self.cfg.reduce)

    def _encode(self, prompts: list[Any], seq: Sequences, responses: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded ids of prompt + response through EOS (the last real token is the EOS when there is one)."""
        if self.same_tokens and self.cfg.text == "conversation":
            lengths = seq.response_mask.sum(1).long().tolist()
            rows = [
                {"input_ids": list(p.input_ids) + seq.response_ids[i, : lengths[i]].tolist()}
                for i, p in enumerate(prompts)
            ]
        else:
            rows = [
                encode(self.tokenizer, "rollout", {"prompt": p.messages, "response": r or " "}, self.cfg.text)
                for p, r in zip(prompts, responses, strict=True)
            ]
        return batch_tensors(rows, self.tokenizer.pad_token_id, self.dist.device)


def same_tokenizer(a: Any, b: Any) -> bool:
    return (
        a.get_vocab() == b.get_vocab()
        and a.eos_token_id == b.eos_token_id
        and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
    )


def build_reward(
    st: Any, run: Any, ds: Any, tokenizer: Any, dist: Any, together: bool = False
) -> FunctionReward | ModelReward:
    """The reward source named by `stage.reward` (a function wins over a model); `together`: see FunctionReward."""
    r = st.reward
    if getattr(r, "functions", None):
        return FunctionReward([(f.fn, f.weight) for f in r.functions], key="stage.reward.functions", together=together)
    if r.function:
        return FunctionReward(r.function, together=together)
    if not r.model:
        raise UserError("no reward: set stage.reward.model (e.g. stage:rm) or stage.reward.function=module:function")
    from rlhf_cli.models.source import resolve_source

    path, _ = resolve_source(run.resolve_source(r.model))
    return ModelReward(r, path, tokenizer, ds, st.eval_batch_size, dist, st.offload_frozen)


def build_gold(
    spec: str | None,
    st: Any,
    run: Any,
    ds: Any,
    tokenizer: Any,
    dist: Any,
    key: str = "stage.gold_reward",
    together: bool = False,
) -> Callable | ModelReward | None:
    """The gold metric `spec` names, judged on the held-out answers next to the reward: a `module:function(prompts,
    responses) -> list[float]` (wrapped so that an exception in it is one UserError naming `key`; `together`: see
    FunctionReward), or a second reward model (`stage:<name>`, a folder or a hub id) read like `stage.reward.model`
    (same label, reduce and text settings); None without one."""
    if not spec:
        return None
    if not is_model_source(spec):
        return guarded(load_function(spec, key=key), spec, key, together)
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    gold_st = SimpleNamespace(
        reward=OmegaConf.merge(st.reward, {"model": spec, "function": None, "functions": []}),
        eval_batch_size=st.eval_batch_size,
        offload_frozen=st.offload_frozen,
    )
    return build_reward(gold_st, run, ds, tokenizer, dist)
