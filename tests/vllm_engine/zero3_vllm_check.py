"""Run under torchrun with 2 ranks (tests/vllm_engine/test_vllm_zero3.py): vLLM rollouts from a ZeRO-3 engine whose
parameters are really partitioned (`stage3_param_persistence_threshold: 0`: no parameter kept whole), one vLLM per
rank inside the gloo job, prompts and lengths that differ between the ranks.

Checks on each rank: every parameter is a shard; vLLM's greedy ids equal those of the unpartitioned model in one
process (the hf engine); after an optimizer step the weights are pushed again (gathered module by module) and
vLLM's ids equal the hf engine's on the stepped engine; no push without a step. Prints `ZERO3-VLLM OK rank N`."""

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.compose import compose
from rlhf_cli.config.online import RolloutConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.rollout.engines import HF
from rlhf_cli.rollout.generation import sampling_config
from rlhf_cli.rollout.vllm_engine import VLLMEngine


def main() -> None:
    dist = eng.init_distributed()
    cfg = compose(
        "sft",
        [
            "deepspeed=zero3",
            "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0}}",
            "model.tiny.hidden_size=64",
            "model.tiny.intermediate_size=128",
            "model.tiny.num_hidden_layers=2",
            "model.tiny.num_attention_heads=2",
            "model.tiny.num_key_value_heads=1",
            "optim.lr=0.05",
        ],
    )
    assert cfg.deepspeed.extra["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    tok = load_tokenizer(cfg.model)
    plain = load_causal_lm(cfg.model, tok, seed=0).eval()
    model = load_causal_lm(cfg.model, tok, seed=0)
    engine = eng.initialize(model, eng.ds_config(cfg.deepspeed, cfg.optim, 2, 1, dist.world_size), cfg.optim, 10)
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in engine.module.parameters()), "not partitioned"

    texts = ["Is 7 even or odd?", "Name a fruit."] if dist.rank == 0 else ["Hi", "Write a poem about the sea."]
    rows = [tokenize_prompt(tok, [{"role": "user", "content": t}], 64) for t in texts]
    batch = collate_prompts(rows, tok.pad_token_id)
    gen = type("Gen", (), {"max_new_tokens": 8 if dist.rank == 0 else 24, "temperature": 1.0})
    greedy = sampling_config(gen, tok.eos_token_id, tok.pad_token_id, greedy=True)
    vllm = VLLMEngine(RolloutConfig(engine="vllm"), cfg.model, tok, dist)

    seq = vllm.generate(engine, batch, greedy)
    assert torch.equal(seq.input_ids, HF.generate(plain, batch, greedy).input_ids), "differs from one process"
    assert all(p.numel() == 0 for p in engine.module.parameters()), "left gathered"

    engine.train()
    loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
    engine.backward(loss)
    engine.step()
    stepped = vllm.generate(engine, batch, greedy)
    assert vllm.syncs == 2 and engine.global_steps == 1
    assert torch.equal(stepped.input_ids, HF.generate(engine, batch, greedy).input_ids), "stale weights"
    assert not torch.equal(stepped.input_ids, seq.input_ids), "the step changed nothing"
    vllm.generate(engine, batch, greedy)
    assert vllm.syncs == 2
    print(f"ZERO3-VLLM OK rank {dist.rank}: vLLM started in {vllm.start_seconds:.1f} s", flush=True)
    eng.shutdown()
    eng.exit_now(0)  # as the CLI ends its ranks: gloo's threads can abort a rank at interpreter exit


if __name__ == "__main__":
    main()
