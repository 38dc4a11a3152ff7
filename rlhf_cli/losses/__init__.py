"""Pure torch loss functions: tensors in, tensors out (no models, no config)."""

from rlhf_cli.losses.logprobs import IGNORE_INDEX, shift_for_next_token, token_logprobs
from rlhf_cli.losses.sft import count_targets, sft_loss_sum

__all__ = ["IGNORE_INDEX", "count_targets", "sft_loss_sum", "shift_for_next_token", "token_logprobs"]
