"""Metrics: the progress bar at 80 columns keeps step/total and the ETA, plain log lines carry the ETA and what
docs/stages.md promises for every stage (loss, lr, tokens/s), and a resumed run drops the rows of the steps it
replays."""

import io
import json
import re
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console

import rlhf_cli.metrics as metrics_mod
from rlhf_cli.metrics import Metrics
from rlhf_cli.stages import dpo, ppo, rm, sft

STAGES = {"sft": sft.SHOW, "rm": rm.SHOW, "dpo": dpo.SHOW, "ppo": ppo.SHOW}
LOGGING = SimpleNamespace(log_every=1, tensorboard=False, progress=True)
CLOCK = r"\d+:\d\d:\d\d"


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _recording_console(monkeypatch, terminal: bool) -> Console:
    """The module's console replaced by an 80-column one that records, as on a terminal or as in a CI log."""
    rec = Console(width=80, record=True, force_terminal=terminal, file=io.StringIO(), soft_wrap=True)
    monkeypatch.setattr(metrics_mod, "console", rec)
    monkeypatch.setattr(sys, "stderr", _Stderr(terminal))  # what Metrics looks at to choose the bar
    return rec


def _values(show):
    return {key: 1234.5678 for key in show}


@pytest.mark.parametrize("stage", STAGES)
def test_bar_at_80_columns_keeps_step_total_and_eta_with_eval_metrics(stage, tmp_path, monkeypatch):
    rec = _recording_console(monkeypatch, terminal=True)
    show = STAGES[stage]
    m = Metrics(tmp_path / "metrics.jsonl", 1000, LOGGING, True, start_step=359)
    for step in (360, 361, 362):
        m.log(step, _values(show), show)  # eval metrics included, as at an eval step
    m.close()
    text = rec.export_text()
    final = text[text.rindex("train ") :].splitlines()  # the last refresh: the bar line, then the metrics
    assert all(len(line) <= 80 for line in final), final
    assert "362/1000" in final[0] and re.search(rf"\d:\d\d eta ({CLOCK}|-:--:--)$", final[0]), final[0]
    shown = "  ".join(final[1:])
    assert all(f"{key} 1235" in shown for key in show), final  # nothing cut: the metrics wrap between pairs


def test_bar_eta_is_a_time_once_steps_have_a_pace(tmp_path, monkeypatch):
    rec = _recording_console(monkeypatch, terminal=True)
    m = Metrics(tmp_path / "metrics.jsonl", 1000, LOGGING, True, start_step=0)
    for step in range(1, 6):
        m.log(step, _values(sft.SHOW), sft.SHOW)
    m.close()
    text = rec.export_text()
    assert re.search(rf"5/1000 \d:\d\d:\d\d eta {CLOCK}\n", text[text.rindex("train ") :])


@pytest.mark.parametrize("stage", STAGES)
def test_plain_lines_carry_eta_loss_lr_and_tokens_per_second(stage, tmp_path, monkeypatch):
    rec = _recording_console(monkeypatch, terminal=False)
    show = STAGES[stage]
    m = Metrics(tmp_path / "metrics.jsonl", 100, LOGGING, True, start_step=0)
    m.log(1, {**_values(show), "grad_norm": 0.5, "epoch": 0.1}, show)
    m.close()
    (line,) = rec.export_text().splitlines()
    assert re.match(rf"step 1/100  eta {CLOCK}  ", line), line
    pairs = dict(pair.split(" ", 1) for pair in line.split("  ")[2:])
    assert {"lr", "tok/s"} <= set(pairs) and any("loss" in key for key in pairs), line
    assert "grad_norm" not in pairs  # only the shown keys


def test_plain_line_eta_is_the_mean_pace_of_this_process(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: now[0])
    m = Metrics(tmp_path / "metrics.jsonl", 100, LOGGING, False, start_step=40)
    assert m.eta(40) == "-:--:--"
    now[0] = 130.0  # 10 steps in 30 s, 50 to go
    assert m.eta(50) == "0:02:30"
    assert m.eta(100) == "0:00:00"
    line = metrics_mod.plain_line(50, 100, "0:02:30", {"loss": 2.0, "lr": 3e-4}, ("loss", "lr", "tok/s"))
    assert line == "step 50/100  eta 0:02:30  loss 2  lr 0.0003"


def _write_rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_the_rows_of_replayed_steps(tmp_path, monkeypatch):
    """Steps 1-55 were logged, the checkpoint is step 40: rows up to 40 stay (the step-0 evaluation of PPO too), the
    rest and a line torn by a kill go; the resumed run's rows then follow, one per step."""
    rec = _recording_console(monkeypatch, terminal=False)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "eval_score": 1.5}) + "\n")
    with open(path, "a") as fh:
        fh.write(
            "".join(
                json.dumps({"step": s, "loss": 1.0, **({"eval_loss": 2.0} if s % 20 == 0 else {})}) + "\n"
                for s in range(1, 56)
            )
            + '{"step": 56, "lo'
        )
    m = Metrics(path, 100, LOGGING, True, start_step=40)
    assert _steps(path) == list(range(0, 41))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines() if "eval_loss" in line] == [20, 40]
    for step in range(41, 101):
        m.log(step, {"loss": 0.5}, sft.SHOW)
    m.log(100, {"eval_loss": 1.0}, sft.SHOW)  # the final evaluation shares the last step
    m.close()
    assert _steps(path) == [*range(0, 101), 100]
    assert "dropped 16 row(s)" in rec.export_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the temporary file was renamed over it


def test_start_from_step_0_drops_every_row_and_other_ranks_touch_nothing(tmp_path, monkeypatch):
    _recording_console(monkeypatch, terminal=False)
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, range(0, 8))  # PPO's step-0 evaluation is logged again from step 0
    Metrics(path, 100, LOGGING, False, start_step=0).close()  # rank 1
    assert _steps(path) == list(range(0, 8))
    Metrics(path, 100, LOGGING, True, start_step=0).close()
    assert path.read_text() == ""
    Metrics(tmp_path / "new.jsonl", 100, LOGGING, True, start_step=5).close()  # no file yet: nothing to drop
    assert (tmp_path / "new.jsonl").read_text() == ""


def test_wandb_offline_gets_every_row_the_config_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    """logging.wandb=true in W&B's offline mode: a run named <run>/<stage> with the stage's config.yaml, every numeric
    value of every row, files only under <stage>/wandb/; a second Metrics (a resume) continues the same run id."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    stage_dir = tmp_path / "myrun" / "sft"
    stage_dir.mkdir(parents=True)
    (stage_dir / "config.yaml").write_text("seed: 7\noptim:\n  lr: 0.001\n")
    cfg = SimpleNamespace(
        log_every=1,
        tensorboard=False,
        progress=False,
        wandb=True,
        wandb_project="rlhf-test",
        wandb_entity=None,
        wandb_mode="offline",
    )
    m = Metrics(stage_dir / "metrics.jsonl", 3, cfg, True)
    run = m._wandb
    assert run.name == "myrun/sft" and run.config["seed"] == 7 and run.config["optim"]["lr"] == 0.001
    logged = []
    monkeypatch.setattr(run, "log", lambda values, step: logged.append((step, values)))
    m.log(1, {"loss": 2.0, "note": "text is left out"})
    m.log(2, {"loss": 1.5, "eval_loss": 1.7})
    m.close()
    assert logged == [(1, {"loss": 2.0}), (2, {"loss": 1.5, "eval_loss": 1.7})]
    run_id = (stage_dir / "wandb" / "run_id").read_text().strip()
    assert run.id == run_id and any((stage_dir / "wandb").glob("wandb/offline-run-*"))
    assert sorted(p.name for p in stage_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "wandb"]
    resumed = Metrics(stage_dir / "metrics.jsonl", 3, cfg, True, start_step=2)
    assert resumed._wandb.id == run_id
    resumed.close()
    assert wandb.run is None
