"""Learning: a reward model trained with `rlhf rm` ranks held-out pairs of the project's synthetic preference data.

The pairs (rlhf_cli/assets/sample_preferences.jsonl) spoil the correct, polite answer in five ways (`kind`). Three
leave a mark on the reply itself that a small model can learn from a few hundred pairs: a rude opener or closer,
an unfinished sentence, repeated words. The other two need knowledge the tiny model lacks: `wrong_fact` (arithmetic,
capitals, letter counts...) and `off_topic` (a correct answer to another task's question). On all five kinds the
tiny model reaches about 0.7-0.8 held-out accuracy (from scratch or from a short SFT), so the 0.9 bar is set on
the learnable kinds: all their rows, the same seeded prompt-level split as the built-in data set.
"""

from __future__ import annotations

import json

import pytest
from conftest import FAST, manifest, metrics, rlhf

from rlhf_cli.data.sources import ASSETS_DIR

pytestmark = pytest.mark.learning

LEARNABLE = ("rude", "truncated", "repetition")


def test_reward_model_learns_the_learnable_kinds_to_090_accuracy(tmp_path):
    lines = (ASSETS_DIR / "sample_preferences.jsonl").read_text().splitlines()
    subset = [line for line in lines if json.loads(line)["kind"] in LEARNABLE]
    assert len(subset) == 310
    source = tmp_path / "learnable.jsonl"
    source.write_text("\n".join(subset) + "\n")
    runs = tmp_path / "runs"
    res = rlhf(
        "rm",
        *FAST,
        f"run.root={runs}",
        "run.name=learn",
        "model.name_or_path=builtin:tiny-llama",  # from scratch: the property is in the reply, no SFT needed
        f"data.source={source}",
        "stage.epochs=6",
        "stage.micro_batch_size=8",
        "stage.gradient_accumulation_steps=1",
        "stage.eval_every=34",  # once per epoch
        "stage.save_every=0",
        "optim.lr=1e-3",
        "stage.min_eval_accuracy=0.9",  # the stage's own gate: a miss fails the run
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rec = manifest(runs / "learn")["stages"]["rm"]
    assert rec["status"] == "completed" and rec["metrics"]["data"]["eval_examples"] >= 25
    assert rec["metrics"]["eval_accuracy"] >= 0.9 and rec["metrics"]["eval_margin"] > 1.0
    log = metrics(runs / "learn", "rm")
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[:3]) / 3 > 0.6 and sum(losses[-20:]) / 20 < 0.15  # from chance (log 2) to separated
    first_eval = next(r["eval_accuracy"] for r in log if "eval_accuracy" in r)
    assert first_eval < rec["metrics"]["eval_accuracy"]
