"""Rollout mechanics: EOS truncation, the left-padded layout and its position ids, log-probs read back by a training
forward equal those of generation and of each row alone, dropout and the first-step ratio, reward functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY

from rlhf_cli.config.online import GenerationConfig
from rlhf_cli.data import PreferencePair, tokenize_pair
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.errors import UserError
from rlhf_cli.losses.ppo import policy_loss
from rlhf_cli.models import build_tiny_llama, disable_dropout, tiny_tokenizer
from rlhf_cli.rollout.generation import (
    join,
    response_logits,
    response_logprobs,
    sample,
    sampling_config,
    truncate_at_eos,
)
from rlhf_cli.rollout.rewards import FunctionReward, ModelReward

TAU = 0.7
PROMPTS = ["Is 7 even or odd?", "Reverse the order of these words: cat, dog, sun, moon, tree.", "Hi"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, seed=0):
    model = build_tiny_llama(TINY, tok, seed)
    disable_dropout(model)
    return model.eval()


def _prompts(tok):
    return [tokenize_prompt(tok, [{"role": "user", "content": p}], 128) for p in PROMPTS]


def test_truncate_at_eos_keeps_the_eos_and_pads_after_it():
    response = torch.tensor([[5, 1, 7, 7], [5, 6, 7, 8], [1, 4, 1, 4]])
    ids, mask, has_eos = truncate_at_eos(response, eos_id=1, pad_id=0)
    assert ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_join_counts_positions_over_real_tokens_only():
    prompt = torch.tensor([[0, 0, 9, 9], [9, 9, 9, 9]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seq = join(
        prompt,
        prompt_mask,
        torch.tensor([[4, 1, 0], [4, 4, 4]]),
        torch.tensor([[1.0, 1, 0], [1, 1, 1]]),
        torch.tensor([True, False]),
    )
    assert seq.prompt_len == 4
    assert seq.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert seq.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6]]
    sub = seq.rows(torch.tensor([0]))  # trailing columns that are padding in every selected row go
    assert sub.input_ids.shape == (1, 6) and sub.response_mask.tolist() == [[1, 1]]


def test_rollout_logprobs_match_the_sampling_distribution_and_each_row_alone(tok):
    """The old log-probs a training forward reads from the left-padded batch equal (i) the log-softmax at the
    same temperature of the logits the decoding loop sampled from (recorded by a spy on its token choice), and
    (ii) a forward of each row without padding."""
    from rlhf_cli.rollout import decode as decode_mod

    model, prompts = _model(tok), _prompts(tok)
    batch = collate_prompts(prompts, tok.pad_token_id)
    assert batch["attention_mask"][:, 0].tolist() == [0, 1, 0]  # left-padded: the long prompt sets the width
    gen = GenerationConfig(max_new_tokens=8, temperature=TAU)
    config = sampling_config(gen, tok.eos_token_id, tok.pad_token_id)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (the live rows' logits, the tokens drawn)
    original = decode_mod.next_tokens

    def spy(logits, warp, do_sample):
        tokens = original(logits, warp, do_sample)
        seen.append((logits.clone(), tokens.clone()))
        return tokens

    torch.manual_seed(0)
    decode_mod.next_tokens = spy
    try:
        seq = sample(model, batch, config, tok.eos_token_id, tok.pad_token_id)
    finally:
        decode_mod.next_tokens = original
    with torch.no_grad():
        logprobs = response_logprobs(response_logits(model, seq), seq, TAU)
    live = torch.arange(len(prompts))
    for t, (logits, tokens) in enumerate(seen):  # rows leave the batch after their EOS
        at_sampling = (logits / TAU).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.equal(seq.response_ids[live, t], tokens)
        assert torch.allclose(logprobs[live, t], at_sampling, atol=1e-4)
        live = live[tokens != tok.eos_token_id]
    for i, p in enumerate(prompts):
        n = int(seq.response_mask[i].sum())
        ids = torch.tensor([p.input_ids + seq.response_ids[i, :n].tolist()])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, len(p.input_ids) - 1 : -1].float() / TAU
        expected = alone.log_softmax(-1).gather(-1, ids[0, len(p.input_ids) :, None]).squeeze(-1)
        assert torch.allclose(logprobs[i, :n], expected, atol=1e-4)
        assert (logprobs[i, n:] == 0).all()


def test_first_ppo_step_has_ratio_one_only_with_dropout_off(tok):
    """Rollout log-probs come from eval mode; the first training forward runs in train mode. With dropout off the
    ratio is exactly 1 and the approximate KL 0; with attention dropout left on, they are not."""
    prompts = _prompts(tok)
    batch = collate_prompts(prompts, tok.pad_token_id)
    config = sampling_config(GenerationConfig(max_new_tokens=6, temperature=TAU), tok.eos_token_id, tok.pad_token_id)
    for dropout_off in (True, False):
        model = build_tiny_llama(TINY, tok, 0)
        model.config.attention_dropout = 0.5
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
        if dropout_off:
            disable_dropout(model)
        torch.manual_seed(1)
        seq = sample(model.eval(), batch, config, tok.eos_token_id, tok.pad_token_id)
        with torch.no_grad():
            old = response_logprobs(response_logits(model, seq), seq, TAU)
        model.train()
        new = response_logprobs(response_logits(model, seq), seq, TAU)
        _, _, approx_kl = policy_loss(new, old, torch.ones_like(new), 0.2)
        mask = seq.response_mask.bool()
        ratio_dev = (new - old)[mask].abs().max().item()
        if dropout_off:
            assert ratio_dev < 1e-6 and approx_kl[mask].abs().max().item() < 1e-10
        else:
            assert ratio_dev > 1e-3


def test_reward_model_reads_the_token_ids_it_was_trained_on(tok):
    """With the policy's tokenizer, the reward model sees prompt + response ids exactly as `rlhf rm` tokenized its
    pairs (tokenize_pair), ending at the EOS, whatever padding the rollout batch had."""
    conv = [{"role": "user", "content": "Is 4 even or odd?"}]
    trained = tokenize_pair(tok, PreferencePair("test", conv, "4 is even.", "4 is odd."), max_length=256)
    prompts = [tokenize_prompt(tok, conv, 64), tokenize_prompt(tok, [{"role": "user", "content": PROMPTS[1]}], 64)]
    assert prompts[0].input_ids == trained.prompt_ids
    batch = collate_prompts(prompts, tok.pad_token_id)
    sampled = torch.tensor([[*trained.chosen_ids, 7, 7], [9, 9, 9, 9, 9, 9, 9]])[:, : len(trained.chosen_ids) + 2]
    response, mask, has_eos = truncate_at_eos(sampled, tok.eos_token_id, tok.pad_token_id)
    seq = join(batch["input_ids"], batch["attention_mask"], response, mask, has_eos)
    reward = ModelReward.__new__(ModelReward)  # only the encoding is under test: no model needed
    reward.same_tokens, reward.tokenizer, reward.dist = True, tok, SimpleNamespace(device=torch.device("cpu"))
    reward.cfg = SimpleNamespace(text="conversation")
    encoded = reward._encode(prompts, seq, ["4 is even.", "..."])
    n = len(trained.prompt_ids) + len(trained.chosen_ids)
    assert encoded["input_ids"][0, :n].tolist() == trained.prompt_ids + trained.chosen_ids
    assert encoded["attention_mask"][0].sum() == n and trained.chosen_ids[-1] == tok.eos_token_id
    assert encoded["attention_mask"][1].sum() == len(prompts[1].input_ids) + sampled.shape[1]  # no EOS: all of it
    # stage.reward.text=response (a classifier of the text itself): the response alone, never the prompt.
    reward.cfg = SimpleNamespace(text="response")
    alone = reward._encode(prompts, seq, ["4 is even.", "..."])
    first = tok("4 is even.")["input_ids"]
    assert alone["input_ids"][0, : len(first)].tolist() == first and alone["attention_mask"][0].sum() == len(first)


def test_function_reward_checks_what_the_function_returns(tok):
    seq = join(
        torch.zeros(2, 1, dtype=torch.long),
        torch.ones(2, 1),
        torch.ones(2, 1, dtype=torch.long),
        torch.ones(2, 1),
        torch.tensor([True, True]),
    )
    prompts = [
        tokenize_prompt(tok, [{"role": "user", "content": p}], 64) for p in ("Is 4 even or odd?", "Is 3 even or odd?")
    ]
    reward = FunctionReward("rlhf_cli.tasks.parity:gold_reward")
    assert reward.score(prompts, seq, ["4 is even.", "3 is even."]).tolist() == [1.0, 0.0]
    with pytest.raises(UserError, match="one finite number per response"):
        FunctionReward("test_rollout:one_score").score(prompts, seq, ["a", "b"])
    with pytest.raises(UserError, match="one finite number per response"):
        FunctionReward("test_rollout:nan_scores").score(prompts, seq, ["a", "b"])
    with pytest.raises(UserError, match="must return a list of numbers"):
        FunctionReward("test_rollout:words").score(prompts, seq, ["a", "b"])
    with pytest.raises(UserError, match="has no function `nope`"):
        FunctionReward("rlhf_cli.tasks.parity:nope")


def one_score(prompts, responses):
    return [1.0]


def nan_scores(prompts, responses):
    return [float("nan")] * len(responses)


def words(prompts, responses):
    return ["good"] * len(responses)


def _rollout(mask, has_eos, logprobs, ref_logprobs, values, raw_scores):
    from rlhf_cli.rollout.experience import Rollout
    from rlhf_cli.rollout.scoring import Scores

    seq = join(
        torch.zeros(len(mask), 1, dtype=torch.long),
        torch.ones(len(mask), 1),
        torch.ones(mask.shape, dtype=torch.long),
        mask,
        has_eos,
    )
    return Rollout(
        seq,
        [None] * len(mask),
        ["r"] * len(mask),
        torch.arange(len(mask)),
        logprobs,
        ref_logprobs,
        values,
        Scores(raw_scores, raw_scores.clone()),
    )


def test_rollout_metrics_by_hand():
    """Sequence-level means (score, k1 KL summed over each response, rewards, length, EOS) and the explained
    variance over valid tokens, from one rank's sums."""
    from rlhf_cli.losses.ppo import explained_variance
    from rlhf_cli.rollout.experience import Advantages
    from rlhf_cli.rollout.online import rollout_metrics

    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    ro = _rollout(
        mask,
        torch.tensor([True, False]),
        torch.tensor([[-1.0, -2, -3], [-1, -1, -0.3]]),
        torch.tensor([[-1.5, -2, -2], [-2, -1, -0.9]]),
        torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 0.0]]),
        torch.tensor([1.0, -1.0]),
    )
    non_score = torch.tensor([[-0.1, 0, 0.2], [-0.2, 0, 0]])
    adv = Advantages(
        advantages=torch.zeros(2, 3),
        returns=torch.tensor([[1.0, 0.8, 0.9], [-0.5, -1.2, 0.0]]),
        rewards=non_score + torch.tensor([[0, 0, 1.0], [0, -1, 0]]),
        non_score=non_score,
    )
    out = rollout_metrics(ro, adv)
    assert out["score_mean"] == pytest.approx(0.0) and out["score_std"] == pytest.approx(1.0)
    # k1 sums over valid tokens: (0.5 + 0 - 1) = -0.5 and (1 + 0) = 1 (the masked 0.6 is not counted) -> 0.25
    assert out["kl"] == pytest.approx(0.25)
    assert out["non_score_reward"] == pytest.approx((0.1 - 0.2) / 2)
    assert out["total_reward"] == pytest.approx((0.1 - 0.2 + 1 - 1) / 2)
    assert out["response_length"] == 2.5 and out["eos_fraction"] == 0.5 and out["generated_tokens"] == 5
    assert out["explained_variance"] == pytest.approx(explained_variance(ro.values, adv.returns, mask), abs=1e-6)
    assert "invalid_fraction" not in out


def test_rollout_metrics_without_reference_critic_or_advantages_and_with_unscored_responses():
    """A critic-free, reference-free rollout (rejection sampling) reports scores, length and EOS only; a response
    that could not be scored (NaN) is left out of the score mean and counted in invalid_fraction."""
    from rlhf_cli.rollout.online import rollout_metrics

    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1]])
    ro = _rollout(
        mask, torch.tensor([True, True, False]), torch.zeros(3, 3), None, None, torch.tensor([2.0, float("nan"), 4.0])
    )
    out = rollout_metrics(ro)
    assert out == pytest.approx(
        {
            "rollout_sequences": 3,
            "score_mean": 3.0,
            "score_std": 1.0,
            "response_length": 2.0,
            "eos_fraction": 2 / 3,
            "generated_tokens": 6,
            "invalid_fraction": 1 / 3,
        }
    )


# Fields a chat checkpoint's generation_config.json may ship; each would change the sampled distribution.
SHIPPED_GENERATION = {
    "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 1,
    "min_p": 0.2,
    "typical_p": 0.5,
    "min_new_tokens": 4,
    "suppress_tokens": [3],
    "bad_words_ids": [[4]],
    "top_k": 50,
    "top_p": 0.8,
    "temperature": 0.3,
    "epsilon_cutoff": 0.01,
}


@pytest.mark.parametrize("greedy", [False, True])
def test_rollouts_ignore_the_checkpoints_generation_config(tok, greedy):
    """A checkpoint whose generation config sets penalties and warpers samples exactly what the same weights
    without them sample (same seed: same tokens), and keeps its config."""
    config = sampling_config(
        GenerationConfig(max_new_tokens=6, temperature=TAU), tok.eos_token_id, tok.pad_token_id, greedy=greedy
    )
    batch = collate_prompts(_prompts(tok), tok.pad_token_id)
    torch.manual_seed(3)
    clean = sample(_model(tok), batch, config, tok.eos_token_id, tok.pad_token_id)
    model = _model(tok)
    for key, value in SHIPPED_GENERATION.items():
        setattr(model.generation_config, key, value)
    torch.manual_seed(3)
    shipped = sample(model, batch, config, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(clean.input_ids, shipped.input_ids)
    assert model.generation_config.repetition_penalty == 1.3


def test_tokens_banned_by_the_checkpoint_config_still_reach_rollouts(tok):
    """A checkpoint config that suppresses tokens (or, like `no_repeat_ngram_size: 1`, bans the EOS that the chat
    template already put in the prompt) must not change rollouts: the greedy rollouts of the same model with and
    without it are identical, although it bans the very tokens the clean rollouts chose."""
    model, batch = _model(tok), collate_prompts(_prompts(tok), tok.pad_token_id)
    config = sampling_config(GenerationConfig(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id, greedy=True)
    clean = sample(model, batch, config, tok.eos_token_id, tok.pad_token_id)
    model.generation_config.suppress_tokens = sorted(set(clean.response_ids[:, 0].tolist()))
    model.generation_config.no_repeat_ngram_size = 1
    shipped = sample(model, batch, config, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(clean.input_ids, shipped.input_ids)


@pytest.mark.parametrize(
    "stats,clip,penalty,score,expected",
    [
        ((3.0, 2.0), None, 1.0, None, [-0.5, 0.5 - 1.0]),  # normalised, then one unit of the normalised score off
        ((3.0, 2.0), 0.4, 1.0, None, [-0.4, 0.4 - 1.0]),  # clipped first: the penalty still tells the two apart
        ((3.0, 2.0), None, 1.0, -5.0, [-0.5, -5.0]),  # the replacement wins over the (default) penalty
        (None, None, 1.0, None, [2.0, 3.0]),  # no normalisation: raw score minus the penalty
    ],
)
def test_missing_eos_rule_applies_after_normalisation_and_clipping(stats, clip, penalty, score, expected):
    from rlhf_cli.rollout.scoring import shape_scores

    reward_cfg = SimpleNamespace(clip=clip, missing_eos_penalty=penalty, missing_eos_score=score)
    out = shape_scores(torch.tensor([2.0, 4.0]), torch.tensor([True, False]), reward_cfg, stats)
    assert out.tolist() == pytest.approx(expected)


def test_bf16_policy_log_probs_come_from_fp32_logits(tok):
    """Under bf16 the LM head runs in fp32 on the bf16 hidden states: the response logits are exactly
    fp32(h) @ fp32(W).T, not bf16 logits upcast afterwards; names and tied weights of the checkpoint are unchanged."""
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm

    plain = build_tiny_llama(TINY, tok, 0)
    model = load_causal_lm(ModelConfig(tiny=TINY), tok, seed=0).to(torch.bfloat16).eval()
    assert list(model.state_dict()) == list(plain.state_dict())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (
        plain.lm_head.weight is plain.model.embed_tokens.weight
    )
    batch = collate_prompts(_prompts(tok), tok.pad_token_id)
    greedy = sampling_config(GenerationConfig(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id, greedy=True)
    seq = sample(model, batch, greedy, tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, seq)
        width = seq.response_mask.shape[1]
        hidden = model.model(
            input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids
        ).last_hidden_state[:, -width - 1 : -1]
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = hidden.float() @ model.lm_head.weight.float().T
    assert torch.equal(logits, expected)
    assert (expected.bfloat16().float() - expected).abs().max() > 0  # what a bf16 head would have rounded away
