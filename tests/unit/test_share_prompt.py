"""A pair's prompt computed once (`data.share_prompt`, rlhf_cli/data/packing.py `collate_shared_pairs`): the layout and
its mask by hand, every listed family giving each reply the hidden states of its own unshared sequence (sdpa and
eager), shared == unpacked log-probs, losses and gradients for DPO (pad == EOS included; the reward model's scores and
gradients: test_packing.py), and when the layout is on, off or refused."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_packing import BUILTIN, dpo_forwards_equal_unpacked, dpo_setup, small_family_model

from rlhf_cli.config.compose import compose
from rlhf_cli.data import PreferenceExample
from rlhf_cli.data import packing as pk
from rlhf_cli.errors import UserError
from rlhf_cli.losses import IGNORE_INDEX
from rlhf_cli.models import load_causal_lm, tiny_tokenizer
from rlhf_cli.stages.common import Packing, packing_for
from rlhf_cli.stages.plan import packing_summary

SHARED = Packing(True, capacity=512, budget=150, share_prompt=True)
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_shared_layout_and_mask_by_hand():
    """Pair 0: prompt [5, 6, 7], chosen [8, 9], rejected [10]; pair 1: prompt [11], chosen [12], rejected [13, 14]."""
    pairs = [PreferenceExample([5, 6, 7], [8, 9], [10], margin=0.5), PreferenceExample([11], [12], [13, 14])]
    assert [pk.shared_pair_size(p) for p in pairs] == [7, 5]
    b = pk.collate_shared_pairs(pairs, [[0], [1]], pad_token_id=0)
    # Row 0: [5 6] shared, [7 8 9] chosen branch, [7 10] rejected branch. Row 1: [11 12] | [11 13 14], no shared part.
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [11, 12, 11, 13, 14, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 0, 0]]  # padding: 0
    assert b["labels"].tolist() == [[X, X, X, 8, 9, X, 10], [X, 12, X, 13, 14, X, X]]
    # Sequences: chosen 0, 1 then rejected 2, 3; the shared prompt counts as the chosen sequence's (its labels are X).
    assert b["segment"].tolist() == [[0, 0, 0, 0, 0, 2, 2], [1, 1, 3, 3, 3, -1, -1]]
    assert b["last"].tolist() == [4, 7 + 1, 6, 7 + 4]
    assert b["lengths"].tolist() == [5, 2, 4, 3] and pk.real_tokens(b) == 14  # counted as if unshared
    assert b["margin"].tolist() == [0.5, 0.0] and b["pairs"].tolist() == [0, 1]
    row0 = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # the rejected branch sees the shared prompt and itself, never the chosen branch
        [1, 1, 0, 0, 0, 1, 1],
    ]
    row1 = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # the padding tail: a causal group of its own
        [0, 0, 0, 0, 0, 1, 1],
    ]
    mask = pk.shared_mask(b)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    assert mask[:, 0].int().tolist() == [row0, row1]
    # No prompt at all: two separate sequences, each first token unpredicted, as unshared.
    alone = pk.collate_shared_pairs([PreferenceExample([], [8, 9], [10])], [[0]], pad_token_id=0)
    assert alone["input_ids"].tolist() == [[8, 9, 10]] and alone["position_ids"].tolist() == [[0, 1, 0]]
    assert alone["labels"].tolist() == [[X, 9, X]] and alone["segment"].tolist() == [[0, 0, 1]]
    assert pk.shared_mask(alone)[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("model_type", sorted(pk.PACKED_MODEL_TYPES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_listed_family_gives_each_reply_its_unshared_logits(model_type, attn):
    """The explicit mask and continued positions are a claim about each family's forward in the installed transformers:
    every branch token's logits equal those of prompt + reply run alone."""
    model = small_family_model(model_type, attn)
    assert pk.share_prompt_unsupported(model.config, max_length=64) is None
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (6, 4, 9, 1, 3, 2)]
    pairs = [PreferenceExample(ids[0], ids[1], ids[2]), PreferenceExample(ids[3], ids[4], ids[5])]
    b = pk.collate_shared_pairs(pairs, [[0, 1]], pad_token_id=0)
    with torch.no_grad():
        mask = pk.model_mask(model, b)
        shared = model(
            input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask, use_cache=False
        ).logits[0]
        for k, (pair, reply) in enumerate([(p, r) for r in ("chosen_ids", "rejected_ids") for p in pairs]):
            seq = pair.prompt_ids + getattr(pair, reply)
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            # The reply's tokens and the prompt token before them (which predicts the reply's first token).
            cols = (b["segment"][0] == k) & (b["labels"][0] != X)
            cols = cols | cols.roll(-1)
            n = int(cols.sum())
            torch.testing.assert_close(shared[cols], alone[-n:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_dpo_logps_loss_and_gradients_equal_unpacked(tok, pad_is_eos, attn):
    setup = dpo_setup(tok, pad_is_eos, replace(BUILTIN, attn_implementation=attn))
    assert all(model.config._attn_implementation == attn for model in setup[:2])
    forwards = dpo_forwards_equal_unpacked(*setup, SHARED)
    # Pairs of 52, 69 and 26 tokens with the prompt once (54, 108 and 37 unshared): rows of 69 hold one pair each,
    # forwards of at most 150 tokens take two such rows, then one of 26.
    assert [idx for idx, _ in forwards] == [[11, 10], [12]]
    assert sum(b["input_ids"].numel() for _, b in forwards) == 2 * 69 + 26


def test_share_prompt_is_on_where_supported_and_refused_with_the_keys_named(tok):
    st = SimpleNamespace(micro_batch_size=4)
    data = SimpleNamespace(packing=None, max_tokens_per_batch=None, max_length=64, share_prompt=None)
    model = load_causal_lm(BUILTIN, tok, seed=0)
    assert packing_for(data, st, model, per_item=2) == Packing(True, 128, micro=4, share_prompt=True, width_scale=160)
    assert packing_for(data, st, model, per_item=1) == Packing(True, 64, micro=4, width_scale=160)  # SFT: no pairs
    data.share_prompt = False
    assert not packing_for(data, st, model, per_item=2).share_prompt
    data.share_prompt = True
    with pytest.raises(
        UserError,
        match=r"config key `data.share_prompt` is true, which needs packed pairs, but "
        r"`data.packing` is false",
    ):
        compose("dpo", ["data.share_prompt=true", "data.packing=false"])  # refused with the config, before any model
    model.config.sliding_window = 32  # a Mistral-style window shorter than a sequence: the full mask would be wrong
    with pytest.raises(UserError, match=r"sliding window \(32\) is shorter than data.max_length \(64\)"):
        packing_for(data, st, model, per_item=2)
    model.config.use_sliding_window = False  # Qwen2 / SmolLM3 style: the window is configured but not applied
    assert packing_for(data, st, model, per_item=2).share_prompt
    del model.config.use_sliding_window
    model.config.layer_types = ["full_attention"] * 2  # no sliding layer
    assert packing_for(data, st, model, per_item=2).share_prompt
    model.config.sliding_window, model.config.layer_types = None, None
    model.config.model_type = "gpt2"  # packing auto-off on an unlisted family: the reason is the family, not the key
    with pytest.raises(UserError, match="data.share_prompt=true: model type `gpt2` is not among the families"):
        packing_for(data, st, model, per_item=2)
    model.config.model_type = "llama"
    model.config._attn_implementation = "flash_attention_2"  # (only read here: nothing runs)
    with pytest.raises(
        UserError,
        match="data.share_prompt=true: model.attn_implementation `flash_attention_2` does "
        "not take an explicit attention mask",
    ):
        packing_for(data, st, model, per_item=2)
    data.share_prompt = None
    flash = packing_for(data, st, model, per_item=2)
    assert flash.enabled and flash.flat and not flash.share_prompt  # auto: packed, the prompt once per reply
    # DPO's reference reads the policy's forwards: the joint layout is what both can take.
    sdpa = Packing(True, 128, micro=4, share_prompt=True, width_scale=160.0)
    assert sdpa.joint(flash) == Packing(True, 128, flat=True, micro=4, share_prompt=False)
    assert not sdpa.joint(Packing(False, 128)).enabled
    eager = replace(sdpa, width_scale=0.0)  # an eager reference keeps rows at the longest pair (its memory)
    assert sdpa.joint(eager).width_scale == 0 and sdpa.joint(sdpa).width_scale == 160
    assert "each pair's prompt computed once" in sdpa.describe()


def test_model_mask_is_bool_for_sdpa_and_additive_in_the_model_dtype_for_eager(tok):
    b = pk.collate_shared_pairs([PreferenceExample([5, 6, 7], [8, 9], [10])], [[0]], pad_token_id=0)
    allowed = pk.shared_mask(b)
    model = load_causal_lm(BUILTIN, tok, seed=0).to(torch.bfloat16)
    assert torch.equal(pk.model_mask(model, b), allowed)  # sdpa takes the bool mask
    model.config._attn_implementation = "eager"  # eager adds the mask to its bf16 scores
    additive = pk.model_mask(model, b)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()
    padded = {"attention_mask": torch.ones(2, 3)}
    assert pk.model_mask(model, padded) is padded["attention_mask"] and pk.model_mask(model, {}) is None


def test_explain_states_the_shared_prompt():
    cfg = compose("dpo", [])
    assert packing_summary(cfg.data, cfg.stage, "sdpa", 2)[-1] == (
        "    prompt: computed once for both replies (data.share_prompt=null: where the model takes the mask; same loss "
        "and gradients)"
    )
    assert packing_summary(cfg.data, cfg.stage, "flash_attention_2", 2)[-1] == (
        "    prompt: once per reply (data.share_prompt needs sdpa or eager attention for its explicit mask)"
    )
    cfg = compose("rm", ["data.share_prompt=false"])
    assert packing_summary(cfg.data, cfg.stage, "sdpa", 2)[-1] == "    prompt: once per reply (data.share_prompt=false)"
