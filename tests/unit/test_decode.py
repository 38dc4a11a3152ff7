"""The hf engine's decoding loop (rollout/decode.py) against transformers' `generate`: greedy ids identical (rows
ending at different steps, prompts repeated as GRPO repeats them), sampled tokens from the same distribution
(temperature, top-k, top-p), never a token of probability 0."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY
from transformers import GenerationConfig as HFConfig

from rlhf_cli.config.online import GenerationConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.models import build_tiny_llama, disable_dropout, tiny_tokenizer
from rlhf_cli.rollout.decode import decode, next_tokens, warpers
from rlhf_cli.rollout.generation import sampling_config, truncate_at_eos

PROMPTS = [
    "Is 7 even or odd?",
    "Reverse the order of these words: cat, dog, sun, moon, tree.",
    "Hi",
    "Is 7 even or odd?",
]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = build_tiny_llama(TINY, tok, 0)
    disable_dropout(model)
    prompts = [tokenize_prompt(tok, [{"role": "user", "content": p}], 128) for p in PROMPTS]
    rows = [p for p in prompts for _ in range(2)]  # each prompt twice in a row, as n_samples = 2 lays them out
    return tok, model.eval(), collate_prompts(rows, tok.pad_token_id)


def _generate(model, batch, config):
    """transformers' own greedy / sampled generation with a clean config (nothing from the checkpoint)."""
    clean = HFConfig(**config.to_dict())
    model.generation_config = HFConfig()
    out = model.generate(**batch, generation_config=clean)
    return out[:, batch["input_ids"].shape[1] :]


def test_greedy_ids_equal_generate_with_rows_ending_at_different_steps(setup):
    tok, model, batch = setup
    config = sampling_config(GenerationConfig(max_new_tokens=10), tok.eos_token_id, tok.pad_token_id, greedy=True)
    free = decode(model, batch, config)  # the random model never says EOS: take a token it does say as the EOS
    eos = int(free[0, 3])
    ends = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in free]
    assert len(set(ends)) > 1, f"the chosen EOS {eos} must end rows at different steps: {ends}"
    config.eos_token_id = eos
    ours = decode(model, batch, config)
    theirs = _generate(model, batch, config)
    theirs, _, _ = truncate_at_eos(theirs, eos, tok.pad_token_id)
    assert torch.equal(ours, theirs[:, : ours.shape[1]]) and (theirs[:, ours.shape[1] :] == tok.pad_token_id).all()


def _first_token_frequencies(model, batch, config, n):
    one = {k: v[:1].repeat(n, 1) for k, v in batch.items()}  # one prompt n times: one prefill, n draws
    torch.manual_seed(0)
    first = decode(model, one, config)[:, 0]
    return torch.bincount(first, minlength=model.config.vocab_size).double() / n


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6)])
def test_sampled_tokens_follow_the_warped_softmax(setup, top_k, top_p):
    """4,000 draws of a prompt's first token: frequencies within 5 standard errors of the probabilities of
    softmax(logits / T) after transformers' own top-k / top-p warpers, and none outside their support."""
    tok, model, batch = setup
    gen = GenerationConfig(max_new_tokens=1, temperature=1.5, top_k=top_k, top_p=top_p)
    config = sampling_config(gen, tok.eos_token_id, tok.pad_token_id)
    n = 4000
    freq = _first_token_frequencies(model, batch, config, n)
    with torch.no_grad():
        logits = model(**{k: v[:1] for k, v in batch.items()}).logits[:, -1].float()
    probs = torch.softmax(warpers(config)(None, logits), -1)[0].double()
    assert (freq[probs == 0] == 0).all()
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-3).all(), (freq - probs).abs().max()
    if top_k:
        assert int((freq > 0).sum()) <= top_k


def test_inverse_cdf_draw_never_picks_a_token_of_probability_zero():
    torch.manual_seed(0)
    logits = torch.full((64, 10), float("-inf"))
    logits[:, 3] = 0.0
    logits[:, 7] = 1.0
    picks = torch.cat([next_tokens(logits, warpers(HFConfig(do_sample=True)), True) for _ in range(200)])
    assert set(picks.tolist()) == {3, 7}
    share = (picks == 7).double().mean().item()
    assert abs(share - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
