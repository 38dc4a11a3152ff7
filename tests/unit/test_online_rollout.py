"""Rollout collection for every online stage (rlhf_cli/rollout/experience.py): N samples per prompt with the group
of each row kept, with or without a critic and a reference; the advantage fields in their own result."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY

from rlhf_cli.config.online import GenerationConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.models import build_tiny_llama, disable_dropout, tiny_tokenizer
from rlhf_cli.rollout.experience import Advantages, Collecting, RolloutModels, advantages, collect, expand
from rlhf_cli.rollout.generation import join, response_logits, response_logprobs, sampling_config, truncate_at_eos
from rlhf_cli.rollout.rewards import FunctionReward

PROMPTS = ["Is 7 even or odd?", "Reverse the order of these words: cat, dog, sun.", "Hi"]
EOS, PAD, VOCAB = 1, 0, 50


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _st(micro=2, temperature=0.7):
    reward = SimpleNamespace(clip=None, missing_eos_penalty=1.0, missing_eos_score=None)
    return SimpleNamespace(
        micro_batch_size=micro, generation=GenerationConfig(max_new_tokens=6, temperature=temperature), reward=reward
    )


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_expand_puts_the_copies_of_a_prompt_together():
    prompts, group = expand(["a", "b", "c"], 2)
    assert prompts == ["a", "a", "b", "b", "c", "c"] and group.tolist() == [0, 0, 1, 1, 2, 2]
    assert expand(["a", "b"], 1)[0] == ["a", "b"] and expand(["a", "b"], 1)[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="n_samples"):
        expand(["a"], 0)


class Echo(torch.nn.Module):
    """A deterministic stand-in policy: its logits are zeros (the log-probs read back are those of a uniform
    distribution)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        return SimpleNamespace(logits=torch.zeros(len(input_ids), logits_to_keep, VOCAB))


class EchoEngine:
    """A rollout engine whose response to a prompt is the prompt's first real token, then the row's position in
    the batch (so each copy differs), then EOS."""

    name, sampler_is_trainer = "echo", True

    def generate(self, model, prompts, config):
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        first = ids.gather(1, mask.argmax(1, keepdim=True))  # (B, 1): the first real token
        row = torch.arange(len(ids))[:, None] + 10
        response = torch.cat([first, row, torch.full_like(first, EOS)], dim=1)
        response, response_mask, has_eos = truncate_at_eos(response, EOS, PAD)
        return join(ids, mask, response, response_mask, has_eos)


def _example(ids):
    return SimpleNamespace(input_ids=ids, text=" ".join(map(str, ids)))


def test_n_samples_per_prompt_keep_prompt_and_group_aligned():
    """Row i of a rollout with n samples per prompt was generated from prompt i // n: its prompt ids are that
    prompt's, its response starts with that prompt's first token, and its group id is i // n."""
    prompts = [_example([21, 22, 23]), _example([31]), _example([41, 42])]
    batch = collate_prompts(prompts, PAD)
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, batch_decode=lambda ids, **kw: [str(r) for r in ids])
    n = 3
    models = RolloutModels(Echo(), FunctionReward("test_online_rollout:length_reward"))
    how = Collecting(tok, _st(), GenerationConfig(max_new_tokens=3), n_samples=n, engine=EchoEngine())
    ro = collect(models, prompts, batch, how)
    assert len(ro.prompts) == ro.seq.input_ids.shape[0] == 9
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(9):
        source = prompts[i // n]
        assert ro.prompts[i] is source
        real = ro.seq.attention_mask[i, : ro.seq.prompt_len].bool()
        assert ro.seq.input_ids[i, : ro.seq.prompt_len][real].tolist() == source.input_ids
        assert ro.seq.response_ids[i].tolist() == [source.input_ids[0], 10 + i, EOS]
    assert ro.values is None and ro.ref_logprobs is None
    assert ro.logprobs.shape == (9, 3) and ro.scores.raw.shape == (9,)


def test_critic_free_rollout_of_a_tiny_model(tok):
    """No critic, no reference, 2 sampled responses per prompt: the old log-probs equal a forward of each row alone
    at the sampling temperature, scores come from the reward function, and the model's train mode comes back."""
    model = build_tiny_llama(TINY, tok, 0)
    disable_dropout(model)
    model.train()
    prompts = [tokenize_prompt(tok, [{"role": "user", "content": p}], 128) for p in PROMPTS]
    batch = collate_prompts(prompts, tok.pad_token_id)
    st = _st(micro=4)
    config = sampling_config(st.generation, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    models = RolloutModels(model, FunctionReward("test_online_rollout:length_reward"))
    ro = collect(models, prompts, batch, Collecting(tok, st, config, n_samples=2))
    assert model.training
    assert ro.group.tolist() == [0, 0, 1, 1, 2, 2] and ro.values is None and ro.ref_logprobs is None
    assert ro.scores.raw.tolist() == [float(len(r)) for r in ro.responses]
    model.eval()
    for i in range(6):
        n = int(ro.mask[i].sum())
        prompt = prompts[i // 2].input_ids
        assert ro.seq.input_ids[i, ro.seq.prompt_len - len(prompt) : ro.seq.prompt_len].tolist() == prompt
        alone = ro.seq.rows(torch.tensor([i]))
        with torch.no_grad():
            expected = response_logprobs(response_logits(model, alone), alone, st.generation.temperature)
        assert torch.allclose(ro.logprobs[i, :n], expected[0, :n], atol=1e-4)
    with pytest.raises(ValueError, match="reference log-probs and critic values"):
        advantages(ro, SimpleNamespace(kl_estimator="k1"), 0.05)


def test_ppo_advantages_come_back_in_their_own_result(tok):
    """KL in the reward and GAE, returned as an Advantages; the rollout itself is not changed."""
    from rlhf_cli.rollout.experience import Rollout
    from rlhf_cli.rollout.generation import join
    from rlhf_cli.rollout.scoring import Scores

    mask = torch.tensor([[1.0, 1, 1]])
    seq = join(
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, 1),
        torch.ones(1, 3, dtype=torch.long),
        mask,
        torch.tensor([True]),
    )
    logprobs, ref = torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.1, -0.8, -1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    ro = Rollout(
        seq,
        [None],
        ["r"],
        torch.zeros(1, dtype=torch.long),
        logprobs,
        ref,
        values,
        Scores(torch.tensor([0.9]), torch.tensor([0.985])),
    )
    st = SimpleNamespace(kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95)
    adv = advantages(ro, st, kl_coef=0.05)
    assert isinstance(adv, Advantages)
    # k1 = [0.1, -0.2, 0]: r = -0.05 k1 + the shaped score on the last token = [-0.005, 0.01, 0.985], the worked
    # example of docs/algorithms.md section 4.4: returns [0.9419625, 0.97575, 0.985], advantages whitened.
    assert adv.rewards[0].tolist() == pytest.approx([-0.005, 0.01, 0.985])
    assert adv.non_score[0].tolist() == pytest.approx([-0.005, 0.01, 0.0])
    assert adv.kl[0].tolist() == pytest.approx([0.1, -0.2, 0.0])
    assert adv.returns[0].tolist() == pytest.approx([0.9419625, 0.97575, 0.985])
    raw = torch.tensor([0.7419625, 0.57575, 0.385])
    assert adv.advantages[0].tolist() == pytest.approx(
        ((raw - raw.mean()) / raw.var(unbiased=False).sqrt()).tolist(), abs=1e-5
    )
    assert not hasattr(ro, "advantages") and torch.equal(ro.values, values)
