"""stage.reward.normalize=rm_stats uses the statistics of the reward model actually used, or refuses."""

import json
from types import SimpleNamespace

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.rollout.online import reward_stats
from rlhf_cli.run_dir import Run


def _run(tmp_path, rm_metrics=None):
    """A run whose rm stage is completed (rm/final exists) with `rm_metrics` in its manifest record."""
    run = Run(root=tmp_path / "run", stage="ppo")
    (run.root / "rm" / "final").mkdir(parents=True)
    record = {"status": "completed", "metrics": rm_metrics or {}}
    (run.root / "manifest.json").write_text(json.dumps({"run": "run", "stages": {"rm": record}}))
    return run


def _st(model="stage:rm", function=None, reduce="logit", label=None):
    reward = SimpleNamespace(normalize="rm_stats", model=model, function=function, reduce=reduce, label=label)
    return SimpleNamespace(reward=reward)


def _folder(tmp_path, name, stats=None):
    folder = tmp_path / name
    folder.mkdir()
    if stats:
        (folder / "reward_stats.json").write_text(json.dumps(stats))
    return folder


def test_this_runs_rm_uses_its_file_then_its_manifest(tmp_path):
    run = _run(tmp_path, {"reward_mean": 1.0, "reward_std": 2.0})
    assert reward_stats(_st(), run) == (1.0, 2.0)  # an older run: no file, the manifest record
    (run.root / "rm" / "final" / "reward_stats.json").write_text(json.dumps({"reward_mean": 3.0, "reward_std": 4.0}))
    assert reward_stats(_st(), run) == (3.0, 4.0)


def test_another_reward_model_uses_its_own_statistics_not_this_runs_rm(tmp_path):
    run = _run(tmp_path, {"reward_mean": 1.0, "reward_std": 2.0})
    other = _folder(tmp_path, "other_rm", {"reward_mean": -5.0, "reward_std": 0.5})
    assert reward_stats(_st(model=str(other)), run) == (-5.0, 0.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "FOLDER"}, "reward_stats.json next to the weights"),  # a classifier with no recorded statistics
        ({"function": "rlhf_cli.tasks.parity:gold_reward"}, "the function rlhf_cli.tasks.parity:gold_reward"),
        ({"reduce": "prob"}, "not of reduce=prob"),
        ({"label": "positive"}, "label=positive"),
    ],
)
def test_statistics_that_do_not_describe_the_scores_are_refused(tmp_path, kwargs, message):
    run = _run(tmp_path, {"reward_mean": 1.0, "reward_std": 2.0})
    if kwargs.get("model") == "FOLDER":
        kwargs["model"] = str(_folder(tmp_path, "classifier"))
    with pytest.raises(UserError, match="normalize=rm_stats") as err:
        reward_stats(_st(**kwargs), run)
    assert message in str(err.value) and "normalize=running" in str(err.value)
