"""The right kind of model in each place, on the real command path: a causal LM (or a classifier saved without its
head) given as the reward model, the gold model or to `rlhf score` would score with a random head, and a reward
model given to `rlhf eval` as a policy would babble; each is refused with one `error:` line naming the folder, what
it is and what was expected, before the stage starts (no config.yaml written, so no model was loaded)."""

import shutil

import pytest
from conftest import FAST, copy_run, rlhf, sft_rm_base
from safetensors.torch import load_file, save_file
from test_errors import _one_clear_error

CAUSAL = "is a causal language model (LlamaForCausalLM), no score head: loaded as a classifier it would score with"
CLASSIFIER = "is a sequence classifier (LlamaForSequenceClassification)"
# Short runs, so that a stage that failed to refuse (the bug) ends soon and the test fails quickly.
RS = [
    "stage.rounds=1",
    "stage.prompts_per_round=4",
    "stage.n_samples=2",
    "stage.generation.max_new_tokens=4",
    "stage.max_steps=1",
    "stage.eval_batch_size=8",
    "stage.save_every=0",
]
GRPO = [
    "stage.max_steps=1",
    "stage.rollout_batch_size=4",
    "stage.n_samples=2",
    "stage.generation.max_new_tokens=4",
    "stage.eval_batch_size=8",
    "stage.save_every=0",
]
EVAL = ["stage.max_prompts=2", "stage.kl_samples=0", "stage.generation.max_new_tokens=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sft_rm_base(tmp_path_factory.mktemp("kind_base"))


def _not_started(run_dir, stage):
    assert not (run_dir / stage / "config.yaml").exists()  # run.begin never came: nothing loaded after the check


def test_a_causal_lm_as_reward_or_gold_model_of_an_online_stage_is_refused(base, runs, tmp_path):
    args = copy_run(base, runs, "rs", "rejection_sampling")
    sft = runs / "rs" / "sft" / "final"
    res = rlhf("rejection_sampling", *FAST, *RS, *args, "stage.reward.model=stage:sft", cwd=tmp_path)
    _one_clear_error(res, f"stage.reward.model=stage:sft ({sft}) {CAUSAL}", "rlhf rm")
    _not_started(runs / "rs", "rejection_sampling")
    res = rlhf("rejection_sampling", *FAST, *RS, *args, "stage.gold_reward=stage:sft", cwd=tmp_path)
    _one_clear_error(res, f"stage.gold_reward=stage:sft ({sft}) {CAUSAL}")
    _not_started(runs / "rs", "rejection_sampling")


def test_a_classifier_saved_without_its_head_is_refused_as_reward_model(base, runs, tmp_path):
    args = copy_run(base, runs, "cf", "grpo")
    headless = runs / "cf" / "headless_rm"
    shutil.copytree(runs / "cf" / "rm" / "final", headless)
    weights = headless / "model.safetensors"
    save_file(
        {k: v for k, v in load_file(weights).items() if not k.startswith("score.")}, weights, metadata={"format": "pt"}
    )
    res = rlhf("grpo", *FAST, *GRPO, *args, f"stage.reward.model={headless}", cwd=tmp_path)
    _one_clear_error(res, f"{headless} {CLASSIFIER}, its head missing from the checkpoint")
    _not_started(runs / "cf", "grpo")


def test_score_refuses_a_causal_lm(base, tmp_path):
    sft = base / "sft" / "final"
    res = rlhf("score", f"model={sft}", "prompt=Hi", "response=Hello", cwd=tmp_path)
    _one_clear_error(res, f"model={sft} {CAUSAL}", f"`rlhf generate model={sft}` answers with a causal LM")
    assert not res.stdout
    res = rlhf(
        "score", f"run.root={base.parent}", "run.name=base", "stage=sft", "prompt=Hi", "response=Hello", cwd=tmp_path
    )
    _one_clear_error(res, f"run.name=base stage=sft ({sft}) {CAUSAL}")


def test_eval_refuses_a_reward_model_as_policy_and_a_causal_lm_as_judge(base, runs, tmp_path):
    args = copy_run(base, runs, "ev", "eval")
    rm, sft = runs / "ev" / "rm" / "final", runs / "ev" / "sft" / "final"
    res = rlhf("eval", *args, *EVAL, "stage.policies=[rm]", cwd=tmp_path)
    _one_clear_error(res, f"stage.policies: stage `rm` ({rm}) {CLASSIFIER}", "a policy must be a causal language model")
    res = rlhf("eval", *args, *EVAL, "model.name_or_path=stage:rm", cwd=tmp_path)
    _one_clear_error(res, f"model.name_or_path=stage:rm ({rm}) {CLASSIFIER}", "the reference policy must be a causal")
    res = rlhf("eval", *args, *EVAL, "stage.reward.model=stage:sft", cwd=tmp_path)
    _one_clear_error(res, f"stage.reward.model=stage:sft ({sft}) {CAUSAL}")
    res = rlhf("eval", *args, *EVAL, "stage.gold=stage:sft", cwd=tmp_path)
    _one_clear_error(res, f"stage.gold=stage:sft ({sft}) {CAUSAL}")
    _not_started(runs / "ev", "eval")
