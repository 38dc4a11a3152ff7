"""Held-out evaluation of a policy (rlhf_cli/rollout/evaluation.py), shared by PPO, rejection sampling and `rlhf eval`:
the same numbers for a plain frozen model, a training engine and a ZeRO-3 inference engine holding the same weights;
the gold metric; the same draws at every evaluation; the caller's RNG state and train mode untouched."""

from __future__ import annotations

import copy
import socket
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY

from rlhf_cli import engine as eng
from rlhf_cli.config.compose import compose
from rlhf_cli.config.online import GenerationConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.errors import UserError
from rlhf_cli.models import build_tiny_llama, disable_dropout, tiny_tokenizer
from rlhf_cli.rollout.evaluation import PolicyEval, evaluate_policy
from rlhf_cli.rollout.generation import decode_responses, sample, sampling_config
from rlhf_cli.rollout.rewards import FunctionReward, load_function
from rlhf_cli.tasks.parity import gold_reward, make_prompt

ONE_RANK = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
GEN = GenerationConfig(max_new_tokens=8, temperature=0.9)
KEYS = {"eval_score", "eval_response_length", "eval_eos_fraction", "eval_gold"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = build_tiny_llama(TINY, tok, 3)
    disable_dropout(m)
    return m.eval()


@pytest.fixture(scope="module")
def examples(tok):
    return [tokenize_prompt(tok, [{"role": "user", "content": make_prompt(n)}], 64) for n in (3, 10, 17, 24, 1001)]


@pytest.fixture(scope="module")
def process_group():
    """A 1-process gloo group for DeepSpeed, kept to the end of the session (DeepSpeed caches the group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            mp.setenv(key, value)
        mp.setenv("MASTER_PORT", str(port))
        eng.init_distributed()
        yield


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def maybe_reward(prompts, responses):
    """No score for the first prompt's response (a reward function that cannot judge it)."""
    return [None if p.startswith("Is 3 ") else 1.0 for p in prompts]


def _evaluate(policy, examples, tok, **kwargs):
    reward = FunctionReward("test_policy_eval:length_reward")
    return evaluate_policy(policy, reward, examples, PolicyEval(tok, GEN, ONE_RANK, seed=7, batch_size=2, **kwargs))


def test_greedy_evaluation_by_hand_with_the_gold_metric(model, examples, tok):
    gold = load_function("rlhf_cli.tasks.parity:gold_reward", key="stage.gold_reward")
    out = _evaluate(model, examples, tok, gold=gold)
    assert set(out) == KEYS
    greedy = sampling_config(GEN, tok.eos_token_id, tok.pad_token_id, greedy=True)
    texts, lengths, eos = [], [], []
    for j in range(0, len(examples), 2):  # the same batches of 2 as the evaluation
        seq = sample(
            model, collate_prompts(examples[j : j + 2], tok.pad_token_id), greedy, tok.eos_token_id, tok.pad_token_id
        )
        texts += decode_responses(tok, seq)
        lengths += seq.response_mask.sum(1).tolist()
        eos += seq.has_eos.tolist()
    n = len(examples)
    assert out["eval_score"] == pytest.approx(sum(len(t) for t in texts) / n)
    assert out["eval_response_length"] == pytest.approx(sum(lengths) / n)
    assert out["eval_eos_fraction"] == pytest.approx(sum(eos) / n)
    assert out["eval_gold"] == pytest.approx(sum(gold_reward([e.text for e in examples], texts)) / n)
    assert _evaluate(model, [], tok) == {}


def test_sampled_evaluation_draws_the_same_at_every_call_and_leaves_rng_and_mode_alone(model, examples, tok):
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _evaluate(model, examples, tok, sampling=True)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    model.eval()
    assert _evaluate(model, examples, tok, sampling=True) == first
    assert first != _evaluate(model, examples, tok)  # sampled at temperature 0.9, not greedy


def test_unscorable_responses_are_left_out_only_when_allowed(model, examples, tok):
    reward = FunctionReward("test_policy_eval:maybe_reward")
    with pytest.raises(UserError, match="stage.reward.function test_policy_eval:maybe_reward must return"):
        evaluate_policy(model, reward, examples, PolicyEval(tok, GEN, ONE_RANK, seed=7, batch_size=2))
    how = PolicyEval(tok, GEN, ONE_RANK, seed=7, batch_size=2, allow_invalid=True)
    out = evaluate_policy(model, reward, examples, how)
    assert out["eval_score"] == 1.0 and out["eval_invalid_fraction"] == pytest.approx(1 / 5)


def test_a_training_engine_and_a_zero3_frozen_engine_evaluate_like_the_plain_model(model, examples, tok, process_group):
    """The same weights in a training engine (ZeRO-0, left in train mode) and in a ZeRO-3 inference engine
    (`engine.frozen`) give the plain model's numbers, greedy and sampled; the training engine is in train mode
    afterwards."""
    gold = load_function("rlhf_cli.tasks.parity:gold_reward")
    expected = [_evaluate(model, examples, tok, gold=gold, sampling=s) for s in (False, True)]
    cfg = compose("sft", [])
    trained = eng.initialize(copy.deepcopy(model), eng.ds_config(cfg.deepspeed, cfg.optim, 2, 1, 1), cfg.optim, 1)
    trained.train()
    zero3 = SimpleNamespace(zero_stage=3, precision="fp32", offload_param=False)
    frozen = eng.frozen(copy.deepcopy(model), zero3, micro_batch=2, device=torch.device("cpu"))
    assert frozen.zero_optimization_stage() == 3
    for policy in (trained, frozen):
        got = [_evaluate(policy, examples, tok, gold=gold, sampling=s) for s in (False, True)]
        assert got == expected
    assert trained.training and trained.module.training and not frozen.module.training


def test_gathered_for_generation_gives_a_plain_module_in_eval_mode_without_gradients():
    module = torch.nn.Linear(2, 2).train()
    with eng.gathered_for_generation(module) as inner:
        assert inner is module and not module.training and not torch.is_grad_enabled()
    assert module.training and torch.is_grad_enabled()
