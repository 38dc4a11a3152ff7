"""Run under torchrun with 2 ranks: generation from a ZeRO-3 engine whose parameters are really partitioned
(`stage3_param_persistence_threshold: 0`), with responses of different lengths on each rank.

Checks: every parameter is a shard before generating; DeepSpeed's module hooks are off while generating and back
afterwards; each rank's greedy responses equal those of the unpartitioned model; training still works after it
(the loss of a step equals that of the same step on an engine that never generated). Prints generation tokens/s.
`--old` generates the way the code did before (parameters gathered, hooks left on), for the before/after numbers."""

import sys
import time

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.compose import compose
from rlhf_cli.config.online import GenerationConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.rollout.generation import sample, sampling_config

OLD = "--old" in sys.argv
EQUAL = "--equal" in sys.argv  # both ranks generate 40 tokens (the old way hangs when ranks stop at different lengths)
dist = eng.init_distributed()
PARTITION_ALL = "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0}}"
cfg = compose(
    "sft",
    [
        "deepspeed=zero3",
        PARTITION_ALL,
        "model.tiny.hidden_size=64",
        "model.tiny.intermediate_size=176",
        "model.tiny.num_hidden_layers=2",
        "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2",
    ],
)
tok = load_tokenizer(cfg.model)
plain = load_causal_lm(cfg.model, tok, seed=0).eval()


def new_engine():
    model = load_causal_lm(cfg.model, tok, seed=0)
    return eng.initialize(model, eng.ds_config(cfg.deepspeed, cfg.optim, 2, 1, dist.world_size), cfg.optim, 10)


def hooks(module) -> int:
    """ZeRO-3's parameter fetch / release hooks sit on every submodule (the engine's own few are on the root)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in list(module.modules())[1:])


engine = new_engine()
assert all(p.numel() == 0 for p in engine.module.parameters()), "parameters are not partitioned"
texts = ["Is 7 even or odd?", "Name a fruit."] if dist.rank == 0 else ["Hi", "Write a poem about the sea."]
batch = collate_prompts([tokenize_prompt(tok, [{"role": "user", "content": t}], 64) for t in texts], tok.pad_token_id)
# Rank 0 stops after 2 new tokens, rank 1 goes on for 40: the ranks leave the decoding loop at different times.
config = sampling_config(
    GenerationConfig(max_new_tokens=2 if dist.rank == 0 and not EQUAL else 40),
    tok.eos_token_id,
    tok.pad_token_id,
    greedy=True,
)
before = hooks(engine.module)
t0 = time.perf_counter()
if OLD:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())), torch.no_grad():
        during = hooks(engine.module)
        seq = sample(engine.module.eval(), batch, config, tok.eos_token_id, tok.pad_token_id)
else:
    with eng.gathered_for_generation(engine) as module:
        during = hooks(module)
        seq = sample(module, batch, config, tok.eos_token_id, tok.pad_token_id)
seconds = time.perf_counter() - t0
new_tokens = float(eng.all_reduce_sum(seq.response_mask.sum()))
if dist.is_main:
    print(
        f"generation: {new_tokens:.0f} new tokens in {seconds:.2f} s on rank 0 = {new_tokens / seconds:.1f} tok/s "
        f"({'old: hooks on' if OLD else 'hooks off'}); hooks {before} -> {during} -> {hooks(engine.module)}"
    )
with torch.no_grad():
    expected = sample(plain, batch, config, tok.eos_token_id, tok.pad_token_id)
assert torch.equal(seq.input_ids, expected.input_ids), "ZeRO-3 generation differs from the unpartitioned model"
if not OLD:
    assert during == 0 and before > 0 and hooks(engine.module) == before, (before, during, hooks(engine.module))
    assert all(p.numel() == 0 for p in engine.module.parameters()), "parameters left gathered after generation"

# Training after generation: the same step on a fresh engine gives the same loss.
ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(dist.rank))
losses = []
for e in (engine, new_engine()):
    e.train()
    step_losses = []
    for _ in range(2):
        loss = e(input_ids=ids, labels=ids).loss
        e.backward(loss)
        e.step()
        step_losses.append(float(loss))
    losses.append(step_losses)
assert losses[0] == losses[1], losses
if dist.is_main:
    print(f"ok: training after generation matches ({losses[0]})")
eng.shutdown()
eng.exit_now(0)  # as the CLI does: skip interpreter teardown, which can abort a rank (SIGABRT)
