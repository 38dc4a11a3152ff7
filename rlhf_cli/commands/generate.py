"""`rlhf generate run=<name> [stage=sft] prompt="..."`: chat with a stage's final checkpoint.

Also `model=<HF folder or hub id>` instead of run/stage. The prompt goes through the tokenizer's chat
template as one user turn; decoding is greedy unless temperature > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.commands.args import parse_key_values, resolve_checkpoint
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
    out = parse_key_values(args, GenerateArgs, 'prompt="Hello"')
    if not out.prompt:
        raise UserError('give a prompt: rlhf generate run=<name> prompt="..."')
    return out


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
    print(generate(resolve_checkpoint(a.model, a.run, a.root, a.stage), a))
    return 0
