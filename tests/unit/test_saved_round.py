"""Whether a rejection-sampling round's saved candidates and selection still hold (rlhf_cli/rollout/saved_round.py):
kept, selected again, or drawn again, and the line that says which and why."""

import json
import os
from types import SimpleNamespace

import pytest

from rlhf_cli.rollout import best_of_n as bon
from rlhf_cli.rollout import saved_round as saved

DRAWN = {
    "policy": "stage:sft (completed 2026-01-01T00:00:00+0000)",
    "seed": 42,
    "stage.n_samples": 2,
    "stage.generation_batch_size": 1,
    "stage.generation.temperature": 1.0,
    "prompts": "2 prompts, 0123456789ab",
}
RULE = {"stage.selection": "threshold", "stage.threshold": 2.0}


def _row(p, c, score):
    return {
        "round": 1,
        "prompt_index": p,
        "candidate": c,
        "prompt": f"q{p}",
        "response": f"r{p}{c}",
        "score": score,
        "raw_score": score,
        "ended_with_eos": True,
        "response_ids": [p, c],
    }


def _chunks(files, n_samples=2):
    """Two chunks of one prompt each, with their draw record: a round killed before it merged them."""
    saved.record_drawing(files, {**DRAWN, "stage.n_samples": n_samples})
    for c, p in enumerate((7, 3)):
        bon.write_chunk(files, c, [_row(p, k, float(k + p)) for k in range(n_samples)])


def _selected(tmp_path, rule=RULE):
    """Round 1 drawn with DRAWN, merged and selected under `rule`."""
    files = bon.RoundFiles.of(tmp_path, 1)
    _chunks(files)
    bon.merge_chunks(files, 2, 2)
    st = SimpleNamespace(
        selection=rule["stage.selection"], top_k=rule.get("stage.top_k", 1), threshold=rule.get("stage.threshold")
    )
    bon.select_round(files, 2, st, rule)
    return files


def test_differences_name_each_changed_key_with_both_values():
    assert saved.differences(DRAWN, dict(DRAWN)) == []
    assert saved.differences({"a": [1, 2]}, {"a": (1, 2)}) == []  # a tuple equals the list it is read back as
    changed = saved.differences(DRAWN, {**DRAWN, "stage.n_samples": 4, "seed": 1})
    assert changed == [("seed", 42, 1), ("stage.n_samples", 2, 4)]
    assert saved.describe(changed) == "seed (42 -> 1), stage.n_samples (2 -> 4) changed"
    assert saved.describe([("stage.threshold", 2.0, 0.5)]) == "stage.threshold changed (2.0 -> 0.5)"
    # A key on one side only (a record of another version) is a change; ignored keys are not compared.
    assert saved.differences({"a": 1}, {"b": 1}) == [("b", None, 1), ("a", 1, None)]
    assert saved.describe([("b", None, 1)]) == "b changed (unset -> 1)"
    assert saved.differences({"a": 1, "b": 1}, {"a": 1, "b": 2}, ignore=("b",)) == []
    many = [(f"k{i}", i, i + 1) for i in range(5)]
    assert saved.describe(many) == "k0 (0 -> 1), k1 (1 -> 2), k2 (2 -> 3), 2 more changed"


def test_selection_rule_holds_only_the_keys_the_selection_reads():
    st = SimpleNamespace(selection="best", top_k=3, threshold=None)
    assert saved.selection_rule(st) == {"stage.selection": "best"}
    assert saved.selection_rule(SimpleNamespace(selection="top_k", top_k=3, threshold=1.0)) == {
        "stage.selection": "top_k",
        "stage.top_k": 3,
    }
    assert saved.selection_rule(SimpleNamespace(selection="threshold", top_k=3, threshold=0.5)) == {
        "stage.selection": "threshold",
        "stage.threshold": 0.5,
    }


def test_nothing_saved_records_the_draw_and_keeps_nothing(tmp_path):
    files = bon.RoundFiles.of(tmp_path, 1)
    out = saved.reconcile(files, 1, DRAWN, RULE, 4)
    assert out == saved.Outcome(drawn=False, selected=False, redone=False, line=None)
    assert json.loads(files.drawn.read_text()) == {"with": DRAWN}


def test_the_same_settings_reuse_candidates_and_selection(tmp_path):
    files = _selected(tmp_path)
    before = {p.name: p.read_bytes() for p in files.dir.iterdir()}
    out = saved.reconcile(files, 1, dict(DRAWN), dict(RULE), 4)
    assert (out.drawn, out.selected, out.redone) == (True, True, False)
    assert out.line == "round 1: reusing the saved 4 candidates and selection, made with these settings"
    assert {p.name: p.read_bytes() for p in files.dir.iterdir()} == before


def test_another_rule_selects_again_from_the_saved_candidates(tmp_path):
    files = _selected(tmp_path)
    candidates = files.candidates.read_bytes()
    out = saved.reconcile(files, 1, DRAWN, {**RULE, "stage.threshold": 0.5}, 4)
    assert (out.drawn, out.selected, out.redone) == (True, False, True)
    assert out.line == "round 1: stage.threshold changed (2.0 -> 0.5): selecting again from the saved 4 candidates"
    assert not files.selection.exists() and not files.selected.exists()
    assert files.candidates.read_bytes() == candidates and files.drawn.is_file()
    best = saved.reconcile(files, 1, DRAWN, {"stage.selection": "best"}, 4)  # no selection saved now: nothing to redo
    assert (best.drawn, best.selected, best.redone, best.line) == (True, False, False, None)


def test_another_rule_with_only_the_selection_saved_draws_again(tmp_path):
    files = _selected(tmp_path)
    files.candidates.unlink()  # stage.save_candidates=false of a round that an older rlhf completed the selection of
    out = saved.reconcile(files, 1, DRAWN, {**RULE, "stage.threshold": 0.5}, 4)
    assert (out.drawn, out.redone) == (False, True)
    assert out.line == (
        "round 1: stage.threshold changed (2.0 -> 0.5) and the candidates to select from are gone "
        "(candidates.jsonl): drawing the candidates again (selection discarded)"
    )


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"stage.n_samples": 3}, "stage.n_samples changed (2 -> 3)"),
        (
            {"policy": "round 1's policy (completed x)"},
            "policy changed (stage:sft (completed 2026-01-01T00:00:00+0000) -> round 1's policy (completed x))",
        ),
        (
            {"prompts": "3 prompts, ba9876543210"},
            "prompts changed (2 prompts, 0123456789ab -> 3 prompts, ba9876543210)",
        ),
        ({"stage.generation.temperature": 0.7}, "stage.generation.temperature changed (1.0 -> 0.7)"),
    ],
)
def test_another_draw_discards_candidates_and_selection(tmp_path, change, reason):
    files = _selected(tmp_path)
    now = {**DRAWN, **change}
    out = saved.reconcile(files, 1, now, RULE, 6)
    assert (out.drawn, out.selected, out.redone) == (False, False, True)
    assert out.line == f"round 1: {reason}: drawing the candidates again (4 candidates discarded)"
    assert sorted(p.name for p in files.dir.iterdir()) == ["drawn.json"]
    assert json.loads(files.drawn.read_text()) == {"with": now}


def test_chunks_of_another_n_are_discarded_not_regrouped(tmp_path):
    files = bon.RoundFiles.of(tmp_path, 1)
    _chunks(files, n_samples=3)
    out = saved.reconcile(files, 1, DRAWN, RULE, 4)
    assert out.line == (
        "round 1: stage.n_samples changed (3 -> 2): drawing the candidates again (2 drawn chunk(s) discarded)"
    )
    assert bon.finished_chunks(files) == set() and out.redone and not out.drawn


def test_chunks_of_the_same_draw_are_kept_to_draw_the_rest(tmp_path):
    files = bon.RoundFiles.of(tmp_path, 1)
    _chunks(files)
    out = saved.reconcile(files, 1, dict(DRAWN), RULE, 4)
    assert out == saved.Outcome(drawn=True, selected=False, redone=False, line=None)
    assert bon.finished_chunks(files) == {0, 1}


def test_the_chunk_layout_matters_only_before_the_chunks_are_merged(tmp_path):
    layout = {**DRAWN, "stage.generation_batch_size": 2}
    files = bon.RoundFiles.of(tmp_path / "a", 1)
    _chunks(files)  # chunk c holds prompt c under generation_batch_size 1: under 2 it would hold two others
    out = saved.reconcile(files, 1, layout, RULE, 4)
    assert out.line.startswith("round 1: stage.generation_batch_size changed (1 -> 2): drawing the candidates again")
    merged = _selected(tmp_path / "b")  # merged candidates are grouped by prompt: any layout finishes them
    assert saved.reconcile(merged, 1, layout, RULE, 4).selected


def test_candidates_without_a_record_or_cut_short_are_drawn_again(tmp_path):
    files = _selected(tmp_path / "old")
    files.drawn.unlink()  # written before draw records existed
    out = saved.reconcile(files, 1, DRAWN, RULE, 4)
    assert out.line == (
        "round 1: the saved candidates do not record what they were drawn with (an older rlhf wrote "
        "them): drawing the candidates again (4 candidates discarded)"
    )
    files = _selected(tmp_path / "short")
    lines = files.candidates.read_text().splitlines()
    files.candidates.write_text("\n".join(lines[:3]) + "\n")
    out = saved.reconcile(files, 1, DRAWN, RULE, 4)
    assert out.redone and f"{files.candidates} holds 3 candidates, not the round's 4" in out.line


def test_chunks_left_beside_merged_candidates_are_removed(tmp_path):
    files = _selected(tmp_path)
    bon.write_chunk(files, 0, [_row(7, 0, 1.0)])  # killed after candidates.jsonl was written, before the clean-up
    assert saved.reconcile(files, 1, DRAWN, RULE, 4).selected
    assert bon.finished_chunks(files) == set()


def test_throughput_is_kept_beside_the_record(tmp_path):
    files = bon.RoundFiles.of(tmp_path, 1)
    saved.record_drawing(files, DRAWN)
    saved.record_throughput(files, {"responses/s": 3.0})
    assert saved.saved_throughput(files) == {"responses/s": 3.0}
    assert saved.differences(json.loads(files.drawn.read_text())["with"], DRAWN) == []


def test_source_identity_changes_when_the_policy_does(tmp_path):
    run = SimpleNamespace(stage_record=lambda name: {"ended_at": f"{name}-end"})
    assert saved.source_identity(run, "stage:sft") == "stage:sft (completed sft-end)"
    assert saved.source_identity(run, "org/model") == "org/model"
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"12345")
    first = saved.source_identity(run, str(folder))
    assert first.startswith(f"{folder} (files ") and saved.source_identity(run, str(folder)) == first
    os.utime(folder / "model.safetensors", ns=(1, 1))  # the weights written again
    assert saved.source_identity(run, str(folder)) != first


def test_prompts_digest_follows_the_prompts_and_their_order():
    prompts = [SimpleNamespace(input_ids=[1, 2]), SimpleNamespace(input_ids=[3]), SimpleNamespace(input_ids=[4])]
    a = saved.prompts_digest([0, 1], prompts)
    assert a.startswith("2 prompts, ") and a == saved.prompts_digest([0, 1], prompts)
    assert a != saved.prompts_digest([1, 0], prompts) and a != saved.prompts_digest([0, 2], prompts)
