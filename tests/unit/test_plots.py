"""Training-curve PNGs (rlhf_cli/plots.py) from small hand-written metrics.jsonl files, one per stage kind, and the
end-of-stage hook (summary.complete_stage). No training."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cli import plots
from rlhf_cli.errors import UserError
from rlhf_cli.plots import PANELS, against, draw, load_rows, plot_stage, read_rows, series
from rlhf_cli.run_dir import Run
from rlhf_cli.summary import complete_stage, summary_lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _online(
    n: int = 6, gold: bool = True, critic: bool = True, kl: bool = True, kl_coef: float | None = None
) -> list[dict]:
    """An online stage's log: the starting evaluation at step 0, iterations 1..n, evaluations at 3 and n. Every
    metric changes (a panel of one value is left out), the KL coefficient too unless `kl_coef` fixes it."""
    rows = []
    for step in range(1, n + 1):
        row = {
            "step": step,
            "score_mean": 0.1 * step,
            "response_length": 7.0 + step % 2,
            "policy_loss": -0.01 * step,
            "entropy": 0.6 - 0.01 * step,
        }
        row.update({"kl": 0.5 * (step - 1)} if kl else {})
        row.update(
            {"kl_coef": kl_coef or 0.05 + 0.01 * step, "value_loss": 0.2 / step, "explained_variance": 0.1 * step}
            if critic
            else {}
        )
        row.update({} if critic else {"zero_variance_groups": 0.25 / step})
        rows.append(row)
    for step in (0, 3, n):
        rows.append(
            {
                "step": step,
                "eval_score": 0.2 * step,
                "eval_response_length": 6.0 + step,
                **({"eval_gold": 0.5 + 0.01 * step} if gold else {}),
            }
        )
    return sorted(rows, key=lambda r: r["step"])


# Stage -> (its rows, the panels it must get). Evaluations sit on fewer steps than training rows, in rows of their own.
CASES = {
    "sft": (
        [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * s} for s in range(1, 7)]
        + [
            {"step": 3, "eval_loss": 2.9, "eval_perplexity": 18.2},
            {"step": 6, "eval_loss": 2.7, "eval_perplexity": 14.9},
        ],
        ["loss", "eval perplexity", "learning rate"],
    ),
    "rm": (
        [
            {
                "step": s,
                "loss": 0.7 - 0.05 * s,
                "accuracy": 0.5 + 0.05 * s,
                "margin": 0.1 * s,
                "reward_chosen": 0.2 * s,
                "reward_rejected": 0.1,
            }
            for s in range(1, 5)
        ]
        + [{"step": 4, "eval_loss": 0.6, "eval_accuracy": 0.7, "eval_margin": 0.3, "reward_mean": 0.1}],
        ["loss", "accuracy", "margin", "rewards"],
    ),
    "dpo": (
        [
            {
                "step": s,
                "loss": 0.69 - 0.02 * s,
                "reward_margin": 0.1 * s,
                "reward_accuracy": 0.5 + 0.1 * s,
                "reward_chosen": 0.1 * s,
                "reward_rejected": -0.1,
                "logps_chosen": -80.0,
                "logps_rejected": -90.0 - s,
            }
            for s in range(1, 5)
        ]
        + [
            {
                "step": 4,
                "eval_loss": 0.65,
                "eval_reward_margin": 0.2,
                "eval_reward_accuracy": 0.62,
                "eval_logps_chosen": -81.0,
                "eval_logps_rejected": -95.0,
            }
        ],
        ["loss", "reward margin", "reward accuracy", "implicit rewards", "log-probs"],
    ),
    "ppo": (
        _online(),
        [
            "reward (score) and gold",
            "KL to the reference",
            "KL coefficient",
            "proxy and gold reward vs KL",
            "losses",
            "explained variance",
            "response length",
        ],
    ),
    "rejection_sampling": (
        [
            {"step": 0, "round": 0, "eval_score": 0.5, "eval_gold": 0.5, "eval_response_length": 7.0},
            {"step": 0, "round": 1, "candidate_score_mean": 0.4, "selected_score_mean": 0.8},
        ]
        + [{"step": s, "round": 1, "loss": 1.0 / s} for s in range(1, 6)]
        + [
            {"step": 5, "round": 1, "eval_score": 0.6, "eval_gold": 0.6, "eval_response_length": 6.0},
            {"step": 5, "round": 2, "candidate_score_mean": 0.5, "selected_score_mean": 0.9},
        ],
        ["best-of-N selection", "held-out score and gold", "fine-tuning loss", "held-out response length"],
    ),
    "grpo": (
        _online(critic=False, kl=False),
        ["reward (score) and gold", "groups with zero reward variance", "policy loss", "entropy", "response length"],
    ),
    "rloo": (
        _online(critic=False),
        [
            "reward (score) and gold",
            "KL to the reference",
            "proxy and gold reward vs KL",
            "groups with zero reward variance",
            "policy loss",
            "entropy",
            "response length",
        ],
    ),
    "reinforce_pp": (
        _online(critic=False, gold=False),
        [
            "reward (score) and gold",
            "KL to the reference",
            "proxy and gold reward vs KL",
            "groups with zero reward variance",
            "policy loss",
            "entropy",
            "response length",
        ],
    ),
}


def _write(folder: Path, rows: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


def _assert_png(path: Path) -> tuple[int, int]:
    """The file is a PNG (signature, IHDR first); its (width, height)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    return width, height


def _labels(fig) -> dict[str, list[str]]:
    """Panel title -> the labels in its legend (which names the lines of a twin y axis too)."""
    return {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_title()}


def test_every_stage_with_curves_has_a_case_here():
    assert set(CASES) == set(PANELS)


@pytest.mark.parametrize("stage", list(CASES))
def test_each_stage_kind_gets_a_png_with_its_panels(tmp_path, stage):
    rows, titles = CASES[stage]
    folder = _write(tmp_path / "demo" / stage, rows, tail='{"step": 9, "lo')  # a crash's torn last line
    path, drawn, skipped, lines = plot_stage(folder)
    assert path == folder / "metrics.png" and drawn == titles
    assert (skipped, lines) == (1, len(rows) + 1)  # the torn line, counted
    _assert_png(path)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "metrics.png"]  # no temporary file left


def test_a_missing_eval_key_leaves_its_line_and_panel_out(tmp_path):
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * s} for s in range(1, 5)]  # eval_every=0: no eval rows
    fig = draw("sft", rows, "demo / sft")
    assert _labels(fig) == {"loss": ["loss"], "learning rate": ["lr"]}
    fig = draw("sft", CASES["sft"][0], "demo / sft")
    assert _labels(fig)["loss"] == ["loss", "eval_loss"]
    ppo = draw("ppo", _online(gold=False), "demo / ppo")  # no gold metric: the proxy reward alone
    assert _labels(ppo)["reward (score) and gold"] == ["score_mean", "eval_score"]
    assert _labels(ppo)["proxy and gold reward vs KL"] == ["eval_score"]


def _panel_axes(fig, title: str):
    """(the panel's axes, its twin y axis or None): a twin has no title and shares the panel's x axis."""
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    twins = [a for a in fig.axes if a is not ax and not a.get_title() and a.get_shared_x_axes().joined(a, ax)]
    return ax, (twins[0] if twins else None)


@pytest.mark.parametrize(
    ("stage", "title"),
    [
        ("ppo", "reward (score) and gold"),
        ("ppo", "proxy and gold reward vs KL"),
        ("rejection_sampling", "held-out score and gold"),
    ],
)
def test_the_gold_metric_has_a_y_axis_of_its_own(stage, title):
    """A gold accuracy (0-1) next to a reward model's score (0-10): on one axis the gold line looks flat."""
    rows = (
        CASES[stage][0]
        if stage != "ppo"
        else [{**r, **({"eval_score": 8.0 * r["step"]} if "eval_score" in r else {})} for r in _online()]
    )
    fig = draw(stage, rows, f"demo / {stage}")
    ax, twin = _panel_axes(fig, title)
    assert twin is not None and [line.get_label() for line in twin.get_lines()] == ["eval_gold (right axis)"]
    assert "eval_gold" not in [line.get_label() for line in ax.get_lines()]
    assert "eval_gold (right axis)" in _labels(fig)[title]  # one legend names the lines of both axes
    assert twin.get_ylabel() == "gold" and ax.get_ylabel() == "reward score"
    gold = [r["eval_gold"] for r in rows if "eval_gold" in r]
    assert twin.get_ylim()[1] - twin.get_ylim()[0] < 2 * (max(gold) - min(gold))  # scaled to the gold's own range
    colours = [line.get_color() for line in ax.get_lines() + twin.get_lines()]
    assert len(set(colours)) == len(colours)  # the twin does not restart the colour cycle
    no_gold = draw(stage, [{k: v for k, v in r.items() if k != "eval_gold"} for r in rows], "demo")
    assert _panel_axes(no_gold, title)[1] is None  # nothing on the right: no second axis


def test_a_panel_of_one_value_is_left_out_and_its_value_named():
    """A fixed KL coefficient is a flat line, one rejection-sampling round one point per series: no panel, the value
    under the title instead."""
    fig = draw("ppo", _online(kl_coef=0.05), "demo / ppo")
    assert "KL coefficient" not in _labels(fig) and "KL to the reference" in _labels(fig)
    assert any("kl_coef 0.05" in text.get_text() for text in fig.texts)
    one_round = [r for r in CASES["rejection_sampling"][0] if r.get("round") != 2]
    fig = draw("rejection_sampling", one_round, "demo / rejection_sampling")
    assert list(_labels(fig)) == ["held-out score and gold", "fine-tuning loss", "held-out response length"]
    assert any("candidate_score_mean 0.4, selected_score_mean 0.8" in text.get_text() for text in fig.texts)
    assert not any("one value" in text.get_text() for text in draw("ppo", _online(), "demo").texts)
    # When nothing changes (a run of one step) the panels are drawn all the same: a picture, not an error.
    assert list(_labels(draw("sft", [{"step": 1, "loss": 2.0, "lr": 1e-3}], "demo"))) == ["loss", "learning rate"]


def test_each_series_is_drawn_against_its_own_steps():
    fig = draw("sft", CASES["sft"][0], "demo / sft")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["loss"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(lines["eval_loss"].get_xdata()) == [3, 6] and list(lines["eval_loss"].get_ydata()) == [2.9, 2.7]


def test_rewards_against_kl_take_the_kl_of_the_next_rollout():
    rows = [
        {"step": 1, "kl": 0.0},
        {"step": 2, "kl": 1.0},
        {"step": 3, "kl": 2.5},
        {"step": 0, "eval_gold": 0.5},
        {"step": 2, "eval_gold": 0.6},
        {"step": 3, "eval_gold": 0.7},
    ]
    # Step 0 (the start) -> step 1's rollout; step 2 -> step 3's; the last evaluation -> the last KL there is.
    assert against(rows, "eval_gold", "kl") == ([0.0, 2.5, 2.5], [0.5, 0.6, 0.7])
    assert against(rows, "eval_gold", "missing") == ([], [])


def test_a_resumed_log_plots_one_point_per_step(tmp_path):
    # Today a resume drops the replayed rows first: one row per step, the resumed ones after the kept ones.
    today = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + [{"step": s, "loss": 2.0 / s} for s in range(5, 9)]
    assert series(today, "loss") == ([1, 2, 3, 4, 5, 6, 7, 8], [r["loss"] for r in today])
    # An older log holds the replay after the original rows (steps 5-6 twice): the replay's values are kept.
    older = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": s, "loss": 9.0} for s in range(5, 9)]
    folder = _write(tmp_path / "demo" / "sft", older)
    rows = read_rows(folder / "metrics.jsonl")
    assert series(rows, "loss") == ([1, 2, 3, 4, 5, 6, 7, 8], [1.0, 0.5, 1 / 3, 0.25, 9.0, 9.0, 9.0, 9.0])
    path, titles = plot_stage(folder)[:2]
    _assert_png(path)
    assert titles == ["loss"]


def test_bad_input_is_one_clear_message(tmp_path):
    with pytest.raises(UserError, match="no plot is defined for stage `eval`"):
        plot_stage(_write(tmp_path / "demo" / "eval", [{"step": 0}]))
    with pytest.raises(UserError, match="does not exist"):
        plot_stage(tmp_path / "demo" / "rm")
    with pytest.raises(UserError, match="nothing to plot for dpo: its metrics.jsonl has none of"):
        plot_stage(_write(tmp_path / "demo" / "dpo", [{"step": 1, "time": 1.0}]))


def test_values_no_axis_can_scale_to_are_gaps(tmp_path):
    rows = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": float("inf")},
        {"step": 3, "loss": 10**400},
        {"step": 4, "loss": float("nan")},
        {"step": 5, "loss": 1.7e308},
        {"step": 6, "loss": -1.7e308},
        {"step": 7, "loss": 0.5},
        {"step": 8, "loss": True},
    ]
    steps, values = series(rows, "loss")
    assert steps == [1, 2, 3, 4, 5, 6, 7] and values[0] == 1.0 and values[6] == 0.5
    assert all(math.isnan(v) for v in values[1:6])
    folder = _write(tmp_path / "demo" / "sft", rows)
    assert plot_stage(folder).titles == ["loss"]
    with pytest.raises(UserError, match=r"nothing to plot for sft: .* \(1 of its 2 lines are not rows\)"):
        plot_stage(_write(folder, [{"step": 1, "loss": float("nan")}], tail="[1]\n"))


def test_only_objects_with_an_integer_step_are_rows(tmp_path):
    folder = _write(
        tmp_path / "demo" / "sft",
        [{"step": 1, "loss": 1.0}, {"step": "2"}, {"step": 2.0}, {"step": True}, {"step": 2**60}, {"loss": 1.0}, [1]],
        tail="\n\n\xff\n",
    )
    rows, skipped = load_rows(folder / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 1.0}] and skipped == 7  # blank lines are not counted


def test_a_stage_that_cannot_be_read_or_written_is_one_clear_message(tmp_path):
    folder = _write(tmp_path / "demo" / "sft", CASES["sft"][0])
    (folder / "metrics.png").mkdir()
    with pytest.raises(UserError, match="cannot write .*/demo/sft/metrics.png: Is a directory"):
        plot_stage(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "metrics.png"]  # no temporary file left
    (folder / "metrics.jsonl").unlink()
    (folder / "metrics.jsonl").symlink_to("metrics.jsonl")
    with pytest.raises(UserError, match="cannot read .*/metrics.jsonl: Too many levels of symbolic links"):
        plot_stage(folder)


# ---------------------------------------------------------------- the end-of-stage hook


def _running_stage(tmp_path: Path, stage: str, rows: list[dict]) -> Run:
    run = Run(root=tmp_path / "demo", stage=stage)
    _write(run.stage_dir, rows)
    run.manifest_path.write_text(json.dumps({"run": "demo", "stages": {stage: {"status": "running"}}}))
    return run


def test_a_completed_stage_holds_its_png_and_its_summary_names_it(tmp_path):
    run = _running_stage(tmp_path, "dpo", CASES["dpo"][0])
    complete_stage(run, keep_checkpoints=False)
    record = run.stage_record()
    assert record["status"] == "completed" and record["summary"]["plot"] == str(run.stage_dir / "metrics.png")
    _assert_png(run.stage_dir / "metrics.png")
    assert dict(summary_lines(record, "dpo", "run.name=demo"))["curves"] == str(run.stage_dir / "metrics.png")


@pytest.mark.parametrize("failure", ["no keys", "matplotlib"])
def test_a_failed_plot_is_one_warning_and_the_stage_stays_completed(tmp_path, capsys, monkeypatch, failure):
    rows = CASES["sft"][0]
    if failure == "no keys":
        rows = [{"step": 1, "time": 1.0}]
    else:

        def broken(*_):
            raise RuntimeError("no font")

        monkeypatch.setattr(plots, "draw", broken)
    run = _running_stage(tmp_path, "sft", rows)
    complete_stage(run, keep_checkpoints=False)
    record = run.stage_record()
    assert record["status"] == "completed" and "plot" not in record["summary"]
    assert not (run.stage_dir / "metrics.png").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: no plot of the sft curves (")
    assert ("RuntimeError: no font" if failure == "matplotlib" else "nothing to plot for sft") in err
    assert "rlhf plot run.name=demo" in err and "stage=sft" in err


def test_a_stage_without_curves_is_left_alone(tmp_path, capsys):
    run = _running_stage(tmp_path, "eval", [{"step": 0}])
    complete_stage(run, keep_checkpoints=True)
    assert run.stage_record()["status"] == "completed" and not (run.stage_dir / "metrics.png").exists()
    assert capsys.readouterr().err == ""


def test_the_cli_starts_without_matplotlib(tmp_path):
    """`rlhf --help`, `rlhf runs` and a plot's --help never import it: only drawing does."""
    probe = (
        "import sys; from rlhf_cli.cli import main; "
        f"[main(a) for a in (['--help'], ['runs', 'root={tmp_path}'], ['plot', '--help'])]; "
        "print('LOADED', 'matplotlib' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("LOADED False"), res.stderr
