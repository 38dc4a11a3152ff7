"""A new user's first hour: `--help` on every command, one spelling of the run name that works everywhere, `rlhf
generate` on the newest completed policy (never a reward model), a labelled `rlhf score` line. In process, on hand-made
run directories of tiny models: no training."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from test_rm_cli import _save_seeded
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_cli.cli import COMMANDS, STAGES, main
from rlhf_cli.commands import generate as generate_cmd
from rlhf_cli.commands.help import field_comments
from rlhf_cli.config.online import PPOStageConfig
from rlhf_cli.models import tiny_tokenizer

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
# Stage -> (status, ended_at, model class of final/), in the order a pipeline runs them: rm is the newest completed
# stage but a reward model, dpo has a final/ but is not complete, so the policy to use is ppo's.
STAGE_FOLDERS = {
    "sft": ("completed", "2026-11-30T10:00:00+0000", LlamaForCausalLM),
    "rm": ("completed", "2026-11-30T13:00:00+0000", LlamaForSequenceClassification),
    "ppo": ("completed", "2026-11-30T12:00:00+0100", LlamaForCausalLM),  # 11:00 UTC: after sft, in another zone
    "dpo": ("running", None, LlamaForCausalLM),
}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("verb", [*STAGES, *COMMANDS])
def test_every_command_has_a_help_that_fits_80_columns(capsys, verb):
    code, out, err = _cli(capsys, verb, "--help")
    assert code == 0 and not err, err
    assert out.startswith(f"usage: rlhf {verb}") and "Example" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    if verb in STAGES:
        assert "Config groups" in out and "tiny_llama*" in out and "zero0*" in out
        assert "run.name=demo" in out and "`run=` is accepted too" in out and "optim.lr=" in out
        assert "Peak learning rate" in out  # the schema's comment on OptimConfig.lr
        assert out.rstrip().endswith(f"`rlhf {verb} --cfg job` prints every key.")


def test_stage_help_shows_composed_defaults_comments_and_the_choices_that_fit(capsys):
    out = _cli(capsys, "ppo", "-h")[1]
    assert "optim.lr=2e-05" in out and "stage.kl_coef=0.05" in out  # configs/stage/ppo.yaml, not the schema's
    assert "KL to the reference, in the reward per token: k1 | k2 | k3" in out  # the comment above kl_estimator
    assert re.search(r"data +sample_prompts\*, parity, word_order\n", out)  # prompt data only
    assert re.search(r"\+experiment +ppo_detox, ppo_hh_rlhf, ppo_parity\n", out)
    assert "stage.generation.{max_new_tokens, temperature, top_k, top_p}" in out
    rm = _cli(capsys, "rm", "--help")[1]
    assert re.search(r"data +sample_preferences\*, hh_rlhf, parity_pairs, shp, ultrafeedback\n", rm)
    assert re.search(r"\+experiment +hh_rlhf\n", rm) and "stage.min_eval_accuracy=null" in rm
    overridden = _cli(capsys, "sft", "optim.lr=0.5", "--help")[1]
    assert "with the overrides given" in overridden and "optim.lr=0.5" in overridden


def test_tool_help_lists_arguments_with_defaults(capsys):
    out = _cli(capsys, "generate", "-h")[1]
    assert "max_new_tokens=64" in out and "run.root=runs" in out and "`root=` is accepted too" in out
    assert "newest completed policy stage" in out and 'rlhf generate run.name=demo prompt="' in out
    out = _cli(capsys, "score", "--help")[1]
    assert "reduce=logit" in out and "label=" in out and "input=pairs.jsonl" in out
    assert _cli(capsys, "help", "explain")[1].startswith("usage: rlhf explain <stage> [overrides]")


def test_field_comments_come_from_the_schema_source():
    comments = field_comments(PPOStageConfig)
    assert comments["max_steps"] == "optimizer steps; overrides epochs when set"  # inline, inherited
    assert comments["target_kl"].startswith("Stop this iteration's remaining mini-batches")  # the line above
    assert "kl_coef" not in comments


# ---------------------------------------------------------------- one spelling of the run name


def test_a_stage_takes_run_and_root_for_run_name_and_run_root(capsys, tmp_path):
    code, out, err = _cli(capsys, "sft", "--cfg", "job", "run=newbie", f"root={tmp_path}")
    assert code == 0, err
    assert "name: newbie" in out and f"root: {tmp_path}" in out
    # The aliases never hide a real key: no stage has a top-level `root` (and `run` is a group of keys).
    assert all("root" not in {f.name for f in dataclasses.fields(s.schema)} for s in STAGES.values())


def test_a_tool_takes_run_name_and_run_root():
    for spelling in (["run.name=x", "run.root=/r"], ["run=x", "root=/r"]):
        a = generate_cmd.parse_args([*spelling, "prompt=hi"])
        assert (a.run, a.root) == ("x", "/r")


# ---------------------------------------------------------------- generate: the newest completed policy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """runs/r/ by hand: sft, rm and ppo completed, dpo running; every final/ a tiny seeded model."""
    run = tmp_path_factory.mktemp("runs") / "r"
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=1, **SHAPE)
    stages = {}
    for stage, (status, ended_at, model_class) in STAGE_FOLDERS.items():
        _save_seeded(model_class, config, tok, run / stage / "final")
        stages[stage] = {"status": status, "ended_at": ended_at}
    (run / "manifest.json").write_text(json.dumps({"run": "r", "stages": stages}))
    return run


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """The folders `rlhf generate` loads (the generation itself is tested in test_sft_cli)."""
    paths: list[str] = []
    monkeypatch.setattr(generate_cmd, "generate", lambda path, a: paths.append(path) or "(reply)")
    return paths


def test_generate_uses_the_newest_completed_policy_stage(capsys, run_dir, loaded):
    code, out, err = _cli(capsys, "generate", "run.name=r", f"run.root={run_dir.parent}", "prompt=Hi")
    assert code == 0 and out == "(reply)\n", err
    assert loaded == [str(run_dir / "ppo" / "final")]
    assert err == "using ppo/final (newest completed policy stage; stage=sft for another)\n"
    code, _, err = _cli(capsys, "generate", "run=r", f"root={run_dir.parent}", "stage=sft", "prompt=Hi")
    assert code == 0 and loaded[-1] == str(run_dir / "sft" / "final") and not err


def test_generate_refuses_a_reward_model_before_loading_it(capsys, run_dir, loaded):
    code, out, err = _cli(capsys, "generate", "run.name=r", f"run.root={run_dir.parent}", "stage=rm", "prompt=Hi")
    assert code == 2 and not out and not loaded
    assert "sequence classifier (LlamaForSequenceClassification)" in err
    assert "rlhf score run.name=r stage=rm" in err and "MISSING" not in err
    code, _, err = _cli(capsys, "generate", f"model={run_dir / 'rm' / 'final'}", "prompt=Hi")
    assert code == 2 and f"rlhf score model={run_dir / 'rm' / 'final'}" in err and not loaded


# ---------------------------------------------------------------- score: a labelled line


def test_score_labels_a_single_pair_and_keeps_the_jsonl_output(capsys, run_dir, tmp_path):
    where = ["run.name=r", f"run.root={run_dir.parent}"]
    code, out, err = _cli(capsys, "score", *where, "prompt=Hi", "response=Hello")
    assert code == 0, err
    final = run_dir / "rm" / "final"
    single = re.fullmatch(rf"score: (\S+) \(reward model {re.escape(str(final))}, logit of label 0\)\n", out)
    assert single, out
    src, dst = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    src.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    code, out, err = _cli(capsys, "score", *where, f"input={src}", f"output={dst}")
    assert code == 0 and not out and f"scored 1 rows with {final} -> {dst} (mean " in err, err
    (row,) = [json.loads(line) for line in dst.read_text().splitlines()]
    assert row["score"] == pytest.approx(float(single.group(1)), rel=1e-5)
