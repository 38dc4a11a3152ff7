"""Pure torch loss functions: tensors in, tensors out (no models, no config)."""

from rlhf_cli.losses.logprobs import IGNORE_INDEX, shift_for_next_token, token_logprobs
from rlhf_cli.losses.reward import (
    bradley_terry_loss,
    gather_last,
    last_token_index,
    pairwise_accuracy,
    reward_moments,
    reward_stats,
    split_pairs,
)
from rlhf_cli.losses.sft import count_targets, sft_loss_sum

__all__ = [
    "IGNORE_INDEX",
    "bradley_terry_loss",
    "count_targets",
    "gather_last",
    "last_token_index",
    "pairwise_accuracy",
    "reward_moments",
    "reward_stats",
    "sft_loss_sum",
    "shift_for_next_token",
    "split_pairs",
    "token_logprobs",
]

from rlhf_cli.losses.critic_free import (  # noqa: E402  (critic-free online RL, docs/algorithms.md section 8)
    aggregate,
    clipped_surrogate,
    dynamic_sampling_mask,
    global_moments,
    global_whiten,
    group_advantages,
    group_stats,
    k3_kl_loss,
    mask_truncated,
    reinforce_pp_returns,
    rloo_advantages,
    sequence_k1,
    zero_variance_fraction,
    zero_variance_groups,
)

__all__ += [
    "aggregate",
    "clipped_surrogate",
    "dynamic_sampling_mask",
    "global_moments",
    "global_whiten",
    "group_advantages",
    "group_stats",
    "k3_kl_loss",
    "mask_truncated",
    "reinforce_pp_returns",
    "rloo_advantages",
    "sequence_k1",
    "zero_variance_fraction",
    "zero_variance_groups",
]

from rlhf_cli.losses.policy_losses import (  # noqa: E402  (the critic-free surrogates, docs/algorithms.md 8.9-8.10)
    POLICY_LOSSES,
    cispo_surrogate,
    gspo_surrogate,
    policy_surrogate,
    sequence_log_ratio,
)

__all__ += ["POLICY_LOSSES", "cispo_surrogate", "gspo_surrogate", "policy_surrogate", "sequence_log_ratio"]
