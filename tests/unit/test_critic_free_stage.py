"""The critic-free stages' rollout-level parts (rlhf_cli/rollout/critic_free.py, stages/critic_free_update.py,
stages/critic_free.py, stages/plan.py, config/batches.py): advantages over a batch whose groups straddle ranks, the
loss weights, dynamic sampling, joining rollouts, weighted reward functions, the config refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.config.batches import critic_free_rows
from rlhf_cli.errors import UserError
from rlhf_cli.losses import critic_free as cf
from rlhf_cli.losses.ppo import kl_penalty
from rlhf_cli.rollout import critic_free as rcf
from rlhf_cli.rollout.experience import Rollout, concat, take_rows
from rlhf_cli.rollout.generation import Sequences
from rlhf_cli.rollout.rewards import FunctionReward
from rlhf_cli.rollout.scoring import Scores
from rlhf_cli.stages import critic_free_update as cfu
from rlhf_cli.stages.plan import critic_free_plan

G = 4
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, math.nan, 0.0, 2.0]  # 3 groups: mixed, all equal, one NaN
LENGTHS = [3, 1, 4, 2, 4, 4, 1, 2, 3, 3, 4, 1]


def _st(advantage="grpo", **kw):
    base = dict(
        advantage=advantage,
        n_samples=G,
        scale_rewards="group",
        loss_aggregation="token_mean",
        kl_coef=0.1,
        gamma=1.0,
        mask_truncated=False,
        generation=SimpleNamespace(max_new_tokens=4),
        rollout_batch_size=3,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        dynamic_sampling=False,
        ppo_epochs=1,
        max_sampling_batches=3,
        max_steps=None,
        epochs=1.0,
    )
    return SimpleNamespace(**{**base, **kw})


def _rollout(rows=range(12), prompt_len=2, width=4, all_scores=SCORES) -> Rollout:
    """Rows of a fixed 12-row batch: response lengths LENGTHS, EOS on all but row 2, scores SCORES, and log-probs
    that differ from the reference's."""
    rows = list(rows)
    n = len(rows)
    lengths = torch.tensor([LENGTHS[i] for i in rows])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    ids = torch.arange(n * (prompt_len + width)).view(n, -1) % 17 + 2
    attention = torch.cat([torch.ones(n, prompt_len), mask], 1).long()
    seq = Sequences(ids, attention, attention.cumsum(1) - 1, mask, torch.tensor([i != 2 for i in rows]), prompt_len)
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(12, width, generator=gen)[rows] * mask
    ref = -torch.rand(12, width, generator=gen)[rows] * mask
    scores = torch.tensor([all_scores[i] for i in rows])
    return Rollout(
        seq,
        [f"p{i // G}" for i in rows],
        [f"r{i}" for i in rows],
        torch.tensor([i // G for i in rows]),
        logprobs,
        ref,
        None,
        Scores(scores, scores.clone()),
        {"generation": 1.0, "scoring": 0.5},
    )


def test_grpo_advantages_by_hand_with_a_zero_variance_group_and_a_nan():
    est = rcf.estimate(_rollout(), _st("grpo"), offset=0)
    adv = est.advantages.advantages
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.5774: (+-0.5) / (0.5774 + 1e-4) = +-0.8659 on every token
    assert adv[0, :3].tolist() == pytest.approx([0.8659] * 3, abs=1e-4) and adv[0, 3] == 0
    assert adv[1, 0] == pytest.approx(-0.8659, abs=1e-4)
    assert (adv[4:8] == 0).all()  # all equal: no signal
    # group 2: valid 0.5, 0, 2 -> mean 0.8333, std 1.0408; the NaN row is out of the loss
    assert adv[8, 0] == pytest.approx((0.5 - 5 / 6) / (1.040833 + 1e-4), abs=1e-4)
    assert (est.loss_mask[9] == 0).all() and (est.weights[9] == 0).all() and est.loss_mask[8].sum() == 3
    assert est.stats["zero_variance_groups"] == pytest.approx(1 / 3)


def test_rloo_puts_the_sequence_kl_into_the_reward_before_the_leave_one_out_baseline():
    ro, st = _rollout(), _st("rloo")
    est = rcf.estimate(ro, st, offset=0)
    k1 = ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1)
    reward = torch.tensor(SCORES[:4]) - 0.1 * k1[:4]
    expected = reward - (reward.sum() - reward) / 3  # leave-one-out, group 0
    assert est.advantages.advantages[:4, 0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "advantage,truncated", [("reinforce_pp", False), ("reinforce_pp_baseline", False), ("reinforce_pp", True)]
)
def test_reinforce_pp_returns_are_whitened_over_the_valid_tokens(advantage, truncated):
    ro, st = _rollout(), _st(advantage, mask_truncated=truncated)
    est = rcf.estimate(ro, st, offset=0)
    adv, m = est.advantages.advantages, est.loss_mask.bool()
    # The NaN row is always out; with mask_truncated so is row 2 (no EOS), and the whitening ignores it too.
    assert not m[9].any() and m[2].any() != truncated and (adv[~m] == 0).all()
    assert float(adv[m].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(adv[m].var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # Before whitening, row 0's first-token return is the score (minus its group mean) minus the summed KL penalty.
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * ro.mask
    outcome = 1.0 - (0.5 if advantage == "reinforce_pp_baseline" else 0.0)
    returns, _ = cf.reinforce_pp_returns(kl, torch.tensor([outcome] * 12), ro.mask, 0.1)
    assert float(returns[0, 0]) == pytest.approx(outcome - 0.1 * float(kl[0].sum()), abs=1e-6)


def test_loss_weights_follow_the_aggregation_and_mask_truncated():
    st = _st("grpo", loss_aggregation="seq_mean_token_mean", mask_truncated=True)
    est = rcf.estimate(_rollout(), st, offset=0)
    assert est.weights[0, :3].tolist() == pytest.approx([1 / 3] * 3)
    assert (est.weights[2] == 0).all()  # no EOS: out of the loss
    dr = rcf.estimate(_rollout(), _st("grpo", loss_aggregation="seq_mean_token_sum_norm"), offset=0)
    assert dr.weights[0, :3].tolist() == pytest.approx([0.25] * 3)  # 1 / max_new_tokens


ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
SPLIT = [*SCORES[:4], 1.0, 0.0, 1.0, 1.0, *SCORES[8:]]  # group 1 (rows 4-7: 2 on each rank) with a signal


def _split_ranks(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks holding 6 of the 12 rows: group 1 straddles the two ranks."""
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    for advantage in ESTIMATORS:
        est = rcf.estimate(_rollout(range(6 * rank, 6 * rank + 6), all_scores=SPLIT), _st(advantage), offset=6 * rank)
        Path(out, f"{advantage}-{rank}.json").write_text(json.dumps(est.advantages.advantages.tolist()))
    tdist.destroy_process_group()


def test_groups_split_across_two_ranks_get_the_advantages_of_one_process(tmp_path):
    """Group statistics over gathered scores, REINFORCE++'s whitening over all-reduced moments: 2 ranks == 1."""
    import torch.multiprocessing as mp

    from rlhf_cli.engine import _free_port

    mp.spawn(_split_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    for advantage in ESTIMATORS:
        two = torch.tensor(sum((json.loads((tmp_path / f"{advantage}-{r}.json").read_text()) for r in (0, 1)), []))
        one = rcf.estimate(_rollout(all_scores=SPLIT), _st(advantage), offset=0).advantages.advantages
        assert torch.allclose(two, one, atol=1e-6), advantage
        assert (two[4:8, 0] != 0).all()  # the straddling group has a signal


def test_concat_and_take_rows_keep_every_row_aligned():
    a, b = _rollout(range(0, 4)), _rollout(range(4, 8), prompt_len=3, width=5)
    joined = concat([a, b], pad_id=0)
    assert joined.seq.input_ids.shape == (8, 8) and joined.seq.prompt_len == 3
    assert joined.seq.input_ids[0, 1:].tolist() == a.seq.input_ids[0].tolist() + [0]  # left-padded prompt
    assert joined.seq.attention_mask[0, 0] == 0 and joined.mask[:4, 4].sum() == 0
    assert torch.equal(joined.logprobs[4:], b.logprobs) and joined.group.tolist() == [0] * 4 + [2] * 4
    assert joined.seconds == {"generation": 2.0, "scoring": 1.0}
    picked = take_rows(joined, [5, 1])
    assert picked.responses == ["r5", "r1"] and torch.equal(picked.mask[1], joined.mask[1])


def test_dynamic_sampling_replaces_groups_without_signal_then_fills():
    """Attempt 0: groups 0 (signal) and 1 (all equal); attempt 1 draws new prompts whose first group has signal."""
    draws = []

    def draw(prompt_idx, attempt):
        draws.append((list(prompt_idx), attempt))
        return _rollout(range(0, 8)) if attempt == 0 else _rollout(range(8, 12))

    plan = critic_free_plan(20, _st(rollout_batch_size=2), 1)
    st = _st(rollout_batch_size=2, dynamic_sampling=True)
    ro, stats, filler = cfu.dynamic_rollout(draw, [0, 1], plan, 0, 3, st, pad_id=0)
    assert len(draws) == 2 and draws[1][0] != [0, 1]
    assert ro.responses == [f"r{i}" for i in [0, 1, 2, 3, 8, 9, 10, 11]] and not filler.any()
    assert stats["groups_dropped"] == 1 and stats["groups_filled_without_signal"] == 0
    ro, stats, filler = cfu.dynamic_rollout(
        lambda idx, a: _rollout(range(4, 8)),
        [0],
        plan,
        0,
        3,
        _st(rollout_batch_size=1, dynamic_sampling=True),
        pad_id=0,
    )
    assert stats["sampling_rounds"] == 3 and stats["groups_filled_without_signal"] == 1 and len(ro.prompts) == 4
    assert filler.tolist() == [True] * 4  # the stage keeps these rows out of the loss


# Group 0 has a signal (mean 0.25), group 1's scores are all equal; response lengths 3, 1, 4, 2 | 4, 4, 1, 2.
EQUAL = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_an_all_equal_group_under_reinforce_pp_baseline_gets_the_whitening_shift_but_filler_gets_nothing():
    """docs/stages.md's rule: a real all-equal group keeps OpenRLHF's advantage (the batch whitening's shift), a group
    that dynamic sampling only adds to fill the batch is out of the loss, of the weights and of the whitening."""
    st = _st("reinforce_pp_baseline", kl_coef=0.0)
    # Group 0's tokens carry 0.75 (x3), -0.25 (x1, x4, x2): sum 0.5, squares 2.125 over 10 tokens; group 1's 11
    # tokens carry 0. Over all 21: mean 0.5 / 21, variance 2.125 / 21 - (0.5 / 21)^2.
    real = rcf.estimate(_rollout(range(8), all_scores=EQUAL), st, offset=0).advantages.advantages
    mean, std = 0.5 / 21, math.sqrt(2.125 / 21 - (0.5 / 21) ** 2)
    assert real[4:, 0].tolist() == pytest.approx([-mean / std] * 4, abs=1e-5)  # not 0: -0.0751
    assert float(real[0, 0]) == pytest.approx((0.75 - mean) / std, abs=1e-5)
    # The same group as filler: group 0's 10 tokens alone: mean 0.05, variance 2.1 / 10 = 0.21.
    filler = torch.tensor([False] * 4 + [True] * 4)
    est = rcf.estimate(_rollout(range(8), all_scores=EQUAL), st, offset=0, filler=filler)
    adv = est.advantages.advantages
    assert adv[0, :3].tolist() == pytest.approx([0.7 / math.sqrt(0.21)] * 3, abs=1e-5)
    assert adv[1, 0] == pytest.approx(-0.3 / math.sqrt(0.21), abs=1e-5)
    assert (adv[4:] == 0).all() and (est.weights[4:] == 0).all() and (est.loss_mask[4:] == 0).all()
    # RLOO's sequence KL would move an all-equal group; as filler it has no gradient either.
    rloo = rcf.estimate(_rollout(range(8), all_scores=EQUAL), _st("rloo"), offset=0, filler=filler)
    assert (rloo.advantages.advantages[4:] == 0).all() and (rloo.weights[4:] == 0).all()


def test_no_scorable_reply_stops_the_stage_with_a_clear_message():
    from rlhf_cli.rollout.online import check_scorable

    reward = FunctionReward(f"{__name__}:exact")
    check_scorable(0.75, reward, "of iteration 3")
    with pytest.raises(UserError, match=rf"function {__name__}:exact scored none of the replies of iteration 3"):
        check_scorable(1.0, reward, "of iteration 3")
    with pytest.raises(UserError, match="scored none of the replies of the first evaluation"):
        check_scorable(1.0, reward, "of the first evaluation")


def test_plan_refusals_name_the_keys():
    with pytest.raises(UserError, match="dealt evenly"):
        critic_free_rows(_st(rollout_batch_size=3, n_samples=3), world_size=2)
    with pytest.raises(UserError, match="stage.micro_batch_size"):
        critic_free_rows(_st(rollout_batch_size=3, micro_batch_size=5), world_size=1)
    with pytest.raises(UserError, match="dynamic_sampling"):
        critic_free_rows(_st(rollout_batch_size=3, dynamic_sampling=True), world_size=2)
    assert critic_free_rows(_st(rollout_batch_size=3), world_size=2) == 6  # groups straddle: allowed


def test_one_sample_per_prompt_is_refused_for_the_group_estimators():
    from rlhf_cli.config.batches import check_groups
    from rlhf_cli.stages.critic_free import needs_old_logprobs

    with pytest.raises(UserError, match="stage.n_samples must be >= 2"):
        check_groups(_st("grpo", n_samples=1))
    check_groups(_st("reinforce_pp", n_samples=1))
    # One pass in one mini-batch and no KL in the reward: no old-log-prob forward.
    assert not needs_old_logprobs(_st("grpo", micro_batch_size=12), 1)
    assert needs_old_logprobs(_st("grpo", micro_batch_size=6), 1)  # two mini-batches: the second is off-policy
    assert needs_old_logprobs(_st("rloo", micro_batch_size=12), 1)  # the KL in the reward reads them


def exact(prompts, responses):
    return [1.0 if r == "yes" else 0.0 for r in responses]


def short(prompts, responses):
    return [None if r == "?" else -len(r) / 10 for r in responses]


def test_weighted_reward_functions_sum_and_keep_each_term():
    reward = FunctionReward([(f"{__name__}:exact", 1.0), (f"{__name__}:short", 0.5)], key="stage.reward.functions")
    seq = SimpleNamespace(input_ids=torch.zeros(3, 2))
    prompts = [SimpleNamespace(text="q")] * 3
    out = reward.score(prompts, seq, ["yes", "no!", "?"], allow_invalid=True)
    assert out[:2].tolist() == pytest.approx([1.0 - 0.15, 0.0 - 0.15]) and math.isnan(out[2])
    assert set(reward.last_terms) == {"exact", "short"} and reward.last_terms["exact"].tolist() == [1.0, 0.0, 0.0]
    assert "1 x" in reward.describe() and "0.5 x" in reward.describe()
    with pytest.raises(UserError, match="stage.reward.functions"):
        FunctionReward([("nomodule", 1.0)], key="stage.reward.functions")
