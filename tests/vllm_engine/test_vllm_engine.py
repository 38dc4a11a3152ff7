"""rollout/vllm_engine.py in one process on the tiny model (`make test-vllm`, .venv-vllm): greedy ids equal the hf
engine's, sampled first-token frequencies follow the model's softmax, vLLM's log-probs equal the trainer's in fp32,
seeds come from torch's RNG and vLLM leaves the trainer's RNGs alone, weights are pushed when (and only when) they
change, the checkpoint's generation_config.json changes nothing, LoRA merged and as a vLLM adapter."""

import random

import pytest

# A submodule, not `vllm` itself: where tests/ is on sys.path (pytest's rootdir conftest), this folder is a
# namespace package named `vllm` that `import vllm` finds when vLLM is not installed.
pytest.importorskip(
    "vllm.sampling_params", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm"
)

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig  # noqa: E402
from vllm_helpers import DIST, TOK, config, engine, prompts, tiny_model, trainer_logprobs  # noqa: E402

from rlhf_cli.config.online import RolloutConfig  # noqa: E402
from rlhf_cli.config.schema import LoRAConfig, ModelConfig, TinyModelConfig  # noqa: E402
from rlhf_cli.errors import UserError  # noqa: E402
from rlhf_cli.models.load import apply_lora  # noqa: E402
from rlhf_cli.models.tiny import build_tiny_llama  # noqa: E402
from rlhf_cli.rollout.engines import HF  # noqa: E402
from rlhf_cli.rollout.vllm_engine import VLLMEngine, max_model_len  # noqa: E402

LAYOUT = ("input_ids", "attention_mask", "position_ids", "response_mask", "has_eos")


def same_layout(a, b) -> None:
    for name in LAYOUT:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.prompt_len == b.prompt_len


def test_greedy_ids_equal_the_hf_engine_and_stop_at_eos():
    """Same weights, same prompts, greedy: the same ids in the same layout, also where rows end at EOS at different
    lengths; vLLM's log-probs are the trainer's at temperature 1 (what a greedy rollout is read at)."""
    model, eng = tiny_model(), engine()
    greedy = config(max_new_tokens=32, greedy=True)
    assert eng.describe() == "rollout engine: vllm (rollout.engine=vllm)" and not eng.sampler_is_trainer
    first = eng.generate(model, prompts(), greedy)
    same_layout(first, HF.generate(model, prompts(), greedy))
    assert not first.has_eos.any()  # a random model never picks EOS: make it, where it would pick this token
    with torch.no_grad():
        token = int(first.response_ids[0, 5])
        model.lm_head.weight[TOK.eos_token_id] = model.lm_head.weight[token] * 1.01
    seq = eng.generate(model, prompts(), greedy)
    same_layout(seq, HF.generate(model, prompts(), greedy))
    assert seq.has_eos.any() and (seq.response_mask.sum(1) < 32).any()
    torch.testing.assert_close(seq.sampler_logprobs, trainer_logprobs(model, seq, 1.0), atol=1e-4, rtol=0)
    assert eng.syncs == 2 and eng.start_seconds > 0


def sharpened(scale: float = 40.0) -> torch.nn.Module:
    """A tiny model whose next-token distribution is peaked (a random head spreads it over the whole vocabulary,
    where a few thousand samples say nothing about frequencies)."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_follow_the_softmax(temperature):
    """N samples of one token for one prompt: each frequency of the 8 likeliest tokens (and of all the others
    together) lies within 4.5 standard errors (+1e-3) of softmax(logits / T), for vLLM and, as a check of the
    check, for the hf engine."""
    n, model = 3000, sharpened()
    batch = prompts(["Name a fruit."], repeat=n)
    with torch.no_grad():
        p = torch.softmax(model(**{k: v[:1] for k, v in batch.items()}).logits[0, -1] / temperature, -1)
    top = p.topk(8).indices
    expected = torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)])
    assert expected[:8].sum() > 0.5  # the check has something to say
    torch.manual_seed(0)
    for eng in (engine(), HF):
        first = eng.generate(model, batch, config(max_new_tokens=1, temperature=temperature)).response_ids[:, 0]
        counts = (first[:, None] == top[None, :]).sum(0).double()
        freq = torch.cat([counts, n - counts.sum(0, keepdim=True)]) / n
        bound = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3
        assert ((freq - expected).abs() <= bound).all(), (eng.name, freq, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_trainers_in_fp32(temperature):
    """The importance weights' denominator: vLLM's log-probs of what it sampled (temperature applied) against the
    trainer's recomputation, 0 after the end on both sides. Measured: max |diff| ~1e-6, mean k3 ~1e-13."""
    model, eng = sharpened(8.0), engine()
    torch.manual_seed(1)
    seq = eng.generate(model, prompts(repeat=4), config(max_new_tokens=24, temperature=temperature))
    trainer = trainer_logprobs(model, seq, temperature)
    diff = (trainer - seq.sampler_logprobs) * seq.response_mask
    k3 = ((torch.expm1(diff) - diff) * seq.response_mask).sum() / seq.response_mask.sum()
    print(f"T={temperature}: max |diff| {diff.abs().max():.2e}, mean k3 {k3:.2e}")
    assert diff.abs().max() < 1e-4 and k3 < 1e-8
    assert (seq.sampler_logprobs[seq.response_mask == 0] == 0).all()


def test_seeds_come_from_torch_and_the_trainers_rngs_are_left_alone():
    """torch.manual_seed before a rollout fixes vLLM's draws; a generate moves torch's RNG by its B seed draws
    only, and starting vLLM (which seeds every global RNG) moves no RNG at all."""
    model, eng, batch, sample = tiny_model(), engine(), prompts(repeat=2), config(temperature=1.0)
    random.seed(7)
    python_state = random.getstate()
    torch.manual_seed(3)
    a = eng.generate(model, batch, sample)
    after = torch.random.get_rng_state()
    assert random.getstate() == python_state
    torch.manual_seed(3)
    torch.randint(0, 2**31 - 1, (batch["input_ids"].shape[0],))
    assert torch.equal(after, torch.random.get_rng_state())
    torch.manual_seed(3)
    assert torch.equal(a.input_ids, eng.generate(model, batch, sample).input_ids)
    torch.manual_seed(4)
    assert not torch.equal(a.input_ids, eng.generate(model, batch, sample).input_ids)
    assert torch.get_num_threads() == 1 and torch.set_num_threads.__module__ == "torch"


def test_weights_are_pushed_when_they_change_and_a_frozen_model_once():
    """A frozen model: one push for many generations. A direct edit, an optimizer step, another module: pushed
    again, and the greedy ids are the new weights' (the hf engine's on the same module)."""
    model, eng, batch, greedy = tiny_model(), engine(), prompts(), config(greedy=True)
    before = eng.generate(model, batch, greedy)
    for _ in range(2):
        eng.generate(model, batch, greedy)
    assert eng.syncs == 1
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    edited = eng.generate(model, batch, greedy)
    assert eng.syncs == 2 and not torch.equal(edited.input_ids, before.input_ids)
    same_layout(edited, HF.generate(model, batch, greedy))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    stepped = eng.generate(model, batch, greedy)
    assert eng.syncs == 3 and not torch.equal(stepped.input_ids, edited.input_ids)
    same_layout(stepped, HF.generate(model, batch, greedy))
    other = tiny_model(seed=1)
    same_layout(eng.generate(other, batch, greedy), HF.generate(other, batch, greedy))
    assert eng.syncs == 4


def test_the_checkpoints_generation_config_changes_nothing(tmp_path):
    """A checkpoint whose generation_config.json would reshape decoding (penalties, no-repeat n-grams, suppressed
    tokens, top-k, another stop id): vLLM's greedy and seeded samples are those of the same weights without it."""
    plain, batch = tiny_model(), prompts()
    eng = engine()
    torch.manual_seed(0)
    want = [eng.generate(plain, batch, config(greedy=True)), eng.generate(plain, batch, config(temperature=1.0))]
    greedy_ids = want[0].response_ids
    model = tiny_model()
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.3,
        top_k=3,
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        suppress_tokens=[int(greedy_ids[0, 0])],
        eos_token_id=[TOK.eos_token_id, int(greedy_ids[1, 2])],
        max_new_tokens=4,
    )
    model.save_pretrained(tmp_path / "ckpt")
    own = model.generate(**batch, do_sample=False).shape[1]  # the checkpoint's own settings do change decoding
    assert own != batch["input_ids"].shape[1] + greedy_ids.shape[1]
    eng = VLLMEngine(RolloutConfig(engine="vllm"), ModelConfig(name_or_path=str(tmp_path / "ckpt")), TOK, DIST)
    torch.manual_seed(0)
    got = [eng.generate(model, batch, config(greedy=True)), eng.generate(model, batch, config(temperature=1.0))]
    for a, b in zip(got, want, strict=True):
        same_layout(a, b)
    assert eng.llm.llm_engine.model_config.get_diff_sampling_param() == {}


def lora_policy() -> torch.nn.Module:
    """The tiny model with LoRA on every linear layer and non-zero B (a fresh adapter changes nothing)."""
    model = apply_lora(tiny_model(), LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_lora_policy_greedy_equals_the_hf_engine(mode):
    """A peft LoRA policy: vLLM's greedy ids equal the hf engine's on the same PeftModel and differ from the base
    model's; the trainer's module is untouched (no merge left behind). After the adapter trains, pushed again."""
    model, batch, greedy = lora_policy(), prompts(), config(greedy=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eng = engine(vllm_lora=mode)
    seq = eng.generate(model, batch, greedy)
    same_layout(seq, HF.generate(model, batch, greedy))
    with model.disable_adapter():
        assert not torch.equal(seq.input_ids, HF.generate(model, batch, greedy).input_ids)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    seq = eng.generate(model, batch, greedy)
    same_layout(seq, HF.generate(model, batch, greedy))
    assert eng.syncs == 2


def test_top_k_samples_stay_in_the_top_k():
    """Top-k (allowed in eval): every first token is one of the k likeliest, and vLLM's log-prob is renormalised
    over them (the distribution it sampled from)."""
    n, model = 200, sharpened(8.0)
    batch = prompts(["Name a fruit."], repeat=n)
    with torch.no_grad():
        logits = model(**{k: v[:1] for k, v in batch.items()}).logits[0, -1]
    top = logits.topk(5).indices
    torch.manual_seed(2)
    seq = engine().generate(model, batch, config(max_new_tokens=1, temperature=1.0, top_k=5))
    first = seq.response_ids[:, 0]
    assert torch.isin(first, top).all()
    want = torch.log_softmax(logits[top], -1)[(first[:, None] == top[None, :]).int().argmax(1)]
    torch.testing.assert_close(seq.sampler_logprobs[:, 0], want, atol=1e-4, rtol=0)


def test_what_vllm_cannot_do_is_a_user_error():
    """tests/unit/helpers.py's TINY (head size 8: no CPU kernel), an unknown LoRA mode, and an adapter that also
    trains whole modules, which vLLM's LoRA cannot apply: each a UserError saying what to use instead."""
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UserError, match=r"head sizes \[32, .*this model's is 8.*rollout.engine=hf"):
        engine().generate(build_tiny_llama(tiny, TOK, 0), prompts(), config(greedy=True))
    with pytest.raises(UserError, match="merged or adapter"):
        engine(vllm_lora="both")
    model = apply_lora(tiny_model(), LoRAConfig(enabled=True, r=4, alpha=8), modules_to_save=["lm_head"])
    with pytest.raises(UserError, match="use rollout.vllm_lora=merged"):
        engine(vllm_lora="adapter").generate(model, prompts(), config(greedy=True))


def test_max_model_len_fits_the_cpu_kv_cache():
    """A KV cache too small for the model's context caps vLLM's max_model_len (vLLM refuses to start otherwise)."""
    big = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    big.max_position_embeddings = 8192
    # 2 (k, v) x 32 layers x 8 heads x 128 x 4 bytes = 256 KiB a token: 1 GiB holds 4096 tokens.
    assert max_model_len(big, 2**30, torch.float32) == 4096
    assert max_model_len(big, 4 * 2**30, torch.float32) is None
    assert max_model_len(tiny_model().config, 2**30, torch.float32) is None
