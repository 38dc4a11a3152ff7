"""The sampler-trainer mismatch correction (losses/mismatch.py, docs/algorithms.md section 12) on hand-computed
numbers, and its path through a rollout: an engine whose sampler is the trainer leaves the update exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.losses.mismatch import sampler_weights
from rlhf_cli.rollout.generation import response_logits, response_logprobs

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.1]])
SAMPLER = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -0.1]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
E = math.exp


def test_token_truncate_and_mask_on_hand_numbers():
    # row 0: d = [0.5, -1.0, (masked)]; row 1: d = [0.8, 0.7, 0.0]; cap 1.5
    w, cut = sampler_weights(TRAINER, SAMPLER, MASK, "token_truncate", 1.5)
    expect = torch.tensor([[1.5, E(-1.0), 0.0], [1.5, 1.5, 1.0]])
    torch.testing.assert_close(w, expect)
    torch.testing.assert_close(cut, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    w, cut = sampler_weights(TRAINER, SAMPLER, MASK, "token_mask", 2.1)  # e^0.8 = 2.2255 > 2.1 > e^0.7 = 2.0138
    torch.testing.assert_close(w, torch.tensor([[E(0.5), E(-1.0), 0.0], [0.0, E(0.7), 1.0]]))
    torch.testing.assert_close(cut, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_sequence_modes_use_the_product_over_the_response():
    # row 0: sum d = -0.5 (the masked token's -8.5 must not count); row 1: sum d = 1.5 -> e^1.5 = 4.48 > cap 3
    w, cut = sampler_weights(TRAINER, SAMPLER, MASK, "sequence_truncate", 3.0)
    torch.testing.assert_close(w, torch.tensor([[E(-0.5), E(-0.5), 0.0], [3.0, 3.0, 3.0]]))
    torch.testing.assert_close(cut, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    w, _ = sampler_weights(TRAINER, SAMPLER, MASK, "sequence_mask", 3.0)
    torch.testing.assert_close(w, torch.tensor([[E(-0.5), E(-0.5), 0.0], [0.0, 0.0, 0.0]]))


def test_overflowing_sequence_ratio_is_capped_not_nan():
    trainer, sampler, mask = torch.zeros(1, 4), torch.full((1, 4), -300.0), torch.ones(1, 4)  # exp(1200) = inf
    for mode, value in (("sequence_truncate", 2.0), ("sequence_mask", 0.0)):
        w, cut = sampler_weights(trainer, sampler, mask, mode, 2.0)
        assert torch.isfinite(w).all() and (w == value).all() and (cut == 1).all()


def test_equal_log_probs_give_weights_of_exactly_one_and_none_gives_the_mask():
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        w, cut = sampler_weights(TRAINER, TRAINER.clone(), MASK, mode, 2.0)
        assert torch.equal(w, MASK) and not cut.any()
    w, cut = sampler_weights(TRAINER, SAMPLER, MASK, "none", 2.0)
    assert torch.equal(w, MASK) and not cut.any()
    with pytest.raises(ValueError, match="unknown"):
        sampler_weights(TRAINER, SAMPLER, MASK, "tokens", 2.0)


def test_weights_carry_no_gradient():
    trainer = TRAINER.clone().requires_grad_(True)
    w, _ = sampler_weights(trainer, SAMPLER, MASK, "token_truncate", 2.0)
    assert not w.requires_grad


class SamplerBeside:
    """An engine whose sampler is not the trainer: the hf engine's tokens, with `shift` added to the trainer's own
    log-probs of them as the sampler's (0: a sampler that agrees with the trainer to the last bit)."""

    name, sampler_is_trainer = "beside", False

    def __init__(self, shift: float, temperature: float):
        self.shift, self.temperature = shift, temperature

    def generate(self, model, prompts, config):
        from rlhf_cli.rollout.engines import HF

        seq = HF.generate(model, prompts, config)
        with torch.no_grad():
            own = response_logprobs(response_logits(model, seq), seq, self.temperature)
        seq.sampler_logprobs = (own + self.shift) * seq.response_mask
        return seq


def _rollout(tok, engine, correction="token_truncate"):
    from types import SimpleNamespace

    from helpers import TINY

    from rlhf_cli.config.online import GenerationConfig
    from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
    from rlhf_cli.models import build_tiny_llama, disable_dropout
    from rlhf_cli.rollout.experience import Collecting, RolloutModels, collect
    from rlhf_cli.rollout.generation import sampling_config
    from rlhf_cli.rollout.rewards import FunctionReward

    model = build_tiny_llama(TINY, tok, 0)
    disable_dropout(model)
    prompts = [
        tokenize_prompt(tok, [{"role": "user", "content": p}], 64) for p in ("Is 7 even or odd?", "Is 12 even or odd?")
    ]
    batch = collate_prompts(prompts, tok.pad_token_id)
    reward = SimpleNamespace(clip=None, missing_eos_penalty=1.0, missing_eos_score=None)
    st = SimpleNamespace(
        micro_batch_size=4, generation=GenerationConfig(max_new_tokens=6, temperature=0.7), reward=reward
    )
    config = sampling_config(st.generation, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    how = Collecting(tok, st, config, n_samples=2, old_logprobs=False, engine=engine, correction=correction)
    return collect(RolloutModels(model, FunctionReward("rlhf_cli.tasks.parity:gold_reward")), prompts, batch, how)


def test_hf_engine_leaves_no_weights_and_an_agreeing_sampler_gives_exactly_one():
    """The hf engine's sampler is the trainer: no weights at all (the loss is untouched) and no sampler metrics. A
    sampler whose log-probs equal the trainer's gives weights of exactly 1 and a measured mismatch of exactly 0; one
    whose log-probs are 1 nat under the trainer's on every token has ratio e > cap 2: weight 2, all truncated, k3
    KL e - 2. A method that updates once per batch keeps its ratio against the current log-probs (logprobs None)."""
    from rlhf_cli.models import tiny_tokenizer
    from rlhf_cli.rollout.engines import HF
    from rlhf_cli.rollout.online import rollout_metrics

    tok = tiny_tokenizer()
    plain = _rollout(tok, HF)
    assert plain.is_weights is None and plain.sampler_diff is None and plain.logprobs is None
    assert not any(k.startswith("sampler_") for k in rollout_metrics(plain))
    same = _rollout(tok, SamplerBeside(0.0, 0.7))
    assert torch.equal(same.seq.input_ids, plain.seq.input_ids) and same.logprobs is None
    assert torch.equal(same.is_weights, same.mask) and not same.is_truncated.any()
    m = rollout_metrics(same)
    assert m["sampler_kl"] == 0.0 and m["sampler_abs_logp_diff"] == 0.0 and m["sampler_truncated"] == 0.0
    under = _rollout(tok, SamplerBeside(-1.0, 0.7))
    torch.testing.assert_close(under.is_weights, 2.0 * under.mask)
    m = rollout_metrics(under)
    assert m["sampler_truncated"] == 1.0 and abs(m["sampler_kl"] - (math.e - 2)) < 1e-5
    assert abs(m["sampler_abs_logp_diff"] - 1.0) < 1e-6
    off = _rollout(tok, SamplerBeside(-1.0, 0.7), correction="none")
    assert torch.equal(off.is_weights, off.mask) and not off.is_truncated.any()
