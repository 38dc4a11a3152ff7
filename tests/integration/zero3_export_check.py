"""Run under torchrun with 2 ranks: train a tiny model 2 steps under ZeRO-3, take its logits on a fixed
batch (in-training, sharded model), export final/ and compare with the reloaded Hugging Face model."""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhf_cli import engine as eng
from rlhf_cli.config.compose import compose
from rlhf_cli.models import load_causal_lm, load_tokenizer

out_dir = Path(sys.argv[1])
dist = eng.init_distributed()
cfg = compose(
    "sft",
    [
        "deepspeed=zero3",
        "model.tiny.hidden_size=64",
        "model.tiny.intermediate_size=176",
        "model.tiny.num_hidden_layers=2",
        "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2",
        "optim.lr=1e-2",
    ],
)
tok = load_tokenizer(cfg.model)
model = load_causal_lm(cfg.model, tok, seed=0)
engine = eng.initialize(model, eng.ds_config(cfg.deepspeed, cfg.optim, 2, 1, dist.world_size), cfg.optim, 10)
ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(dist.rank))
for _ in range(2):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
engine.eval()
probe = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(123))
with torch.no_grad():
    live = engine(input_ids=probe).logits
eng.export_hf(engine, tok, out_dir, merge_lora=False)
if dist.is_main:
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - live).abs().max().item()
    print(f"max |logits diff| {diff:.3g}")
    assert diff < 1e-5, diff
    assert live.abs().max() > 0.1  # the model is not an empty shard
eng.shutdown()
eng.exit_now(0)  # as the CLI does: skip interpreter teardown, which can abort a rank (SIGABRT)
