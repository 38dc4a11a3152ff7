"""Padding-free packing: several examples per row, position ids restarting at 0 for each, no attention across them.

A packed forward is a tensor of R rows of width W. Each row holds whole examples back to back (SFT: an example;
preference pairs: the chosen and the rejected sequence of a pair, always in the same forward so that the pair's loss
is computed in one graph), then right padding. The model is called with `attention_mask=None` and `position_ids`
(0, 1, ..., L-1 for every sequence; 0 for each padding token, a one-token sequence of its own); transformers reads the
restarts as sequence boundaries (`masking_utils.find_packed_sequence_indices`: a block-diagonal causal mask for sdpa
and eager, varlen kernels for flash attention) so a token attends only to its own sequence, with the same positions
as unpacked. The model must be called with `use_cache=False`: with a cache object the library skips the detection and
attention silently crosses examples (tests/unit/test_packing.py shows it).

Shared prompt (`data.share_prompt`, preference pairs): a pair's prompt is computed once. The pair becomes three
segments: the prompt but its last token, then [last prompt token, chosen...], then [last prompt token, rejected...]
(the last prompt token is repeated so that each reply's first token is predicted, as usual, from the column before
it). Position ids continue the prompt's in both branches, and an explicit 4-D mask lets each branch see the shared
part and itself but never the other branch. Rotary or learned positions and causal attention then give every
token exactly the hidden state it has in its own unshared sequence. A custom mask needs sdpa or eager attention
and no sliding window shorter than a sequence (`share_prompt_unsupported`).

Which examples a step sees is not changed here (the step plan is); only how one rank's examples of one optimizer step
are laid out: first-fit decreasing into rows of `capacity` tokens, rows grouped into forwards of at most `budget`
tokens counted with padding (R x W); stages/common.py `Packing` picks both, under sdpa the cheapest of a few row
widths (`plan_cheapest`). Deterministic: ties go by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_cli.data.attention import FLAT_ATTENTION, PACKED_ATTENTION, PACKED_MODEL_TYPES, SHARED_PROMPT_ATTENTION
from rlhf_cli.errors import UserError
from rlhf_cli.losses.logprobs import IGNORE_INDEX

# also the packing layer's names
__all__ = ["FLAT_ATTENTION", "PACKED_ATTENTION", "PACKED_MODEL_TYPES", "SHARED_PROMPT_ATTENTION"]


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


def share_prompt_unsupported(config, max_length: int) -> str | None:
    """Why a model cannot take the shared-prompt layout (its explicit 4-D mask), or None when it can."""
    reason = packing_unsupported(config)
    if reason:
        return reason
    attn = config._attn_implementation
    if attn not in SHARED_PROMPT_ATTENTION:
        return f"model.attn_implementation `{attn}` does not take an explicit attention mask (use sdpa or eager)"
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style switch: the window is not applied
        window = None
    layers = getattr(config, "layer_types", None)
    if layers is not None and "sliding_attention" not in layers:
        window = None
    if window is not None and window < max_length:
        return f"the model's sliding window ({window}) is shorter than data.max_length ({max_length})"
    return None


def resolve_share_prompt(requested: bool | None, config, max_length: int) -> bool:
    """`data.share_prompt`: None (auto) -> on where the model takes the mask; true where it cannot -> UserError; false
    -> off. Only packed steps use it; true with data.packing=false is refused with the config (config/compose.py)."""
    if requested is False:
        return False
    reason = share_prompt_unsupported(config, max_length)
    if reason and requested:
        raise UserError(f"data.share_prompt=true: {reason}; set data.share_prompt=false (or leave it unset)")
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


# Row widths tried, x the step's longest item: wider rows fill better (two items of 0.7 x the longest share one) but
# every token of a row attends over the whole row under sdpa (masked positions are computed too).
ROW_WIDTHS = (1.0, 1.25, 1.5, 2.0)
# A wider layout must cost this much less than the narrowest, and hold no more forwards: each forward has fixed costs
# the FLOP count leaves out (ZeRO-3 gathers every parameter per forward, ZeRO-2 reduces gradients per backward).
MIN_GAIN = 0.02


def attention_width(config) -> float:
    """The row width W at which a token's attention over its row (4 x hidden x W FLOPs per layer, masked positions
    included) costs as much as its matmuls (2 x a layer's weights, about 4 x hidden^2 + 3 x hidden x intermediate)."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return 2.0 * hidden + 1.5 * intermediate


def layout_cost(forwards: list[list[list[int]]], sizes: Sequence[int], width_scale: float) -> float:
    """Body FLOPs of a layout up to a constant: each forward's R x W positions, each costing 1 + W / width_scale
    (its matmuls, then its attention over the row; `attention_width`)."""
    total = 0.0
    for rows in forwards:
        width = max(sum(sizes[i] for i in row) for row in rows)
        total += len(rows) * width * (1.0 + width / width_scale)
    return total


def plan_cheapest(sizes: Sequence[int], budget: int, width_scale: float) -> list[list[list[int]]]:
    """`plan_forwards` with rows of each of ROW_WIDTHS x the longest item (at most `budget`): the layout of least
    `layout_cost` among those with no more forwards than rows of the longest item, a wider one only where it saves
    MIN_GAIN of that cost (ties go to the narrower). A pure function of the sizes, as the step plan needs.
    width_scale 0 (attention not priced: eager): rows of the longest item."""
    longest = max(sizes)
    best = narrow = plan_forwards(sizes, longest, budget)
    if not width_scale:
        return narrow
    best_cost = layout_cost(narrow, sizes, width_scale) * (1 - MIN_GAIN)
    for scale in ROW_WIDTHS[1:]:
        capacity = min(int(scale * longest), budget)
        plan = plan_forwards(sizes, capacity, budget)
        cost = layout_cost(plan, sizes, width_scale)
        if len(plan) <= len(narrow) and cost < best_cost:
            best, best_cost = plan, cost
        if capacity == budget:
            break
    return best


def collate_packed(
    rows: Sequence[Sequence[int]],
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    flat: bool = False,
) -> dict[str, torch.Tensor]:
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
    # The padding tail (never read) keeps position 0, one-token sequences, so the largest position id is that of a real
    # sequence, as unpacked: dynamic and long-context RoPE variants (Phi-3's longrope) scale by the largest.
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


def collate_shared_pairs(pairs: Sequence, rows: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs laid out as `rows` of positions into `pairs`, each pair's prompt once (`data.share_prompt`; see
    the module docstring). Sequences are numbered as in `collate_packed_pairs` (chosen 0..B-1, rejected B..2B-1).

    -> input_ids, position_ids, labels, segment (R, W) as `collate_packed` (a shared prompt token belongs to the
    chosen sequence; its label is ignored), last (S,), lengths (S,) the tokens of each unshared sequence (prompt +
    reply), group (R, W) the pair of each token (-1 padding) and branch (R, W) 0 shared prompt / 1 chosen / 2 rejected,
    from which `shared_mask` builds the attention mask, margin (B,), pairs."""
    order = [i for row in rows for i in row]
    b = len(order)
    width = max(sum(shared_pair_size(pairs[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group = torch.full(shape, -1, dtype=torch.long)  # the pair a token belongs to (padding: -1, one group)
    branch = torch.zeros(shape, dtype=torch.long)  # 0 the shared prompt, 1 chosen, 2 rejected
    last = torch.full((2 * b,), -1, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            prompt = list(pairs[i].prompt_ids)
            head, tail = prompt[:-1], prompt[-1:]  # tail: the prompt's last token, repeated in both branches
            chosen, rejected = tail + list(pairs[i].chosen_ids), tail + list(pairs[i].rejected_ids)
            parts = [(head, 0, k), (chosen, 1, k), (rejected, 2, k + b)]  # (ids, branch, sequence)
            for ids, which, seq in parts:
                n = len(ids)
                span = slice(col, col + n)
                input_ids[r, span] = torch.tensor(ids, dtype=torch.long)
                first = len(head) if which else 0  # both branches continue the prompt's positions
                position_ids[r, span] = torch.arange(first, first + n)
                if which:
                    # A branch's first token is no target: the repeated prompt token, or with no prompt the first
                    # reply token, which nothing predicts (as `collate_packed` ignores each sequence's first label).
                    labels[r, col + 1 : col + n] = torch.tensor(ids[1:], dtype=torch.long)
                    last[seq] = r * width + col + n - 1
                group[r, span], branch[r, span], segment[r, span] = k, which, seq
                col += n
            k += 1
    if (last < 0).any():
        raise ValueError("every pair must be placed in exactly one row")
    pieces = [
        (len(pairs[i].prompt_ids) + len(getattr(pairs[i], reply)))
        for reply in ("chosen_ids", "rejected_ids")
        for i in order
    ]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "segment": segment,
        "last": last,
        "lengths": torch.tensor(pieces, dtype=torch.long),
        "group": group,
        "branch": branch,
        "margin": torch.tensor([pairs[i].margin for i in order], dtype=torch.float32),
        "pairs": torch.tensor(order, dtype=torch.long),
    }


def shared_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared-prompt layout's attention mask from its group and branch ids (R, W) -> (R, 1, W, W) bool, True where
    the query (row) may attend to the key (column): the same pair (or the padding), causal, and the key in the shared
    prompt or in the query's own branch. Built from the (R, W) ids where they are (the device), one forward at a time,
    as transformers builds its own masks."""
    group, branch = batch["group"], batch["branch"]
    width = group.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=group.device).tril()
    same = (group[:, :, None] == group[:, None, :]) & causal
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # key shared or same branch
    return (same & visible)[:, None]


def model_mask(model, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The attention mask a batch is called with: a padded batch's (B, T) mask; None for packed rows (transformers
    builds the mask from the position ids); for the shared-prompt layout the explicit (R, 1, W, W) mask, bool for sdpa,
    for eager attention (which adds it to its scores) 0 / the dtype's minimum."""
    from rlhf_cli.models.load import unwrap

    if "branch" not in batch:
        return batch.get("attention_mask")
    mask = shared_mask(batch)
    inner = unwrap(model)
    if inner.config._attn_implementation != "eager":
        return mask
    dtype = next(inner.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def shared_pair_size(pair) -> int:
    """Tokens of a pair with its prompt once: the prompt, the chosen and the rejected reply, the last prompt token
    again (the rejected branch's first position)."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) + (1 if pair.prompt_ids else 0)


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
    """Non-pad tokens of a batch's sequences, packed (segment >= 0) or padded (attention mask); with a shared prompt,
    as if unshared (the prompt counted with each reply), so tokens/s compares across layouts."""
    if "lengths" in batch:
        return int(batch["lengths"].sum())
    return int((batch["segment"] >= 0).sum()) if "segment" in batch else int(batch["attention_mask"].sum())
