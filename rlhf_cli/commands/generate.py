"""`rlhf generate run=<name> [stage=sft] prompt="..."`: chat with a stage's final checkpoint.

Also `model=<HF folder or hub id>` instead of run/stage. The prompt goes through the tokenizer's chat
template as one user turn; decoding is greedy unless temperature > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from rlhf_cli.errors import UserError


@dataclass
class GenerateArgs:
    prompt: str = ""
    run: str | None = None
    root: str = "runs"
    stage: str = "sft"
    model: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None


def parse_args(args: list[str]) -> GenerateArgs:
    """key=value pairs into GenerateArgs, with the same clear errors as the stage configs."""
    import difflib

    known = {f.name: f for f in fields(GenerateArgs)}
    values: dict[str, object] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f'expected key=value, got `{arg}` (e.g. prompt="Hello")')
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise UserError(
                f"unknown argument `{key}`"
                + (f"; did you mean `{close[0]}`?" if close else "")
                + f" (arguments: {', '.join(known)})"
            )
        kind = {"max_new_tokens": int, "temperature": float, "top_p": float, "seed": int}.get(key, str)
        try:
            values[key] = kind(value)
        except ValueError:
            raise UserError(f"argument `{key}` must be {kind.__name__}, got `{value}`") from None
    out = GenerateArgs(**values)
    if not out.prompt:
        raise UserError('give a prompt: rlhf generate run=<name> prompt="..."')
    if (out.run is None) == (out.model is None):
        raise UserError("give exactly one of run=<name> (with stage=, default sft) or model=<path or hub id>")
    return out


def resolve_model(a: GenerateArgs) -> str:
    if a.model is not None:
        return a.model
    from rlhf_cli.run_dir import Run

    run = Run(root=Path(a.root) / a.run, stage=a.stage)
    if not run.root.is_dir():
        raise UserError(f"no run directory {run.root}; check run= and root= (runs are listed under {a.root}/)")
    return str(run.stage_output(a.stage))


def generate(model_path: str, a: GenerateArgs) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
    except OSError as err:
        raise UserError(f"cannot load a model from {model_path}: {str(err).splitlines()[0]}") from None
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
    print(generate(resolve_model(a), a))
    return 0
