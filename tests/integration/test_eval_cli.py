"""`rlhf eval` end to end on a tiny run: eval.json with every field, the reference against itself (win rate 0.5
within sampling error, KL exactly 0), a changed policy (KL > 0), a second reward model as the gold metric, a gold
function, and a run without a reward model."""

import json
import shutil

import pytest
from conftest import copy_run, manifest, rlhf, sft_rm_base
from safetensors.torch import load_file, save_file

EVAL = ["logging.progress=false", "stage.generation.max_new_tokens=12", "stage.eval_batch_size=16"]
SAMPLED = ["stage.n_samples=4", "stage.generation.temperature=1.0"]
FIELDS = (
    "reward_mean",
    "reward_mean_se",
    "win_rate",
    "win_rate_se",
    "kl",
    "kl_se",
    "response_length",
    "response_length_se",
    "eos_rate",
    "eos_rate_se",
    "gold_mean",
    "gold_mean_se",
    "responses",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sft_rm_base(tmp_path_factory.mktemp("eval_base"))


def _add_policy(run_dir, name, scale):
    """A completed policy stage `name`: the sft policy with its LM head scaled (a different distribution)."""
    shutil.copytree(run_dir / "sft" / "final", run_dir / name / "final")
    path = run_dir / name / "final" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * scale
    save_file(tensors, str(path), metadata={"format": "pt"})
    record = manifest(run_dir)
    record["stages"][name] = {"status": "completed", "ended_at": "2100-01-01T00:00:00+0000"}
    (run_dir / "manifest.json").write_text(json.dumps(record))


def test_eval_writes_every_field_and_the_reference_ties_with_itself(base, runs, tmp_path):
    args = copy_run(base, runs, "ev", "eval")
    _add_policy(runs / "ev", "sharp", 3.0)
    res = rlhf("eval", *args, *EVAL, *SAMPLED, "stage.gold=stage:rm", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((runs / "ev" / "eval" / "eval.json").read_text())
    assert list(out["results"]) == ["reference", "sft", "sharp"]  # every completed policy stage, the rm left out
    assert out["reference"].endswith("ev/sft/final") and out["n_samples"] == 4 and out["prompts"] > 0
    sft, sharp = out["results"]["sft"], out["results"]["sharp"]
    for key in FIELDS:
        assert key in sft and key in sharp, key
    assert sft["responses"] == 4 * out["prompts"] and out["kl_samples"] == 4
    # The reference against itself: fresh draws, so a win rate of 0.5 up to sampling error; the same model, KL 0.
    assert abs(sft["win_rate"] - 0.5) < 3 * sft["win_rate_se"] + 0.02 and sft["kl"] == 0.0
    assert sharp["kl"] > 3 * sharp["kl_se"] > 0  # a sharper head: a real KL, measured
    assert sharp["gold_mean"] == pytest.approx(sharp["reward_mean"], abs=1e-5)  # gold = the same reward model
    rec = manifest(runs / "ev")["stages"]["eval"]
    assert rec["status"] == "completed" and rec["metrics"]["sharp/kl"] == sharp["kl"]
    assert "win rate" in res.stderr and "sharp" in res.stderr
    assert "rollout engine: hf (rollout.engine=hf)" in res.stderr  # which engine answers, said at the start
    assert f"eval completed: {runs / 'ev' / 'eval' / 'eval.json'}" in res.stderr  # not a final/ it never writes


def test_greedy_eval_with_a_gold_function_and_without_a_reward_model(base, runs, tmp_path):
    args = copy_run(base, runs, "nr", "eval")
    shutil.rmtree(runs / "nr" / "rm")
    record = manifest(runs / "nr")
    del record["stages"]["rm"]
    (runs / "nr" / "manifest.json").write_text(json.dumps(record))
    res = rlhf(
        "eval",
        *args,
        *EVAL,
        "data=parity",
        "data.eval_fraction=0.05",
        "stage.max_prompts=8",
        "stage.gold=rlhf_cli.tasks.parity:gold_reward",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no reward model in this run" in res.stderr
    sft = json.loads((runs / "nr" / "eval" / "eval.json").read_text())["results"]["sft"]
    assert "reward_mean" not in sft and "win_rate" not in sft and sft["responses"] == 32  # 8 prompts x 4 KL samples
    assert 0.0 <= sft["gold_mean"] <= 1.0 and sft["kl"] == 0.0
    ref = json.loads((runs / "nr" / "eval" / "eval.json").read_text())["results"]["reference"]
    assert ref["gold_mean"] == sft["gold_mean"]  # greedy: the same model gives the same answers


def test_eval_refuses_an_unknown_policy_stage_and_greedy_with_several_answers(base, runs, tmp_path):
    args = copy_run(base, runs, "bad", "eval")
    res = rlhf("eval", *args, "stage.policies=[ppo]", cwd=tmp_path)
    assert res.returncode == 2 and "stage `ppo` of run `bad` is not run" in res.stderr and "Traceback" not in res.stderr
    res = rlhf("eval", *args, "stage.n_samples=2", cwd=tmp_path)
    assert res.returncode == 2 and "stage.n_samples=2 needs stage.generation.temperature > 0" in res.stderr
