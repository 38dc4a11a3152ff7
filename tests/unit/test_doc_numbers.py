"""The docs' measured numbers come from scripts: the learning benchmark's verdict and table (scripts/bench_chain.py)
go between markers docs/benchmarks.md must keep, the demo's table, examples and time (scripts/demo_numbers.py) between
markers the README must keep."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("bench_chain")
demo = load("demo_numbers")


def run(seed: int, sft: float, gains: dict[str, float]) -> dict:
    results = {"sft": {"gold_mean": sft, "kl": 0.0, "reward_mean": 1.0}}
    results.update({p: {"gold_mean": sft + g, "kl": 5.0, "reward_mean": 2.0} for p, g in gains.items()})
    curves = {
        s: [{"step": 0, "proxy": 1.0, "gold": sft}, {"step": 10, "proxy": 3.0, "gold": sft + 0.1}] for s in bench.ONLINE
    }
    return {
        "seed": seed,
        "threads": 2,
        "seconds": 60.0,
        "curves": curves,
        "rm_eval_accuracy": 0.9,
        "results": results,
        "rm_on_prompts": {"accuracy": 0.9, "accuracy_other": 0.8},
    }


def test_a_stage_fails_on_a_low_mean_or_on_any_seed_below_zero():
    runs = [run(1, 0.5, dict.fromkeys(bench.POLICIES, 0.2)), run(2, 0.6, dict.fromkeys(bench.POLICIES, 0.2))]
    runs[1]["results"]["ppo"]["gold_mean"] = 0.6 - 0.01  # mean +0.095 and one seed below zero
    runs[0]["results"]["grpo"]["gold_mean"] = 0.5 + 0.05  # mean +0.125, no seed below zero
    runs[1]["results"]["rloo"]["gold_mean"] = 0.6 - 0.05  # mean +0.075: above zero on seed 1, under the bar
    runs[0]["results"]["rloo"]["gold_mean"] = 0.5 + 0.2
    rows = {r["policy"]: r for r in bench.summary(runs, margin=0.1)}
    assert rows["dpo"]["ok"] and rows["grpo"]["ok"]
    assert not rows["ppo"]["ok"] and rows["ppo"]["min"] == pytest.approx(-0.01)
    assert not rows["rloo"]["ok"] and rows["rloo"]["mean"] == pytest.approx(0.075)
    assert rows["dpo"]["std"] == pytest.approx(0.0, abs=1e-12)


def test_the_learning_table_is_stamped_and_replaces_only_what_is_between_its_markers(tmp_path):
    runs = [run(1, 0.5, dict.fromkeys(bench.POLICIES, 0.2))]
    table = bench.markdown(bench.summary(runs, 0.1), runs, 0.1)
    assert re.search(r"Measured \d{4}-\d\d-\d\d at commit \w+", table) and "| ppo | +0.200 +- 0.000 |" in table
    assert "- ppo: 0: 1.00 / 0.500, 10: 3.00 / 0.600" in table
    page = tmp_path / "benchmarks.md"
    page.write_text(f"before\n{bench.BEGIN}\nold table\n{bench.END}\nafter\n")
    bench.update_doc(page, table)
    assert page.read_text() == f"before\n{bench.BEGIN}\n{table}{bench.END}\nafter\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        bench.update_doc(page, table)
    with pytest.raises(SystemExit, match="markers"):
        bench.check_markers(tmp_path / "missing.md")


def test_the_learning_table_goes_to_docs_benchmarks_and_a_page_without_markers_is_refused_first(monkeypatch):
    """`--doc` alone names docs/benchmarks.md; a page without the markers (the README, named through `--readme`, the
    option's former name) is refused before the benchmark runs its many minutes."""
    assert bench.DOC == ROOT / "docs" / "benchmarks.md"
    ran, wrote = [], []
    monkeypatch.setattr(bench, "run_chain", lambda seed, threads, root: ran.append(seed) or run(seed, 0.5, {}))
    monkeypatch.setattr(bench, "summary", lambda runs, margin: [])
    monkeypatch.setattr(bench, "update_doc", lambda doc, table: wrote.append(doc))
    monkeypatch.setattr("sys.argv", ["bench_chain.py", "--seeds", "1", "--readme", str(ROOT / "README.md")])
    with pytest.raises(SystemExit, match="no <!-- bench-learning:begin -->"):
        bench.main()
    assert ran == [] and wrote == []
    monkeypatch.setattr(bench, "print_seed", lambda r: None)
    monkeypatch.setattr("sys.argv", ["bench_chain.py", "--seeds", "1", "--doc"])
    with pytest.raises(SystemExit) as done:
        bench.main()
    assert done.value.code == 0 and ran == [1] and wrote == [bench.DOC]


def test_demo_parts_go_between_their_markers_and_the_minutes_inline(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "takes <!-- demo:minutes:begin -->9<!-- demo:minutes:end --> min\n"
        "<!-- demo:table:begin -->\nold\n<!-- demo:table:end -->\nrest\n"
    )
    demo.update(readme, {"minutes": "6", "table": "```\nnew\n```\n"})
    want = "<!-- demo:table:begin -->\n```\nnew\n```\n<!-- demo:table:end -->\nrest\n"
    assert readme.read_text() == "takes <!-- demo:minutes:begin -->6<!-- demo:minutes:end --> min\n" + want
    with pytest.raises(SystemExit, match="demo:score:begin"):
        demo.update(readme, {"score": "x\n"})


def test_the_pages_keep_every_marker_the_scripts_write_between():
    text = (ROOT / "README.md").read_text()
    for part in ("table", "score", "generate", "minutes"):
        assert text.count(f"<!-- demo:{part}:begin -->") == 1 == text.count(f"<!-- demo:{part}:end -->"), part
    assert bench.BEGIN not in text and bench.END not in text  # the learning table lives in docs/benchmarks.md
    for page in sorted((ROOT / "docs").glob("*.md")):  # a copy of a demo part on a page would go stale
        assert not re.search(r"<!-- demo:(table|score|generate|minutes):", page.read_text()), page.name
    page = bench.DOC.read_text()
    assert page.count(bench.BEGIN) == 1 == page.count(bench.END)
    stamp = re.search(re.escape(bench.BEGIN) + r"\nMeasured \d{4}-\d\d-\d\d at commit \w+", page)
    assert stamp, "the learning table keeps its stamp right after the begin marker"


def test_the_demo_time_is_the_chain_wall_time_the_manifest_recorded(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "stages": {
                    "sft": {"started_at": "2026-12-07T11:02:57+0000", "ended_at": "2026-12-07T11:03:44+0000"},
                    "eval": {"started_at": "2026-12-07T11:07:36+0000", "ended_at": "2026-12-07T11:07:57+0000"},
                }
            }
        )
    )
    assert demo.chain_minutes(manifest) == pytest.approx(5.0)
