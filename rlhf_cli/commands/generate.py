"""`rlhf generate prompt="..." [run.name=demo [stage=<stage>] | model=<folder or hub id>] [key=value ...]`: chat
with a policy of a run, or with any causal language model.

The run is run.name= (default `demo`, as in the stages); its policy is the newest completed policy stage of the run
(sft, dpo, ppo, or any other stage whose final/ is a causal language model, as the architectures in its config.json
say), and a line on stderr names it; stage= picks another. model= takes a Hugging Face folder or hub id instead. A
reward model (a sequence classifier) is refused before any weight is loaded: `rlhf score` scores text with it.

The prompt goes through the tokenizer's chat template as one user turn; decoding is greedy unless temperature > 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_cli.commands.args import DEFAULT_RUN, model_kind, parse_key_values, resolve_checkpoint
from rlhf_cli.errors import UserError
from rlhf_cli.files import TIME_FORMAT


@dataclass
class GenerateArgs:
    # The user message.
    prompt: str = ""
    # The run whose policy answers: the folder <run.root>/<run.name>/ (the stages' default run unless model= is given).
    run: str | None = DEFAULT_RUN
    # The folder that holds the runs.
    root: str = "runs"
    # The stage whose final/ answers; unset: the run's newest completed policy stage.
    stage: str | None = None
    # Instead of a run: a causal language model, as a Hugging Face folder or hub id.
    model: str | None = None
    max_new_tokens: int = 64
    # 0 decodes greedily; above 0 samples at this temperature from the top_p nucleus, seeded by seed.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # A system message before the prompt.
    system: str | None = None


ARGS = GenerateArgs  # for `rlhf generate --help`


def parse_args(args: list[str]) -> GenerateArgs:
    out = parse_key_values(args, GenerateArgs, 'prompt="Hello"')
    if not out.prompt:
        raise UserError(
            'give a prompt: rlhf generate prompt="..." (run.name=demo unless run.name= or model= names another)'
        )
    return out


def newest_policy_stage(run: Any) -> str:
    """The completed stage of `run` (a `Run`) whose final/ is a causal LM and that ended last, named on stderr; with
    none, "sft" (whose error then names the command that makes it)."""
    done = []
    for order, (stage, record) in enumerate(run.read_manifest()["stages"].items()):
        if record.get("status") == "completed" and _is_causal_lm(run.root / stage / "final"):
            done.append((_ended(record), order, stage))
    if not done:
        return "sft"
    *older, (_, _, stage) = sorted(done)
    others = " or ".join(f"stage={s}" for *_, s in reversed(older))
    note = f"; {others} for another" if others else ""
    print(f"using {stage}/final (newest completed policy stage{note})", file=sys.stderr)
    return stage


def _is_causal_lm(final: Path) -> bool:
    kind = model_kind(str(final)) if final.is_dir() else None
    return kind is not None and kind[0] == "causal-lm"


def _ended(record: dict) -> datetime:
    try:
        return datetime.strptime(record.get("ended_at") or "", TIME_FORMAT)
    except ValueError:  # no end time recorded: older than any stage that has one
        return datetime.min.replace(tzinfo=timezone.utc)


def refuse_classifier(path: str, a: GenerateArgs) -> None:
    """A reward model loads as a causal LM only with a fresh random lm_head (transformers reports it MISSING) and
    writes garbage: refuse it by its config, before loading, and point to the command that uses it."""
    kind = model_kind(path)
    if kind is None or kind[0] != "classifier":
        return
    source = f"model={a.model}" if a.model is not None else f"run.name={a.run} stage={a.stage}"
    policy = "another folder" if a.model is not None else "a policy stage (leave out stage= for the newest)"
    raise UserError(
        f"{path} is a sequence classifier ({kind[1]}), such as a reward model: it scores a response, it does not "
        f'write one. Score with `rlhf score {source} prompt="..." response="..."`, or generate from {policy}'
    )


def generate(model_path: str, a: GenerateArgs) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models.load import TOKENIZER_MARKERS, load_pretrained

    # The shared loader: a missing folder, an unfetchable hub id or truncated weights end in one message naming them.
    cfg = ModelConfig(name_or_path=model_path)
    tokenizer = load_pretrained(AutoTokenizer, model_path, cfg, TOKENIZER_MARKERS)
    model = load_pretrained(AutoModelForCausalLM, model_path, cfg)
    model.eval()
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(a.seed)
    sampling = (
        {"do_sample": True, "temperature": a.temperature, "top_p": a.top_p}
        if a.temperature > 0
        else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=a.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main(args: list[str]) -> int:
    a = parse_args(args)
    path = resolve_checkpoint(a.model, a.run, a.root, a.stage or newest_policy_stage)
    refuse_classifier(path, a)
    print(generate(path, a))
    return 0
