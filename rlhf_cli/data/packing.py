"""Padding-free packing: several examples per row, position ids restarting at 0 for each, no attention across them.

A packed forward is a tensor of R rows of width W. Each row holds whole examples back to back (SFT: an example;
preference pairs: the chosen and the rejected sequence of a pair, always in the same forward so that the pair's loss
is computed in one graph), then right padding. The model is called with `attention_mask=None` and `position_ids`
(0, 1, ..., L-1 for every sequence, also for the padding tail, which is a segment of its own); transformers reads the
restarts as sequence boundaries (`masking_utils.find_packed_sequence_indices`: a block-diagonal causal mask for sdpa
and eager, varlen kernels for flash attention) so a token attends only to its own sequence, with the same positions
as unpacked. The model must be called with `use_cache=False`: with a cache object the library skips the detection and
attention silently crosses examples (tests/unit/test_packing.py shows it).

Which examples a step sees is not changed here (the step plan is); only how one rank's examples of one optimizer step
are laid out: first-fit decreasing into rows of `capacity` tokens, rows grouped into forwards of at most `budget`
tokens counted with padding (R x W); stages/common.py `Packing` picks both. Deterministic: ties go by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_cli.errors import UserError
from rlhf_cli.losses.logprobs import IGNORE_INDEX
from rlhf_cli.stages.plan import FLAT_ATTENTION, PACKED_ATTENTION, PACKED_MODEL_TYPES

__all__ = ["FLAT_ATTENTION", "PACKED_ATTENTION", "PACKED_MODEL_TYPES"]  # also the packing layer's names


def packing_unsupported(config) -> str | None:
    """Why a model (its transformers config) cannot train packed, or None when it can."""
    attn = getattr(config, "_attn_implementation", None)
    if config.model_type not in PACKED_MODEL_TYPES:
        families = ", ".join(sorted(PACKED_MODEL_TYPES))
        return f"model type `{config.model_type}` is not among the families tested with packing ({families})"
    if attn not in PACKED_ATTENTION:
        kernels = ", ".join(PACKED_ATTENTION)
        return f"model.attn_implementation `{attn}` does not keep packed sequences apart (use one of {kernels})"
    return None


def resolve_packing(requested: bool | None, config) -> bool:
    """`data.packing`: None (auto) -> on where supported; true on an unsupported model -> UserError; false -> off."""
    if requested is False:
        return False
    reason = packing_unsupported(config)
    if reason and requested:
        raise UserError(f"data.packing=true: {reason}; set data.packing=false (or leave it unset: on where supported)")
    return reason is None


def check_budget(max_tokens: int | None, max_length: int, per_item: int) -> int | None:
    """`data.max_tokens_per_batch`, refused when it cannot hold the longest item (per_item sequences of max_length)."""
    if max_tokens is not None and max_tokens < max_length * per_item:
        what = "a pair's two sequences (2 x " if per_item == 2 else "the longest example ("
        raise UserError(
            f"data.max_tokens_per_batch={max_tokens} cannot hold {what}data.max_length = {max_length * per_item}); "
            f"raise data.max_tokens_per_batch or lower data.max_length"
        )
    return max_tokens


def plan_forwards(sizes: Sequence[int], capacity: int, budget: int) -> list[list[list[int]]]:
    """Item positions laid out as forwards of rows: sizes (N,) tokens per item -> [forward][row][item position].

    First-fit decreasing into rows of at most `capacity` tokens (largest first, ties by position), then consecutive
    rows into forwards while rows x widest row <= `budget`. Every item appears exactly once."""
    if budget < capacity:
        raise ValueError(f"budget {budget} < row capacity {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] > capacity:
            raise ValueError(f"item of {sizes[i]} tokens > row capacity {capacity}")
        slot = next((r for r, room in enumerate(free) if room >= sizes[i]), None)
        if slot is None:
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= sizes[i]
    forwards: list[list[list[int]]] = []
    width = 0
    for row, room in zip(rows, free, strict=True):
        used = capacity - room
        if forwards and (len(forwards[-1]) + 1) * max(width, used) <= budget:
            forwards[-1].append(row)
            width = max(width, used)
        else:
            forwards.append([row])
            width = used
    return forwards


def collate_packed(
    rows: Sequence[Sequence[int]], sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
    flat: bool = False,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One packed forward. rows: sequence indices per row; sequences (S,): (input ids, unshifted labels) each.

    -> input_ids, position_ids, labels, segment (R, W) and last (S,): labels carry IGNORE_INDEX on padding and on the
    first token of every sequence (its label would be predicted from the previous sequence), segment is the sequence
    index of each token (-1 on padding), last the flat index (row x W + column) of each sequence's last token (where a
    reward model reads its score). `flat` (flash attention): every (R, W) tensor reshaped to (1, R x W)."""
    lengths = [len(sequences[s][0]) for row in rows for s in row]
    width = max(sum(len(sequences[s][0]) for s in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    last = torch.full((len(sequences),), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for s in row:
            ids, labs = sequences[s]
            n = len(ids)
            input_ids[r, col : col + n] = torch.tensor(ids, dtype=torch.long)
            labels[r, col + 1 : col + n] = torch.tensor(labs[1:], dtype=torch.long)
            segment[r, col : col + n] = s
            position_ids[r, col : col + n] = torch.arange(n)
            last[s] = r * width + col + n - 1
            col += n
        position_ids[r, col:] = torch.arange(width - col)  # the padding tail: a segment of its own, never read
    if (last < 0).any() or len(lengths) != len(sequences):
        raise ValueError("every sequence must be placed in exactly one row")
    out = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "segment": segment, "last": last}
    if flat:
        out = {k: v.reshape(1, -1) if v.dim() == 2 else v for k, v in out.items()}
    return out


def collate_packed_sft(examples: Sequence, rows: Sequence[Sequence[int]], pad_token_id: int, flat: bool = False):
    """SFT examples (SFTExample) laid out as `rows` of positions into `examples` (one forward of `plan_forwards`)."""
    order = [i for row in rows for i in row]
    seq = {i: k for k, i in enumerate(order)}
    sequences = [(examples[i].input_ids, examples[i].labels) for i in order]
    return collate_packed([[seq[i] for i in row] for row in rows], sequences, pad_token_id, flat)


def collate_packed_pairs(pairs: Sequence, rows: Sequence[Sequence[int]], pad_token_id: int, flat: bool = False):
    """Preference pairs laid out as `rows` of positions into `pairs`: the forward's B pairs in row order are sequences
    [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] as in `collate_preference` (a pair's two sequences side by
    side in one row); labels are the reply ids with IGNORE_INDEX on the prompt. Adds margin (B,) float32 and
    `pairs`, the positions in that order. -> the keys of `collate_packed`, margin, pairs."""
    order = [i for row in rows for i in row]
    b = len(order)
    seq = {i: k for k, i in enumerate(order)}
    sequences = []
    for reply in ("chosen_ids", "rejected_ids"):
        for i in order:
            prompt, ids = pairs[i].prompt_ids, getattr(pairs[i], reply)
            sequences.append((list(prompt) + list(ids), [IGNORE_INDEX] * len(prompt) + list(ids)))
    layout = [[s for i in row for s in (seq[i], seq[i] + b)] for row in rows]
    out = collate_packed(layout, sequences, pad_token_id, flat)
    out["margin"] = torch.tensor([pairs[i].margin for i in order], dtype=torch.float32)
    out["pairs"] = torch.tensor(order, dtype=torch.long)
    return out


def pair_size(pair) -> int:
    """Tokens of a pair packed as two sequences: prompt + chosen, prompt + rejected."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def segment_sums(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence sums of per-position values aligned with next-token targets: values (R, W-1), where column t
    belongs to the token at t+1 (as `token_logprobs`), -> (S,) float32 in sequence order; padding adds nothing."""
    segment = batch["segment"][:, 1:].to(values.device)
    keep = segment >= 0
    out = torch.zeros(len(batch["last"]), dtype=torch.float32, device=values.device)
    return out.index_add(0, segment[keep], values[keep].float())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch, packed (segment >= 0) or padded (attention mask)."""
    return int((batch["segment"] >= 0).sum()) if "segment" in batch else int(batch["attention_mask"].sum())
