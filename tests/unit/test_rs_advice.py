"""A rejection-sampling round that selected too few samples names its fixes (stages/rejection_sampling.py
selection_fixes); each, applied as written to the same command, makes the re-run select again or draw again
(saved_round.reconcile): the advice can take effect."""

import json
import re
import shutil
from types import SimpleNamespace

import pytest

from rlhf_cli.config.compose import compose
from rlhf_cli.errors import UserError
from rlhf_cli.rollout import best_of_n as bon
from rlhf_cli.rollout import saved_round as saved
from rlhf_cli.stages import rejection_sampling as rs
from rlhf_cli.stages import rounds

PROMPTS = [SimpleNamespace(input_ids=[i, i + 1]) for i in range(6)]
RUN_RECORDS = {"sft": {"ended_at": "2026-01-01T00:00:00+0000"}}


def _run(stage_dir):
    return SimpleNamespace(stage_dir=stage_dir, stage_record=lambda name: RUN_RECORDS.get(name, {}))


def _round(cfg, stage_dir):
    """Round 1 of `cfg` drawn, merged and selected on disk; (files, the run stand-in)."""
    run = _run(stage_dir)
    st = cfg.stage
    idx = bon.round_prompts(len(PROMPTS), st.prompts_per_round, cfg.seed, 1)
    files = bon.RoundFiles.of(stage_dir, 1)
    saved.reconcile(files, 1, rounds.drawn_record(cfg, run, 1, idx, PROMPTS, None), saved.selection_rule(st), 0)
    rows = [
        {"prompt_index": p, "candidate": c, "score": 0.0, "response_ids": [c]} for p in idx for c in range(st.n_samples)
    ]
    files.candidates.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bon.select_round(files, st.n_samples, st, saved.selection_rule(st))
    return files, run


def _applied(fix: str) -> str:
    """The override a user writes for one fix as the message words it."""
    if fix.startswith("stage.selection="):
        return fix
    key, now = re.fullmatch(r"a (?:higher|lower) (stage\.\w+) \(now (.+)\)", fix).groups()
    return f"{key}={int(now) + 1}" if fix.startswith("a higher") else f"{key}={float(now) / 2}"


@pytest.mark.parametrize(
    "selection",
    [
        ["stage.selection=best"],
        ["stage.selection=top_k", "stage.top_k=1"],
        ["stage.selection=threshold", "stage.threshold=100"],
    ],
)
def test_every_advised_fix_selects_or_draws_again(tmp_path, selection):
    base = [
        "model.name_or_path=stage:sft",
        "stage.n_samples=2",
        "stage.prompts_per_round=3",
        "stage.reward.model=null",
        "stage.reward.function=rlhf_cli.tasks.parity:gold_reward",
        *selection,
    ]
    cfg = compose("rejection_sampling", base)
    files, _ = _round(cfg, tmp_path / "failed")
    with pytest.raises(UserError) as err:
        rs.round_plan(1, cfg.stage, 1, 1)
    fixes = rs.selection_fixes(cfg.stage)
    assert all(fix in str(err.value) for fix in fixes)
    for k, fix in enumerate(fixes):
        again = compose("rejection_sampling", [*base, _applied(fix)])
        stage_dir = tmp_path / f"fix-{k}"
        shutil.copytree(files.dir.parent, stage_dir)
        run, st = _run(stage_dir), again.stage
        idx = bon.round_prompts(len(PROMPTS), st.prompts_per_round, again.seed, 1)
        record = rounds.drawn_record(again, run, 1, idx, PROMPTS, None)
        fixed = bon.RoundFiles.of(stage_dir, 1)
        out = saved.reconcile(fixed, 1, record, saved.selection_rule(st), len(idx) * st.n_samples)
        assert out.redone and not out.selected, (fix, out)
        assert out.line and ("selecting again" in out.line or "drawing the candidates again" in out.line)


def test_the_same_command_reuses_the_round(tmp_path):
    cfg = compose(
        "rejection_sampling", ["model.name_or_path=stage:sft", "stage.n_samples=2", "stage.prompts_per_round=3"]
    )
    files, run = _round(cfg, tmp_path)
    idx = bon.round_prompts(len(PROMPTS), 3, cfg.seed, 1)
    out = saved.reconcile(
        files, 1, rounds.drawn_record(cfg, run, 1, idx, PROMPTS, None), saved.selection_rule(cfg.stage), 6
    )
    assert out.selected and not out.redone
