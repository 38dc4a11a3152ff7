"""Reward and gold functions that misbehave (rlhf_cli/rollout/rewards.py): an exception inside the user's function is
one UserError naming the setting, the function and the user's own frames; a weight-0 term never drops a sample; on
several ranks the rank whose function raised takes every rank down with the same message."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.errors import UserError
from rlhf_cli.rollout.rewards import FunctionReward, build_gold

HERE = __name__
SEQ = SimpleNamespace(input_ids=torch.zeros(3, 2))
PROMPTS = [SimpleNamespace(text="q")] * 3


def judge(reply):
    return {"yes": 1.0}[reply]  # a KeyError for any other reply


def raising(prompts, responses):
    return [judge(r) for r in responses]


def right(prompts, responses):
    return [1.0 if r == "yes" else 0.0 for r in responses]


def nothing(prompts, responses):
    return [None for _ in responses]


def test_an_exception_in_the_reward_function_names_the_setting_the_function_and_its_frames():
    reward = FunctionReward(f"{HERE}:raising")
    with pytest.raises(UserError) as caught:
        reward.score(PROMPTS, SEQ, ["yes", "no", "yes"], allow_invalid=True)
    message = str(caught.value)
    assert message.startswith(f"stage.reward.function=`{HERE}:raising` raised KeyError: 'no'")
    assert 'test_reward_functions.py", line' in message and "in raising" in message and "in judge" in message
    assert 'return {"yes": 1.0}[reply]' in message  # the user's own line
    assert "rlhf_cli" not in message.replace(f"{HERE}:", "")  # none of our frames
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback of ours


def test_the_same_for_a_term_of_several_functions_and_for_a_gold_function():
    terms = FunctionReward([(f"{HERE}:right", 1.0), (f"{HERE}:raising", 0.5)], key="stage.reward.functions")
    with pytest.raises(UserError, match=rf"^stage.reward.functions=`{HERE}:raising` raised KeyError"):
        terms.score(PROMPTS, SEQ, ["yes", "no", "no"])
    gold = build_gold(f"{HERE}:raising", None, None, None, None, None, key="stage.gold")
    assert gold.__name__ == "raising" and gold.__module__ == HERE  # named as the user's function in messages
    assert gold(["q"], ["yes"]) == [1.0]
    with pytest.raises(UserError, match=rf"^stage.gold=`{HERE}:raising` raised KeyError: 'maybe'"):
        gold(["q"], ["maybe"])


def test_a_function_called_with_the_wrong_arguments_says_how_it_is_called():
    reward = FunctionReward("math:sqrt")  # takes one number, gets (prompts, responses)
    with pytest.raises(UserError, match=r"(?s)`math:sqrt` raised TypeError.*called as sqrt\(prompts, responses\)"):
        reward.score(PROMPTS, SEQ, ["a", "b", "c"])


def test_a_weight_0_term_that_cannot_judge_does_not_drop_the_sample():
    reward = FunctionReward([(f"{HERE}:right", 1.0), (f"{HERE}:nothing", 0.0)], key="stage.reward.functions")
    out = reward.score(PROMPTS, SEQ, ["yes", "no", "yes"], allow_invalid=True)
    assert out.tolist() == [1.0, 0.0, 1.0]
    assert reward.last_terms["nothing"].isnan().all()  # still logged (reward/nothing: no finite value)
    # Where an unscorable response is an error (PPO), a weight-0 term's None is not one: it adds nothing.
    assert reward.score(PROMPTS, SEQ, ["yes", "no", "yes"]).tolist() == [1.0, 0.0, 1.0]
    both = FunctionReward([(f"{HERE}:right", 1.0), (f"{HERE}:nothing", 0.5)], key="stage.reward.functions")
    assert both.score(PROMPTS, SEQ, ["yes", "no", "yes"], allow_invalid=True).isnan().all()


def rank_one_raises(prompts, responses):
    import torch.distributed as tdist

    if tdist.get_rank() == 1:
        raise RuntimeError("rank one cannot judge")
    return [1.0] * len(responses)


def _two_ranks(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks; the reward function raises on rank 1 only. Then a gold function that works everywhere
    (the ranks are still in step)."""
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    reward = FunctionReward(f"{HERE}:rank_one_raises", together=True)
    try:
        reward.score(PROMPTS, SEQ, ["a", "b", "c"], allow_invalid=True)
        message = None
    except UserError as err:
        message = str(err)
    gold = build_gold(f"{HERE}:right", None, None, None, None, None, together=True)
    Path(out, f"{rank}.json").write_text(json.dumps({"message": message, "gold": gold(["q"], ["yes"])}))
    tdist.destroy_process_group()


def test_on_two_ranks_the_rank_that_raised_stops_both_with_its_message(tmp_path):
    import torch.multiprocessing as mp

    from rlhf_cli.engine import _free_port

    mp.spawn(_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["message"] == got[1]["message"]
    assert got[0]["message"].startswith(
        f"stage.reward.function=`{HERE}:rank_one_raises` raised RuntimeError: rank one cannot judge (on rank 1)"
    )
    assert all(g["gold"] == [1.0] for g in got)
