"""The hf engine's Llama-family decoding step (rollout/decode_step.py) against transformers' own forward, for every
listed class: the logits of each step equal a cache-free forward over the whole sequence (left-padded prompts, rows
leaving the batch mid-way, biases, Qwen3's q / k norms, a LoRA adapter, the fp32 output head); greedy ids equal
`generate`'s; anything the step cannot compute exactly takes transformers' forward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlhf_cli.models.load import fp32_output_head
from rlhf_cli.rollout import decode as decode_mod
from rlhf_cli.rollout.decode import decode, prefill
from rlhf_cli.rollout.decode_step import DecodeStep, supported

SHAPE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
)
KINDS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama-biases-fp32-head": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16)),
}


def _model(kind: str, lora: bool = False):
    torch.manual_seed(0)
    model = KINDS[kind]()
    with torch.no_grad():  # norm weights, biases and q / k norms away from their initial ones and zeros
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if kind.endswith("fp32-head"):
        fp32_output_head(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():  # peft starts B at zero: make the adapter change the outputs
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return model.eval()


def _prompts():
    """6 left-padded prompts (6, 9), four of them padded by 1-4 columns, two identical."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 4, 0, 1, 3]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    ids[3], mask[3] = ids[0], mask[0]
    return ids, mask


def _reference(model, ids, mask, new):
    """transformers' logits for the next token after prompt + `new` tokens, without a cache: (B, V) fp32."""
    full = torch.cat([ids, new], dim=1)
    attention = torch.cat([mask, torch.ones_like(new)], dim=1)
    pos = (attention.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=full, attention_mask=attention, position_ids=pos).logits[:, -1].float()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_each_step_equals_transformers_forward(kind, lora):
    """Five steps with rows 1 and 4 finishing after the second: every live row's logits match a cache-free forward
    over its whole sequence, slots reordered as `keep` says."""
    model = _model(kind, lora)
    ids, mask = _prompts()
    assert supported(model, ids.shape[1] + 5)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache, logits = prefill(model, ids, mask, pos)
    step = DecodeStep(model, cache, mask, 5)
    live, pos, new = torch.arange(6), pos[:, -1], torch.empty(6, 0, dtype=torch.long)
    for t in range(5):
        tok = logits.argmax(-1)
        new = torch.cat([new, torch.zeros(6, 1, dtype=torch.long)], dim=1)
        new[live, t] = tok
        if t == 2:
            order = step.keep(~torch.isin(live, torch.tensor([1, 4])))
            assert sorted(live[order].tolist()) == [0, 2, 3, 5]
            live, tok, pos = live[order], tok[order], pos[order]
        pos = pos + 1
        logits = step(tok, pos, t)
        expected = _reference(model, ids[live], mask[live], new[live])
        assert torch.allclose(logits, expected, atol=2e-5, rtol=1e-5), (t, (logits - expected).abs().max())


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_decode_equals_generate_and_takes_the_step(kind, monkeypatch):
    model = _model(kind)
    ids, mask = _prompts()
    calls = []
    monkeypatch.setattr(decode_mod, "DecodeStep", lambda *a: calls.append(1) or DecodeStep(*a))
    config = GenerationConfig(do_sample=False, max_new_tokens=7, eos_token_id=1, pad_token_id=0)
    ours = decode(model, {"input_ids": ids, "attention_mask": mask}, config)
    model.generation_config = GenerationConfig()
    theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    assert calls == [1]
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_what_the_step_cannot_compute_takes_transformers_forward(monkeypatch):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    mistral = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=12))
    dynamic = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert not supported(gpt2, 20)
    assert supported(mistral, 12) and not supported(mistral, 13)  # a window the rollout would exceed
    assert not supported(dynamic, 20)  # rotary tables that change with the sequence length
    monkeypatch.setattr(decode_mod, "DecodeStep", lambda *a: pytest.fail("the step ran on GPT-2"))
    ids, mask = _prompts()
    config = GenerationConfig(do_sample=False, max_new_tokens=5, eos_token_id=1, pad_token_id=0)
    ours = decode(gpt2, {"input_ids": ids, "attention_mask": mask}, config)
    gpt2.generation_config = GenerationConfig()
    theirs = gpt2.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


@torch.no_grad()
def test_sampled_tokens_do_not_depend_on_which_step_runs(monkeypatch):
    """Rows that end early have their slots refilled from the end of the batch, yet each row draws the uniform number
    it draws with rows kept in order (transformers' forward): with one seed both give the same samples, so a run's
    rollouts do not change with the step (temperature 1, rows ending at different steps)."""
    model = _model("llama")
    ids, mask = _prompts()
    batch = {"input_ids": ids, "attention_mask": mask}
    config = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=12, eos_token_id=-1, pad_token_id=0)
    torch.manual_seed(3)
    free = decode(model, batch, config)  # no EOS: take a token the samples use as the EOS
    config.eos_token_id = int(free.flatten().mode().values)
    torch.manual_seed(0)
    ours = decode(model, batch, config)
    ends = [
        int((row == config.eos_token_id).nonzero()[0]) if (row == config.eos_token_id).any() else 99 for row in ours
    ]
    assert any(ends[i] < ends[j] for i in range(6) for j in range(i + 1, 6)), ends  # a slot refilled from behind
    monkeypatch.setattr(decode_mod, "supported", lambda *a: False)
    torch.manual_seed(0)
    assert torch.equal(decode(model, batch, config), ours)
