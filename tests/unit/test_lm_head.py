"""Logits only where a loss reads them (rlhf_cli/models/lm_head.py): the same losses and gradients as the full
logits for SFT and DPO (ragged lengths, pad == EOS, chunks smaller than the batch, LoRA on the head, ZeRO-3 with every
parameter partitioned), every listed model family against its own logits, DPO's one forward per pair batch and
graph-free reference, and a reward model that never runs an LM head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from helpers import TINY
from test_policy_eval import process_group  # noqa: F401  (a 1-process gloo group for DeepSpeed)
from transformers import LlamaForCausalLM

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.data import PreferenceExample, collate_preference, collate_sft
from rlhf_cli.data.sft import SFTExample
from rlhf_cli.losses import IGNORE_INDEX, sft_loss_sum, token_logprobs
from rlhf_cli.losses.dpo import preference_loss
from rlhf_cli.losses.logprobs import chunked_target_logprobs
from rlhf_cli.models import apply_lora, load_causal_lm, tiny_tokenizer
from rlhf_cli.models import lm_head as lmh
from rlhf_cli.models.reward import load_reward_model, sequence_scores
from rlhf_cli.stages import dpo, sft

BUILTIN = ModelConfig(name_or_path="builtin:tiny-llama", tiny=TINY)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _policy(tok, seed=0):
    return load_causal_lm(BUILTIN, tok, seed=seed)


def _ids(n, start):
    return [5 + (start + 7 * i) % 1500 for i in range(n)]


def _sft_batch(tok):
    """Three examples of 4, 40 and 17 tokens, padded with EOS (pad == EOS), each reply ending with EOS."""
    eos = tok.eos_token_id
    rows = [(_ids(2, 0), _ids(1, 3)), (_ids(10, 9), _ids(29, 11)), (_ids(8, 50), _ids(8, 60))]
    examples = [SFTExample(p + r + [eos], [IGNORE_INDEX] * len(p) + r + [eos]) for p, r in rows]
    return collate_sft(examples, pad_token_id=eos)


def _pair_batch(tok):
    """Two pairs with replies of 1 to 30 tokens and prompts of 3 and 12, padded with EOS (pad == EOS)."""
    eos = tok.eos_token_id
    pairs = [
        PreferenceExample(_ids(3, 1), _ids(1, 2) + [eos], _ids(30, 5) + [eos]),
        PreferenceExample(_ids(12, 40), _ids(20, 70) + [eos], _ids(6, 90) + [eos]),
    ]
    return collate_preference(pairs, pad_token_id=eos)


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(grads, expected):
    assert grads.keys() == expected.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _inputs(b):
    return b["input_ids"], b["attention_mask"], b["labels"]


def test_chunked_logprobs_equal_unchunked_and_hold_one_chunk():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    hidden = torch.randn(10, 6, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    full = -torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    full.sum().backward()
    expected = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked = chunked_target_logprobs(head, hidden, targets, chunk_size=3)  # chunks of 3, 3, 3 and 1
    torch.testing.assert_close(chunked, full)
    chunked.sum().backward()
    torch.testing.assert_close((hidden.grad, head.weight.grad), expected)
    assert max(saved) < 3 * 11  # only (3, d) inputs kept for backward, no (chunk, V) logits, let alone (N, V)
    with torch.no_grad():
        torch.testing.assert_close(chunked_target_logprobs(head, hidden, targets, 4), full)


@pytest.mark.parametrize("chunk_elements", [lmh.CHUNK_ELEMENTS, 7 * 1538])  # one chunk; 7 positions per chunk
def test_sft_loss_and_gradients_equal_full_logits(tok, monkeypatch, chunk_elements):
    monkeypatch.setattr(lmh, "CHUNK_ELEMENTS", chunk_elements)
    model, b = _policy(tok), _sft_batch(tok)
    assert lmh.logit_projection(model) is model.lm_head
    full, n_full = sft_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    full.backward()
    expected = _grads(model)
    calls = []
    model.lm_head.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    loss, n = sft.sft_loss(model, b)
    if not isinstance(lmh._no_logits(b["labels"]), torch.Tensor):  # transformers < 5.20: the model's own head call
        own = [shape for shape in calls if len(shape) == 3]  # ran on the last position only
        assert own == [(len(b["labels"]), 1, model.config.vocab_size)]
        calls = [shape for shape in calls if len(shape) == 2]
    # The head saw only the target positions (plus the model's own call, left empty), never a (B, T) batch of them.
    assert sum(shape[0] for shape in calls) == n and all(len(shape) == 2 for shape in calls)
    loss.backward()  # (a chunked forward calls the head again here, one chunk at a time)
    assert n == n_full == 1 + 1 + 29 + 1 + 8 + 1
    torch.testing.assert_close(loss, full)
    _assert_same(_grads(model), expected)
    with torch.no_grad():
        assert torch.equal(sft.sft_loss(model, b)[0], loss.detach())


@pytest.mark.parametrize("chunk_elements", [lmh.CHUNK_ELEMENTS, 5 * 1538])
def test_dpo_loss_and_gradients_equal_full_logits(tok, monkeypatch, chunk_elements):
    monkeypatch.setattr(lmh, "CHUNK_ELEMENTS", chunk_elements)
    model, batch = _policy(tok), _pair_batch(tok)
    ref = torch.tensor([-40.0, -35.0, -90.0, -20.0])

    def loss_of(logps):
        pc, pr = logps.chunk(2)
        return preference_loss("sigmoid", pc, pr, *ref.chunk(2), None, None, beta=0.1).sum()

    full = token_logprobs(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    ).sum(-1)
    loss_of(full).backward()
    expected = _grads(model)
    logps, lengths = dpo.sequence_logps(model, batch)
    loss_of(logps).backward()
    torch.testing.assert_close(logps, full)
    assert lengths.tolist() == [2.0, 21.0, 31.0, 7.0]
    _assert_same(_grads(model), expected)


def test_dpo_pair_is_one_forward_and_its_reference_builds_no_graph(tok):
    policy, reference, batch = _policy(tok, seed=0), _policy(tok, seed=1), _pair_batch(tok)
    forwards = {"policy": 0, "reference": 0}
    for name, model in (("policy", policy), ("reference", reference)):
        model.register_forward_pre_hook(lambda m, a, name=name: forwards.__setitem__(name, forwards[name] + 1))
    ref = dpo.Reference.__new__(dpo.Reference)
    ref.kind, ref.table, ref.model = "model", None, reference  # its parameters still require grad: a graph would show
    st = SimpleNamespace(
        loss="sigmoid", beta=0.1, label_smoothing=0.0, rpo_alpha=None, simpo_gamma=0.5, orpo_lambda=0.1
    )
    out = dpo.pair_losses(policy, ref, st, batch, "train", [0, 1])
    assert forwards == {"policy": 1, "reference": 1}  # chosen and rejected stacked in one forward each
    ref_logps = ref.logps(policy, batch, "train", [0, 1])
    assert not ref_logps.requires_grad and ref_logps.grad_fn is None
    out["loss"].sum().backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None for p in policy.parameters())


def test_lora_on_the_head_is_applied_and_matches_full_logits(tok):
    lora = LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    model, b = apply_lora(_policy(tok), lora), _sft_batch(tok)
    with torch.no_grad():  # adapters that change the output (peft starts lora_B at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert type(lmh.logit_projection(model)).__module__.startswith("peft.")
    full, _ = sft_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    full.backward()
    expected = _grads(model)
    loss, _ = sft.sft_loss(model, b)
    loss.backward()
    torch.testing.assert_close(loss, full)
    _assert_same(_grads(model), expected)
    with model.disable_adapter(), torch.no_grad():  # DPO's adapters-off reference goes the same way
        plain = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        torch.testing.assert_close(lmh.target_logprobs(model, *_inputs(b)), plain)


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
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
)
POST = {"final_logit_softcapping": 3.0, "logit_scale": 0.5, "logits_scaling": 4.0}  # strong enough to show


@pytest.mark.parametrize("name", sorted(lmh.PLAIN_HEADS | set(lmh.POSTPROCESS)))
def test_every_listed_family_matches_its_own_logits(name):
    """The table is a claim about the installed transformers: each listed class's logits are its head's output (after
    the listed post-processing). A tiny random instance checks values and gradients against the model's own logits."""
    cls = getattr(transformers, name)
    config = cls.config_class(**SMALL)
    for key, value in POST.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = cls(config).float().eval()
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    full = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.sum().backward()
    expected = _grads(model)
    fast = lmh.target_logprobs(model, ids, mask, labels, chunk_size=4)
    fast.sum().backward()
    assert lmh.logit_projection(model) is not None
    torch.testing.assert_close(fast, full)
    _assert_same(_grads(model), expected)


class CustomLM(LlamaForCausalLM):
    """Stands for remote code or an unlisted family: its logits may not be the head's output."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_unlisted_family_falls_back_to_full_logits(tok):
    model, b = CustomLM(_policy(tok).config), _sft_batch(tok)
    assert lmh.logit_projection(model) is None
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(lmh.target_logprobs(model, *_inputs(b)), token_logprobs(logits, b["labels"]))


def test_reward_model_never_runs_an_lm_head(tok, tmp_path):
    """A reward model is a sequence classifier: its only head is the one-label `score`, whether built from the tiny
    backbone or loaded from a causal LM folder (whose lm_head is not loaded). No module produces vocabulary-wide
    output during scoring."""
    causal = _policy(tok)
    causal.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    folder, b = ModelConfig(name_or_path=str(tmp_path / "lm")), _sft_batch(tok)
    for cfg in (BUILTIN, folder):
        rm = load_reward_model(cfg, cfg.name_or_path, tok)
        assert rm.get_output_embeddings() is None and not any("lm_head" in k for k in rm.state_dict())
        widths: list[int] = []
        for module in rm.modules():
            module.register_forward_hook(_record_width(widths))
        scores = sequence_scores(rm, b["input_ids"], b["attention_mask"])
        assert scores.shape == (3,) and widths and len(tok) not in widths


def _record_width(widths):
    def hook(_module, _args, out):
        if torch.is_tensor(out):
            widths.append(out.shape[-1])

    return hook


# Every forward gathers each module's parameters and releases them afterwards (tests/integration/test_eval_sharding.py).
PARTITION_ALL = (
    "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0,"
    "stage3_max_reuse_distance:0,stage3_prefetch_bucket_size:0}}"
)


@pytest.mark.usefixtures("process_group")
def test_zero3_partitioned_engine_gradients_equal_full_logits(tok, monkeypatch):
    """Every parameter partitioned (threshold 0): the head, called on chunks inside the engine's forward and again
    when a chunk is recomputed in backward, is gathered by ZeRO-3's module hooks; the gradients equal the plain model's
    full-logits gradients."""
    from deepspeed.utils import safe_get_full_grad

    from rlhf_cli import engine as eng
    from rlhf_cli.config.compose import compose

    monkeypatch.setattr(lmh, "CHUNK_ELEMENTS", 7 * len(tok))  # 7 positions per chunk: recomputation in backward
    cfg = compose("sft", ["deepspeed=zero3", PARTITION_ALL])
    plain, b = _policy(tok), _sft_batch(tok)
    full, n = sft_loss_sum(plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    full.backward()
    expected = _grads(plain)
    engine = eng.initialize(_policy(tok), eng.ds_config(cfg.deepspeed, cfg.optim, 3, 1, 1), cfg.optim, 10)
    assert all(p.numel() == 0 for p in engine.module.parameters())
    loss, _ = sft.sft_loss(engine, b)
    engine.backward(loss)
    torch.testing.assert_close(loss, full)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    _assert_same({k: g for k, g in grads.items() if g is not None}, expected)
