"""The end-of-stage summary: recorded in the manifest when a stage completes, resume checkpoints dropped."""

import json
import math

import pytest

from rlhf_cli.run_dir import Run
from rlhf_cli.summary import complete_stage, first_and_last, human_bytes, summary_lines


def _stage(tmp_path, stage="ppo"):
    """A run whose `stage` has metrics (PPO: the step-0 evaluation, then iterations), final/ and two checkpoints."""
    run = Run(root=tmp_path / "demo", stage=stage)
    (run.final_dir).mkdir(parents=True)
    (run.final_dir / "model.safetensors").write_bytes(b"x" * 1000)
    for step in (2, 4):
        (run.checkpoints_dir / f"step-{step}").mkdir(parents=True)
        (run.checkpoints_dir / f"step-{step}" / "state.pt").write_bytes(b"y" * 3000)
    rows = [
        {"step": 0, "eval_score": 1.5},
        {"step": 1, "score_mean": 0.2, "kl": 0.0},
        {"step": 2, "score_mean": 0.6, "kl": 1.5},
        {"step": 2, "eval_score": 2.25},
    ]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "sco')  # a torn last line
    manifest = {
        "run": "demo",
        "stages": {stage: {"status": "running", "metrics": {"tokens": 500.0, "train_seconds": 2.0}}},
    }
    run.manifest_path.write_text(json.dumps(manifest))
    return run


def test_completed_stage_records_headline_speed_disk_and_drops_checkpoints(tmp_path):
    run = _stage(tmp_path)
    complete_stage(run, keep_checkpoints=False)
    record = run.stage_record()
    assert record["status"] == "completed" and record["ended_at"]
    assert not run.checkpoints_dir.exists()
    summary = record["summary"]
    # PPO's starting evaluation (step 0) is kept next to the last one.
    assert summary["headline"] == {"score_mean": [0.2, 0.6], "kl": [0.0, 1.5], "eval_score": [1.5, 2.25]}
    assert summary["tokens_per_second"] == 250.0 and summary["checkpoints_kept"] is False
    assert summary["disk_bytes"]["checkpoints"] == 6000 and summary["disk_bytes"]["stage"] < 6000
    rows = dict(summary_lines(record, "ppo", "run.name=demo"))
    assert rows["eval_score"] == "1.5 -> 2.25" and rows["tokens/s"] == "250"
    assert "checkpoints 6.0 KB removed" in rows["disk"] and rows["next"].startswith("rlhf generate run.name=demo")


def test_damaged_checkpoints_set_aside_for_inspection_stay(tmp_path):
    run = _stage(tmp_path)
    (run.checkpoints_dir / "damaged-step-3").mkdir()
    (run.checkpoints_dir / ".tmp-step-5").mkdir()
    complete_stage(run, keep_checkpoints=False)
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["damaged-step-3"]


def test_keep_checkpoints_keeps_them(tmp_path):
    run = _stage(tmp_path, stage="sft")
    complete_stage(run, keep_checkpoints=True)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2", "step-4"]
    rows = dict(summary_lines(run.stage_record(), "sft", "run.name=demo run.root=elsewhere"))
    assert (
        "6.0 KB kept" in rows["disk"]
        and rows["next"] == "rlhf rm run.name=demo run.root=elsewhere   (or: rlhf dpo run.name=demo run.root=elsewhere)"
    )


def test_other_ranks_write_nothing(tmp_path):
    run = _stage(tmp_path)
    run.is_main = False
    complete_stage(run, keep_checkpoints=False)
    assert run.checkpoints_dir.exists() and run.stage_record()["status"] == "running"


@pytest.mark.parametrize("n,text", [(512, "512 B"), (1500, "1.5 KB"), (2_500_000, "2.5 MB"), (3.2e9, "3.2 GB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_first_and_last_ignores_missing_files(tmp_path):
    assert first_and_last(tmp_path / "none.jsonl", ("loss",)) == {}


def test_first_and_last_reads_a_damaged_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"step": 1, "loss": 2.0}\n\xff\xfe not text\n{"step": 2, "loss": NaN, "kl": true}\n[1]\n'
        b'{"step": 3, "kl": 0.5, "loss": "low"}\n{"step": 4, "lo'
    )
    out = first_and_last(path, ("loss", "kl"))
    assert out["loss"][0] == 2.0 and math.isnan(out["loss"][1])  # a diverged loss shows as NaN
    assert out["kl"] == [0.5, 0.5]  # true is not a number
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError):  # there, but not readable: the caller names it
        first_and_last(path, ("loss",))


def test_summary_lines_of_a_hand_edited_record():
    record = {
        "summary": {
            "headline": {"loss": [1.0, 0.5], "kl": 3, "acc": [None, 0.9]},
            "stage_seconds": "soon",
            "tokens_per_second": float("nan"),
            "disk_bytes": {"stage": 2000, "run": "?"},
            "plot": ["x"],
        },
        "metrics": [1],
    }
    assert summary_lines(record, "sft", "run.name=demo")[:-1] == [
        ("loss", "1 -> 0.5"),
        ("kl", "3"),
        ("acc", "n/a -> 0.9"),
        ("disk", "stage 2.0 KB, run ?; resume checkpoints ? removed (stage.keep_checkpoints=true keeps them)"),
        ("curves", "['x']"),
    ]
    for record in (None, [], {"summary": "done", "metrics": None}, {"summary": {"headline": [1, 2], "disk_bytes": 5}}):
        assert summary_lines(record, "sft", "run.name=demo") == [
            ("next", "rlhf rm run.name=demo   (or: rlhf dpo run.name=demo)")
        ]
