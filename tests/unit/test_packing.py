"""Padding-free packing (rlhf_cli/data/packing.py and the SFT / RM / DPO steps): the layout, attention that never
crosses packed examples (every listed family; the KV-cache pitfall shown), and packed == unpacked losses and gradients
for SFT, RM and DPO on examples of very different lengths, pad == EOS included, with LoRA and gradient checkpointing;
DeepSpeed's accumulation boundary with a packed step's varying number of forwards; the config refusals."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY
from test_lm_head import PARTITION_ALL, _grads
from test_policy_eval import process_group  # noqa: F401  (a 1-process gloo group for DeepSpeed)
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.data import PreferenceExample, collate_preference, collate_sft
from rlhf_cli.data import packing as pk
from rlhf_cli.data.sft import SFTExample
from rlhf_cli.errors import UserError
from rlhf_cli.losses import IGNORE_INDEX, bradley_terry_loss, split_pairs
from rlhf_cli.models import apply_lora, enable_gradient_checkpointing, load_causal_lm, tiny_tokenizer
from rlhf_cli.models.reward import load_reward_model, packed_sequence_scores, sequence_scores
from rlhf_cli.stages import dpo, sft
from rlhf_cli.stages.common import Packing, packing_for

BUILTIN = ModelConfig(name_or_path="builtin:tiny-llama", tiny=TINY)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(n, start):
    return [5 + (start + 7 * i) % 1500 for i in range(n)]


def _examples(eos):
    """Five SFT examples of 4 to 91 tokens, each reply ending with EOS."""
    rows = [(2, 1), (60, 30), (8, 8), (3, 40), (20, 5)]
    return [
        SFTExample(_ids(p, 3 * k) + _ids(r, 50 + k) + [eos], [IGNORE_INDEX] * p + _ids(r, 50 + k) + [eos])
        for k, (p, r) in enumerate(rows)
    ]


def _pairs(eos):
    """Three pairs with prompts of 3 to 40 tokens and replies of 1 to 45."""
    return [
        PreferenceExample(_ids(3, 1), _ids(1, 2) + [eos], _ids(45, 5) + [eos], margin=0.5),
        PreferenceExample(_ids(40, 40), _ids(20, 70) + [eos], _ids(6, 90) + [eos]),
        PreferenceExample(_ids(12, 9), _ids(9, 30) + [eos], _ids(2, 11) + [eos], margin=1.0),
    ]


def _assert_same(grads, expected):
    """Packed and padded rows take other fp32 kernels (a masked sdpa): a few 1e-5 differences in 1e-1 gradients."""
    assert grads.keys() == expected.keys() and grads
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- layout


def test_plan_is_first_fit_decreasing_then_rows_grouped_under_the_budget():
    # Largest first: 9 opens row 0, 7 row 1, 5 row 2; 3 fits row 1 (7 + 3 = 10), 2 fits row 2 (row 0 has room 1).
    # Rows of 9, 10 and 7 tokens: two rows of width 10 make 20 <= 20, the third needs a forward of its own.
    assert pk.plan_forwards([5, 9, 3, 7, 2], capacity=10, budget=20) == [[[1], [3, 2]], [[0, 4]]]
    assert pk.plan_forwards([4, 4, 4], capacity=4, budget=4) == [[[0]], [[1]], [[2]]]
    sizes = [13, 1, 90, 7, 7, 45, 60, 2, 33]
    plan = pk.plan_forwards(sizes, capacity=100, budget=300)
    assert sorted(i for f in plan for row in f for i in row) == list(range(len(sizes)))  # each item exactly once
    assert all(len(f) * max(sum(sizes[i] for i in row) for row in f) <= 300 for f in plan)
    with pytest.raises(ValueError, match="capacity"):
        pk.plan_forwards([11], capacity=10, budget=20)


def test_rows_up_to_twice_the_longest_item_where_their_attention_costs_less():
    # Budget 240 (4 x 60). Rows of 60: 60 | 50 + 7 | 40 + 5 | 30, one forward of 4 x 60 positions. Rows of 75:
    # 60 + 7 + 5 | 50 | 40 + 30, one of 3 x 72. Rows of 90: 60 + 30 | 50 + 40 | 7 + 5, 2 x 90 then 1 x 12 (3 x 90 >
    # 240): two forwards. Rows of 120: 60 + 50 + 7 | 40 + 30 + 5, 2 x 117. A position costs 1 + W / scale.
    sizes = [60, 5, 7, 30, 50, 40]
    narrow, r75, r90 = [[[0], [4, 2], [5, 1], [3]]], [[[0, 2, 1], [4], [5, 3]]], [[[0, 3], [4, 5]], [[2, 1]]]
    assert pk.plan_forwards(sizes, 60, 240) == narrow and pk.plan_forwards(sizes, 90, 240) == r90
    # Attention free: rows of 90 feed fewest positions (192) but take a second forward, which is refused; rows of 75
    # (216) beat rows of 120 (234) and 60 (240).
    assert pk.layout_cost(r90, sizes, 1e9) == pytest.approx(192)
    assert pk.plan_cheapest(sizes, 240, width_scale=1e9) == r75
    # Attention dear (scale 20): the rows of 60 cost least (240 x 4 = 960 against 216 x 4.6 and 234 x 6.85).
    assert pk.plan_cheapest(sizes, 240, width_scale=20) == narrow
    assert pk.layout_cost(narrow, sizes, 20) == 240 * (1 + 60 / 20)
    # Scale 60: rows of 75 cost 1% less (216 x 2.2 against 240 x 2), under the 2% a wider layout must save.
    assert pk.layout_cost(r75, sizes, 60) == pytest.approx(0.99 * pk.layout_cost(narrow, sizes, 60))
    assert pk.plan_cheapest(sizes, 240, width_scale=60) == narrow
    # Rows never exceed the budget: with a budget of 100 the widest try is 100, not 2 x 60.
    plan = pk.plan_cheapest(sizes, 100, width_scale=1e9)
    assert sorted(i for f in plan for row in f for i in row) == list(range(len(sizes)))
    assert all(len(f) * max(sum(sizes[i] for i in row) for row in f) <= 100 for f in plan)
    # The width at which attention costs what the matmuls do: 2 x hidden + 1.5 x intermediate (4 x hidden without).
    assert pk.attention_width(SimpleNamespace(hidden_size=32, intermediate_size=64)) == 160
    assert pk.attention_width(SimpleNamespace(hidden_size=32)) == 256


def test_collate_packed_restarts_positions_and_ignores_each_first_label():
    seqs = [([10, 11, 12], [-100, 11, 12]), ([20, 21], [-100, 21]), ([30, 31, 32, 33], [30, 31, 32, 33])]
    b = pk.collate_packed([[0, 2], [1]], seqs, pad_token_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 30, 31, 32, 33], [20, 21, 0, 0, 0, 0, 0]]
    # Padding keeps position 0: the largest position is a real one, as unpacked (dynamic / long-context RoPE read it).
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    # A sequence's first label would be predicted from the sequence before it: ignored, even when it is a target.
    assert b["labels"].tolist() == [[-100, 11, 12, -100, 31, 32, 33], [-100, 21] + [-100] * 5]
    assert b["segment"].tolist() == [[0, 0, 0, 2, 2, 2, 2], [1, 1, -1, -1, -1, -1, -1]]
    assert b["last"].tolist() == [2, 8, 6]
    flat = pk.collate_packed([[0, 2], [1]], seqs, pad_token_id=0, flat=True)
    assert flat["input_ids"].shape == (1, 14) and flat["last"].tolist() == [2, 8, 6]
    assert pk.real_tokens(b) == 9


# ---------------------------------------------------------------- attention stays inside each example


def test_packed_examples_do_not_see_each_other_and_a_kv_cache_would_break_it(tok):
    model = load_causal_lm(BUILTIN, tok, seed=0)
    eos = tok.eos_token_id
    exs, idx, packing = _examples(eos), [3, 4, 2, 0], Packing(True, capacity=256, budget=1000)
    # 44, 26, 17 and 4 tokens into rows of 44: [44], [26, 17], [4], one forward; example 4 is sequence 1.
    batch = sft.step_batches(exs, idx, 4, eos, packing)[0]
    assert batch["segment"][1].unique().tolist() == [-1, 1, 2]
    changed = list(exs)
    changed[4] = SFTExample([7, *exs[4].input_ids[1:]], exs[4].labels)  # the first token of its row
    other = sft.step_batches(changed, idx, 4, eos, packing)[0]
    first, rest = batch["segment"] == 1, (batch["segment"] >= 0) & (batch["segment"] != 1)
    kwargs = {"attention_mask": None, "position_ids": batch["position_ids"]}
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
        b = model(input_ids=other["input_ids"], use_cache=False, **kwargs).logits
        assert (a[first] - b[first]).abs().max() > 1e-3
        torch.testing.assert_close(a[rest], b[rest], rtol=0, atol=1e-6)
        # With the model's default KV cache transformers skips the packed-sequence detection: attention crosses.
        leaky = model(input_ids=other["input_ids"], **kwargs).logits
        assert (leaky[rest] - a[rest]).abs().max() > 1e-3


SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=97,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def small_family_model(model_type: str, attn: str):
    """A 2-layer fp32 model of a listed family in eval mode; skips the test where transformers has no such kernel."""
    config = AutoConfig.for_model(model_type, **SMALL)
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
    except ValueError as err:  # Gemma 2 has no sdpa path; transformers says so when asked
        pytest.skip(str(err)[:80])


@pytest.mark.parametrize("model_type", sorted(pk.PACKED_MODEL_TYPES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_listed_family_keeps_packed_sequences_apart(model_type, attn):
    """The family table is a claim about the installed transformers: packed logits equal each sequence run alone."""
    model = small_family_model(model_type, attn)
    assert pk.packing_unsupported(model.config) is None
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 97, (n,), generator=gen) for n in (5, 11, 3)]
    b = pk.collate_packed([[0, 1], [2]], [(s.tolist(), s.tolist()) for s in seqs], pad_token_id=0)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        for k, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(packed[b["segment"] == k], alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- packed == unpacked: SFT, RM, DPO


def _tok_ids(tok, pad_is_eos):
    """(eos, pad): the tiny tokenizer's distinct pad, or pad == EOS as in many released models."""
    return tok.eos_token_id, tok.eos_token_id if pad_is_eos else tok.pad_token_id


# Examples of 4, 91, 17, 44 and 26 tokens: rows as long as the longest, [91] and [44, 26, 17, 4], one per forward.
SMALL_ROWS = Packing(True, capacity=256, budget=150)


@pytest.mark.parametrize("variant", ["plain", "pad_is_eos", "lora_checkpointing"])
def test_packed_sft_equals_unpacked(tok, variant):
    eos, pad = _tok_ids(tok, variant == "pad_is_eos")
    model = load_causal_lm(BUILTIN, tok, seed=0)
    if variant == "lora_checkpointing":
        enable_gradient_checkpointing(model)
        model = apply_lora(model, LoRAConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        model.train()
    exs = _examples(eos)
    loss, n = sft.sft_loss(model, collate_sft(exs, pad))
    loss.backward()
    expected = _grads(model)
    forwards = sft.step_batches(exs, list(range(len(exs))), 2, pad, SMALL_ROWS)
    assert len(forwards) == 2 and sum(pk.real_tokens(b) for b in forwards) == sum(len(e.input_ids) for e in exs)
    total, count = 0.0, 0
    for b in forwards:
        part, k = sft.sft_loss(model, b)
        part.backward()
        total, count = total + part.detach(), count + k
    assert count == n == 1 + 30 + 8 + 40 + 5 + 5  # every reply token and its EOS, nothing else
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-5)
    _assert_same(_grads(model), expected)


def test_sft_in_rows_wider_than_the_longest_example_equals_unpacked(tok):
    """Rows up to 2 x the longest example (sdpa, `plan_cheapest`): examples of 60, 50, 40, 30, 7 and 5 tokens in rows
    of 75 (60 + 7 + 5 | 50 | 40 + 30) give the padded loss and gradients."""
    eos, pad = _tok_ids(tok, False)
    model = load_causal_lm(BUILTIN, tok, seed=0)
    exs = [
        SFTExample(
            _ids(n // 2, n) + _ids(n - n // 2 - 1, 9 * n) + [eos],
            [IGNORE_INDEX] * (n // 2) + _ids(n - n // 2 - 1, 9 * n) + [eos],
        )
        for n in (60, 5, 7, 30, 50, 40)
    ]
    loss, n = sft.sft_loss(model, collate_sft(exs, pad))
    loss.backward()
    expected = _grads(model)
    packing = Packing(True, capacity=64, micro=4, width_scale=1e9)  # attention priced at nothing: widest useful rows
    forwards = sft.step_batches(exs, list(range(len(exs))), 4, pad, packing)
    assert [tuple(b["input_ids"].shape) for b in forwards] == [(3, 72)]  # rows wider than the longest (60)
    total, count = 0.0, 0
    for b in forwards:
        part, k = sft.sft_loss(model, b)
        part.backward()
        total, count = total + part.detach(), count + k
    assert count == n
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-5)
    _assert_same(_grads(model), expected)


# Pairs of 54, 108 and 37 tokens: rows [108] and [54, 37] in one forward (2 rows x 108 <= 300). With the prompt once
# (data.share_prompt, tests/unit/test_share_prompt.py) 52, 69 and 26: three rows of 69 in one forward.
@pytest.mark.parametrize(
    ("share", "shape", "attn"), [(False, (2, 108), "sdpa"), (True, (3, 69), "sdpa"), (True, (3, 69), "eager")]
)
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_packed_reward_model_scores_and_gradients_equal_unpacked(tok, pad_is_eos, share, shape, attn):
    from rlhf_cli.stages import rm

    eos, pad = _tok_ids(tok, pad_is_eos)
    model_cfg = replace(BUILTIN, attn_implementation=attn)
    model = load_reward_model(model_cfg, model_cfg.name_or_path, tok)
    assert model.config._attn_implementation == attn
    pairs = _pairs(eos)
    padded = collate_preference(pairs, pad)
    scores = sequence_scores(model, padded["input_ids"], padded["attention_mask"])
    bradley_terry_loss(*split_pairs(scores), padded["margin"])[0].mul(3).backward()
    expected = _grads(model)
    forwards = rm.pair_batches(pairs, [0, 1, 2], 3, pad, Packing(True, capacity=512, budget=300, share_prompt=share))
    assert len(forwards) == 1 and forwards[0]["input_ids"].shape == shape
    for b in forwards:
        packed = rm.batch_scores(model, b)
        chosen, rejected = split_pairs(packed)
        order = b["pairs"]
        torch.testing.assert_close(chosen, scores[order].detach(), rtol=1e-5, atol=1e-5)  # the last real token
        torch.testing.assert_close(rejected, scores[order + 3].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["margin"], padded["margin"][order])
        bradley_terry_loss(chosen, rejected, b["margin"])[0].mul(len(order)).backward()
    _assert_same(_grads(model), expected)
    assert torch.equal(packed_sequence_scores(model, b), packed.detach())


def dpo_setup(tok, pad_is_eos, model_cfg=BUILTIN):
    """(policy, frozen reference model, dpo.Reference over it, stage config, the three pairs, pad id)."""
    eos, pad = _tok_ids(tok, pad_is_eos)
    policy, reference = load_causal_lm(model_cfg, tok, seed=0), load_causal_lm(model_cfg, tok, seed=1)
    ref = dpo.Reference.__new__(dpo.Reference)
    ref.kind, ref.table, ref.model = "model", None, reference
    st = SimpleNamespace(
        loss="sigmoid", beta=0.1, label_smoothing=0.0, rpo_alpha=None, simpo_gamma=0.5, orpo_lambda=0.1
    )
    return policy, reference, ref, st, _pairs(eos), pad


def dpo_forwards_equal_unpacked(policy, reference, ref, st, pairs, pad, packing) -> list:
    """The pairs' packed forwards (`packing`, pair indices offset by 10) give the padded batch's log-probs, lengths,
    per-pair losses and summed gradients, and leave the reference without gradients. -> the forwards."""
    padded = collate_preference(pairs, pad)
    out = dpo.pair_losses(policy, ref, st, padded, "train", [0, 1, 2])
    out["loss"].sum().backward()
    expected = _grads(policy)
    logps, lengths = dpo.sequence_logps(policy, padded)
    forwards = dpo.pair_forwards([None] * 10 + pairs, [10, 11, 12], 3, pad, packing)
    assert sum(pk.real_tokens(b) for _, b in forwards) == int(padded["attention_mask"].sum())
    for idx, b in forwards:
        order = torch.tensor(idx) - 10
        both = torch.cat([order, order + 3])
        packed_logps, packed_lengths = dpo.sequence_logps(policy, b)
        torch.testing.assert_close(packed_logps, logps[both].detach(), rtol=1e-5, atol=1e-4)
        assert torch.equal(packed_lengths, lengths[both])
        part = dpo.pair_losses(policy, ref, st, b, "train", idx)
        torch.testing.assert_close(part["loss"], out["loss"][order].detach(), rtol=1e-5, atol=1e-6)
        part["loss"].sum().backward()
    _assert_same(_grads(policy), expected)
    assert all(p.grad is None for p in reference.parameters())
    return forwards


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_packed_dpo_logps_loss_and_gradients_equal_unpacked(tok, pad_is_eos):
    forwards = dpo_forwards_equal_unpacked(*dpo_setup(tok, pad_is_eos), Packing(True, capacity=512, budget=150))
    assert [idx for idx, _ in forwards] == [[11], [10, 12]]  # pair 1 (108 tokens) alone; pairs 0 and 2 (54 + 37)


# ---------------------------------------------------------------- one optimizer step in DeepSpeed, fillers, config


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_packed_step_is_one_optimizer_step_with_fillers_equal_to_unpacked(tok, monkeypatch, zero):
    """DeepSpeed is configured for 2 micro-batches per step; the packed step has 2 forwards, and with another rank
    holding 4 (simulated) this rank adds 2 weight-0 fillers. Either way: one optimizer step, the unpacked update."""
    from rlhf_cli import engine as eng
    from rlhf_cli.config.compose import compose

    cfg = compose("sft", [f"deepspeed={zero}", *([PARTITION_ALL] if zero == "zero3" else [])])
    exs, eos = _examples(tok.eos_token_id), tok.eos_token_id
    idx = [0, 1, 2, 3]

    def trained(batches, packed, others=None):
        engine = eng.initialize(
            load_causal_lm(BUILTIN, tok, seed=0), eng.ds_config(cfg.deepspeed, cfg.optim, 2, 2, 1), cfg.optim, 10
        )
        if others is not None:
            monkeypatch.setattr(eng, "all_gather_cat", lambda t: torch.tensor([len(batches), others]))
        forwards = []
        engine.module.register_forward_pre_hook(lambda *a: forwards.append(1))
        out = sft.train_step(engine, batches, torch.device("cpu"), packed)
        monkeypatch.undo()
        assert engine.global_steps == 1 and len(forwards) == max(len(batches), others or 0)
        return out, {n: p.detach().clone() for n, p in eng.full_state_dict(engine).items()}

    padded, w_padded = trained(sft.micro_batches(exs, idx, 2, eos), packed=False)
    packed_batches = sft.step_batches(exs, idx, 2, eos, SMALL_ROWS)
    assert len(packed_batches) == 2
    for others in (None, 4):
        out, w = trained(packed_batches, packed=True, others=others)
        for key in ("loss", "target_tokens", "tokens", "grad_norm"):
            assert out[key] == pytest.approx(padded[key], rel=1e-5), key
        for name, value in w.items():  # Adam turns fp32 noise in a near-zero gradient into ~1e-6; a wrong step, ~lr
            torch.testing.assert_close(value, w_padded[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packing_is_on_where_supported_and_refused_with_the_keys_named(tok):
    st = SimpleNamespace(micro_batch_size=4)
    data = SimpleNamespace(packing=None, max_tokens_per_batch=None, max_length=64, share_prompt=False)
    model = load_causal_lm(BUILTIN, tok, seed=0)
    auto = packing_for(data, st, model, per_item=1)
    assert auto == Packing(True, capacity=64, budget=None, micro=4, width_scale=2 * 32 + 1.5 * 64)  # sdpa
    # No budget set: micro x the step's longest item per forward (4 x 60); rows of 75 (1.25 x 60) cost least for this
    # model, 216 x 1.45 against 240 x 1.375 (test_rows_up_to_twice_the_longest_item_where_their_attention_costs_less).
    assert auto.layout([60, 5, 7, 30, 50, 40]) == [[[0, 2, 1], [4], [5, 3]]]
    assert auto.layout([60, 5]) == [[[0, 1]]]  # one row of 65 (rows of 60: 2 x 60 positions)
    assert "rows 1-2 x the step's longest example" in auto.describe()
    assert replace(auto, width_scale=0).layout([60, 5]) == [[[0], [1]]]  # eager: rows as long as the longest item
    assert packing_for(data, st, model, per_item=2) == Packing(True, capacity=128, micro=4, width_scale=160)
    data.max_tokens_per_batch = 100
    with pytest.raises(
        UserError,
        match=r"data.max_tokens_per_batch=100 cannot hold a pair's two sequences "
        r"\(2 x data.max_length = 128\)",
    ):
        packing_for(data, st, model, per_item=2)
    assert packing_for(data, st, model, per_item=1).layout([60, 5, 7, 30]) == [[[0]], [[3, 2, 1]]]
    model.config._attn_implementation = "eager"  # (only read here: nothing runs)
    assert packing_for(data, st, model, per_item=1).width_scale == 0  # eager's (R, heads, W, W) weights grow with W
    model.config._attn_implementation = "flash_attention_2"
    flat = packing_for(data, st, model, per_item=1)
    assert flat == Packing(True, 64, 100, flat=True, micro=4) and flat.layout([60, 5, 7, 30]) == [[[0, 3, 2]], [[1]]]
    model.config._attn_implementation = "flex_attention"
    assert not packing_for(data, st, model, per_item=1).enabled  # auto: off, no error
    data.packing = True
    with pytest.raises(UserError, match="data.packing=true: model.attn_implementation `flex_attention`"):
        packing_for(data, st, model, per_item=1)
    encoder = SimpleNamespace(config=SimpleNamespace(model_type="bert", _attn_implementation="sdpa"))
    with pytest.raises(UserError, match="model type `bert` is not among the families tested with packing"):
        packing_for(data, st, encoder, per_item=2)
    data.packing = False
    assert packing_for(data, st, encoder, per_item=2) == Packing(False, 128)


def test_explain_summary_states_packing_without_torch():
    """`rlhf explain` reads stages.plan.packing_summary, which needs no torch (the explain of sft/rm/dpo loads none)."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.stages.plan import packing_summary

    cfg = compose("dpo", [])
    assert packing_summary(cfg.data, cfg.stage, "sdpa", 2)[:3] == [
        "  packing: on where supported (data.packing=null: tested decoders); same loss and gradients as padded",
        "    forwards of up to micro 8 x the step's longest pair (data.max_tokens_per_batch), each pair whole in one",
        "    rows: 1, 1.25, 1.5 or 2 x the step's longest pair, the cheapest width (matmuls + masked attention) that "
        "adds no forward",
    ]  # then the shared prompt's line (test_share_prompt.py)
    assert packing_summary(cfg.data, cfg.stage, "eager", 2)[2] == (
        "    rows: as long as the step's longest pair (eager's attention weights grow with the row)"
    )
    cfg = compose("sft", ["data.max_tokens_per_batch=1024", "data.packing=true"])
    assert packing_summary(cfg.data, cfg.stage, "sdpa", 1)[1].startswith("    forwards of up to 1024 tokens")
    assert packing_summary(cfg.data, cfg.stage, "flex_attention", 1) == [
        "  packing: refused (model.attn_implementation=flex_attention cannot keep examples apart)"
    ]
    cfg = compose("sft", ["data.packing=false"])
    off = packing_summary(cfg.data, cfg.stage, "sdpa", 1)
    assert off == ["  packing: off (data.packing=false): padded micro-batches"]


@pytest.mark.parametrize("truncation", ["drop", "truncate_response"])
def test_examples_longer_than_the_budget_are_dropped_or_truncated_and_counted(tok, truncation):
    # The smallest budget allowed is data.max_length: an example longer than it never reaches the packer.
    # data.truncation drops it or cuts its response, the data report counts it, and the packed step over what is left
    # equals unpacked.
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_sft_datasets

    cfg = compose("sft", ["data.max_length=40", f"data.truncation={truncation}", "data.max_tokens_per_batch=40"])
    data = build_sft_datasets(cfg.data, tok, seed=0)
    counted = data.report.dropped if truncation == "drop" else data.report.truncated
    reason = "too long" if truncation == "drop" else "response cut at data.max_length"
    assert counted.get(reason, 0) > 0  # the built-in samples have longer examples: the case happened
    assert max(len(ex.input_ids) for ex in data.train) <= 40
    idx = list(range(12))
    packing = Packing(True, capacity=40, budget=pk.check_budget(cfg.data.max_tokens_per_batch, 40, per_item=1))
    forwards = sft.step_batches(data.train, idx, 4, tok.pad_token_id, packing)
    assert all(b["input_ids"].numel() <= 40 for b in forwards)
    assert sum(pk.real_tokens(b) for b in forwards) == sum(len(data.train[i].input_ids) for i in idx)
    model = load_causal_lm(BUILTIN, tok, seed=0)
    loss, n = sft.sft_loss(model, collate_sft([data.train[i] for i in idx], tok.pad_token_id))
    parts = [sft.sft_loss(model, b) for b in forwards]
    assert sum(k for _, k in parts) == n
    torch.testing.assert_close(sum(p for p, _ in parts).detach(), loss.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="data.max_tokens_per_batch=39 cannot hold"):
        pk.check_budget(39, 40, per_item=1)
