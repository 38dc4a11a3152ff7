"""The tools meet users where the stages are: the stages' default run, a finished evaluation's table shown again
without computing it, a refusal that names what exists, "did you mean" for a group choice, a stage's help without
folders that are no group of it. No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_damage import healthy_run

from rlhf_cli.cli import main
from rlhf_cli.commands import generate, plot, score
from rlhf_cli.commands.help import group_choices, tool_help
from rlhf_cli.config.compose import config_dir
from rlhf_cli.config.schema import RunConfig
from rlhf_cli.errors import UserError
from rlhf_cli.registry import completed_refusal


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the default run


def test_the_tools_read_the_run_the_stages_write_by_default(tmp_path, capsys, monkeypatch):
    assert generate.parse_args(['prompt="Hi"']).run == RunConfig.name == "demo"
    assert score.parse_args(["prompt=Hi", "response=Hello"]).run == "demo"
    assert generate.parse_args(["prompt=Hi", "model=some/folder"]).run is None  # model= replaces the run
    assert score.parse_args(["prompt=Hi", "response=Hello", "model=m"]).run is None
    with pytest.raises(UserError, match="give one of run.name=<name> or model=<path or hub id>, not both"):
        generate.parse_args(["prompt=Hi", "model=m", "run=x"])
    assert "  run.name=demo" in tool_help("generate", generate, ()).splitlines()
    monkeypatch.chdir(tmp_path)
    healthy_run(tmp_path / "runs")  # runs/demo, as `rlhf sft` with no run.name leaves it
    code, out, err = _cli(capsys, "plot")
    assert code == 0 and out.startswith("sft: runs/demo/sft/metrics.png"), err
    assert plot.PlotArgs().run == "demo"


# ---------------------------------------------------------------- a finished evaluation


EVAL = {
    "reference": "runs/x/sft/final",
    "policies": {"sft": "runs/x/sft/final", "ppo": "runs/x/ppo/final"},
    "prompts": 180,
    "n_samples": 1,
    "temperature": 0.0,
    "kl_samples": 4,
    "reward": None,
    "gold": "g:f",
    "results": {
        name: {
            "reward_mean": r,
            "reward_mean_se": 0.2,
            "win_rate": w,
            "win_rate_se": 0.03,
            "gold_mean": g,
            "gold_mean_se": 0.04,
        }
        for name, r, w, g in (("reference", 2.5, 0.5, 0.53), ("sft", 2.5, 0.5, 0.53), ("ppo", 6.2, 0.79, 0.67))
    },
}


def _evaluated_run(root: Path) -> Path:
    run = healthy_run(root, "x")
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL))
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = {f"{name}/{k}": v for name, row in EVAL["results"].items() for k, v in row.items() if "_se" not in k}
    manifest["stages"]["eval"]["metrics"] = metrics
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_runs_lists_the_evaluation_and_prints_its_table_again(tmp_path, capsys):
    root = tmp_path / "runs"
    run = _evaluated_run(root)
    code, out, err = _cli(capsys, "runs", f"run.root={root}")
    assert code == 0 and not err, err
    (row,) = [line for line in out.splitlines() if line.split()[:1] == ["eval"]]
    assert "gold sft 0.53, ppo 0.67" in row and "reference" not in row  # the gold first, policies as they ran
    assert out.splitlines()[-1] == f"evaluation table of x: rlhf runs run.name=x run.root={root}"
    before = (run / "eval" / "eval.json").read_bytes()
    code, out, err = _cli(capsys, "runs", f"run.root={root}", "run.name=x")
    assert code == 0 and not err, err
    lines = out.splitlines()
    assert lines[0] == f"run {root}/x" and "held-out evaluation: 180 prompts, answers greedy" in out
    assert [line.split()[:4] for line in lines if line.startswith("  ppo")] == [["ppo", "6.200", "+-", "0.200"]]
    assert (run / "eval" / "eval.json").read_bytes() == before  # read, not recomputed or rewritten
    (run / "eval" / "eval.json").write_bytes(b"\x00garbage")
    code, out, err = _cli(capsys, "runs", f"run.root={root}", "run.name=x")
    assert code == 0 and "eval/eval.json is not readable" in out
    code, out, err = _cli(capsys, "runs", f"run.root={root}", "run.name=nope")
    assert code == 2 and err.startswith(f"error: no run directory {root}/nope") and len(err.splitlines()) == 1


def test_the_refusal_of_a_completed_stage_names_what_exists_and_how_to_see_it_again(tmp_path):
    run = _evaluated_run(tmp_path / "runs")
    message = completed_refusal("eval", run)
    named = message.split("already complete (")[1].split(")")[0]
    assert Path(named) == run / "eval" / "eval.json" and Path(named).is_file()  # eval writes no final/
    assert f"`rlhf runs run.name=x run.root={run.parent}` prints its table again" in message
    assert "run.overwrite=true to run it again" in message
    message = completed_refusal("sft", run, "; it is stale: sft re-ran after it")
    assert (
        f"already complete ({run}/sft/final); it is stale: sft re-ran after it; add run.overwrite=true to train"
        in message
        and "prints" not in message
    )
    assert "run.root" not in completed_refusal("eval", Path("runs") / "demo")  # the default root goes unsaid


# ---------------------------------------------------------------- groups


def test_a_stage_help_lists_only_its_config_groups():
    groups = group_choices("sft", config_dir())
    assert "+pipeline" not in groups and "model" in groups and "+experiment" in groups
