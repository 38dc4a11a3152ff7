"""`rlhf rejection_sampling` end to end on the tiny model: two rounds after sft and rm (files, selection, metrics,
clean-up), SIGKILL during round 2's sampling and during its fine-tuning then resume == uninterrupted (round 1 not
redone), 2 ranks under ZeRO-2 == 1 rank over two rounds, clear errors. The kill/resume and the 2-rank tests compare
against one uninterrupted 1-rank run of the same config (the module fixture `uninterrupted`)."""

import json
import signal
import time

import pytest
from conftest import FAST, copy_run, launch_ranks, manifest, metrics, ranks, rlhf, sft_rm_base, weights

from rlhf_cli.files import complete_checkpoints
from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

# Small rounds: 16 prompts x 4 samples in chunks of 4 prompts, 8-token answers, fine-tuned in batches of 8.
RS = [
    "stage.n_samples=4",
    "stage.prompts_per_round=16",
    "stage.generation_batch_size=4",
    "stage.generation.max_new_tokens=8",
    "stage.eval_batch_size=8",
    "data.eval_fraction=0.04",
    "optim.lr=1e-3",
    "stage.save_every=0",
]
PARITY = [
    "data=parity",
    "data.eval_fraction=0.02",
    "stage.reward.model=null",
    "stage.reward.function=rlhf_cli.tasks.parity:gold_reward",
    "stage.gold_reward=rlhf_cli.tasks.parity:gold_reward",
]
# The config of the kill/resume and the 2-rank tests, and of the uninterrupted run both compare against: two rounds of
# 33 parity prompts in chunks of 2 (17 chunks, the last of one prompt: 9 and 8 on 2 ranks), 6 steps a round.
SHARED = [
    *FAST,
    *RS,
    *PARITY,
    "stage.rounds=2",
    "stage.prompts_per_round=33",
    "stage.generation_batch_size=2",
    "stage.max_steps=6",
]
ROUND_KEYS = (
    "candidates",
    "candidate_score_mean",
    "selected",
    "selected_score_mean",
    "selected_score_std",
    "best_of_n_gain",
    "valid_prompt_fraction",
    "duplicate_fraction",
    "responses/s",
    "gen_tok/s",
    "generation_seconds",
    "scoring_seconds",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run with short `sft` and `rm` stages, copied by each test that needs them."""
    return sft_rm_base(tmp_path_factory.mktemp("rs_base"))


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    """One uninterrupted 1-rank run of SHARED (no resume checkpoints), the reference of the kill/resume test and of
    the 2-rank test."""
    root = tmp_path_factory.mktemp("rs_uninterrupted")
    res = rlhf("rejection_sampling", *SHARED, *_copy(base, root / "runs", "full"), cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "runs" / "full"


def _copy(base, runs, name):
    return copy_run(base, runs, name, "rejection_sampling")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_best_of_n(round_dir, n_samples):
    """selected.jsonl holds, per prompt, the first-drawn highest-scoring candidate that is not a copy."""
    cands, chosen = _rows(round_dir / "candidates.jsonl"), _rows(round_dir / "selected.jsonl")
    by_prompt = {}
    for row in cands:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    assert all(len(group) == n_samples for group in by_prompt.values())
    expected = []
    for group in by_prompt.values():
        valid = [r for r in group if r["score"] is not None and not r["duplicate"]]
        if valid:
            expected.append(max(valid, key=lambda r: (r["score"], -r["candidate"])))
    key = lambda r: (r["prompt_index"], r["candidate"])  # noqa: E731
    assert sorted(map(key, chosen)) == sorted(map(key, expected))
    return cands, chosen


def test_two_rounds_after_sft_and_rm(base, runs, tmp_path):
    """Two rounds with the reward model; round 2 restarts from sft (init=sft) on both rounds' selections."""
    res = rlhf(
        "rejection_sampling",
        *FAST,
        *RS,
        *_copy(base, runs, "chain"),
        "stage.rounds=2",
        "stage.max_steps=3",
        "stage.init=sft",
        "stage.keep_previous=true",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert f"round 2: fine-tuning on 32 selected samples from {runs / 'chain' / 'sft' / 'final'}" in res.stderr
    assert "rollout engine: hf (rollout.engine=hf)" in res.stderr  # the opening lines say which engine draws
    rec = manifest(runs / "chain")["stages"]["rejection_sampling"]
    assert rec["status"] == "completed" and rec["outputs"]["final"] == "rejection_sampling/final"
    assert rec["inputs"]["reward"].startswith("model ") and rec["inputs"]["policy"].endswith("chain/sft/final")
    assert rec["metrics"]["rounds"] == 2 and rec["metrics"]["steps"] == 6
    stage = runs / "chain" / "rejection_sampling"
    for r in (1, 2):
        cands, chosen = _check_best_of_n(stage / f"round-{r}", 4)
        assert len(cands) == 64 and {c["round"] for c in cands} == {r}
        assert all(c["response_ids"] and c["response"] is not None for c in chosen)
        assert json.loads((stage / f"round-{r}" / "round.json").read_text())["steps"] == 3
        assert not (stage / f"round-{r}" / "chunks").exists()
    assert not (stage / "checkpoints").exists()  # round checkpoints and round-1's policy went at completion
    assert (stage / "final" / "model.safetensors").is_file()
    log = metrics(runs / "chain", "rejection_sampling")
    assert log[0]["step"] == 0 and log[0]["round"] == 0 and "eval_score" in log[0]  # the SFT policy, before
    rounds = [r for r in log if "selected_score_mean" in r]
    assert [(r["round"], r["step"]) for r in rounds] == [(1, 0), (2, 3)]
    for row in rounds:
        assert all(key in row for key in ROUND_KEYS), set(ROUND_KEYS) - set(row)
        assert row["candidates"] == 64 and row["selected_score_mean"] >= row["candidate_score_mean"]
        assert row["best_of_n_gain"] >= 0
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    evals = [r for r in log if "eval_score" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert rec["summary"]["headline"]["eval_score"] == [evals[0]["eval_score"], evals[-1]["eval_score"]]
    assert "rejection_sampling completed" in res.stderr and "next:" in res.stderr


def _wait(predicate, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited before {what}: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_killed_in_round_2_sampling_and_fine_tuning_resumes_to_the_same_weights(base, uninterrupted, runs, tmp_path):
    """SIGKILL while round 2 draws its chunks, then again during round 2's fine-tuning: each re-run continues where
    the last stopped (finished chunks kept, checkpoint resumed), round 1 is never redone, and the result equals an
    uninterrupted run's (which saved no checkpoint at all)."""
    args = ["rejection_sampling", *SHARED, "stage.save_every=1", "stage.keep_last=1", *_copy(base, runs, "parts")]
    stage = runs / "parts" / "rejection_sampling"
    round1, round2 = stage / "round-1", stage / "round-2"

    (proc,) = launch_ranks(args, 1, tmp_path)
    _wait(lambda: len(list((round2 / "chunks").glob("chunk-*.jsonl"))) >= 2, proc, "round 2's first chunks")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (round2 / "selection.json").exists(), "the kill came after round 2's sampling"
    kept = len(list((round2 / "chunks").glob("chunk-*.jsonl")))
    round1_files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in round1.iterdir()}

    (proc,) = launch_ranks(args, 1, tmp_path)
    _wait(lambda: complete_checkpoints(stage / "checkpoints" / "round-2"), proc, "round 2's first checkpoint")
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert not (round2 / "round.json").exists(), "the kill came after round 2's fine-tuning"
    assert f"round 2: {kept} of 17 chunk(s) already drawn" in out

    last = rlhf(*args, cwd=tmp_path)
    assert last.returncode == 0, last.stderr
    assert "resuming rejection_sampling from" in last.stderr and "round-2/step-" in last.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in round1.iterdir()} == round1_files
    a, b = uninterrupted / "rejection_sampling", stage
    for r in (1, 2):
        assert _rows(a / f"round-{r}" / "selected.jsonl") == _rows(b / f"round-{r}" / "selected.jsonl")
    assert [r["step"] for r in metrics(runs / "parts", "rejection_sampling") if "loss" in r] == list(range(1, 13))
    wa, wb = weights(a / "final"), weights(b / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_two_ranks_zero2_select_and_train_as_one_rank(base, uninterrupted, runs, tmp_path):
    """Chunks are seeded by (seed, round, chunk), not by rank: 2 ranks draw, select and (with the same global
    batch) train exactly what 1 rank does, in both rounds (round 2 samples from the policy the ranks trained)."""
    args = [
        "rejection_sampling",
        *SHARED,
        *_copy(base, runs, "two"),
        "deepspeed=zero2",
        "stage.gradient_accumulation_steps=1",
    ]
    two = ranks(args, cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = uninterrupted / "rejection_sampling", runs / "two" / "rejection_sampling"
    drop = ("duplicate",)
    for r in (1, 2):
        ra = [{k: v for k, v in row.items() if k not in drop} for row in _rows(a / f"round-{r}" / "candidates.jsonl")]
        rb = [{k: v for k, v in row.items() if k not in drop} for row in _rows(b / f"round-{r}" / "candidates.jsonl")]
        assert len(ra) == 33 * 4 and ra == rb
        assert _rows(a / f"round-{r}" / "selected.jsonl") == _rows(b / f"round-{r}" / "selected.jsonl")
    la = [r["loss"] for r in metrics(uninterrupted, "rejection_sampling") if "loss" in r]
    lb = [r["loss"] for r in metrics(runs / "two", "rejection_sampling") if "loss" in r]
    assert len(la) == 12 and lb == pytest.approx(la, rel=1e-5)
    wa, wb = weights(a / "final"), weights(b / "final")
    # Summation order differs (ZeRO-2's all-reduce vs accumulation): 1.8e-5 after these 12 steps (1e-5 held for 3).
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 5e-5


def test_sigusr1_while_sampling_keeps_the_chunks_then_resumes(base, runs, tmp_path):
    """SIGUSR1 (a scheduler's warning) between two chunks: exit 75 with the finished chunks kept; the same command
    draws only the others. (The config refusals are unit tests: tests/unit/test_registry.py.)"""
    args = [
        "rejection_sampling",
        *FAST,
        *RS,
        *PARITY,
        *_copy(base, runs, "usr1"),
        "stage.prompts_per_round=32",
        "stage.generation_batch_size=2",
        "stage.max_steps=2",
    ]
    chunks = runs / "usr1" / "rejection_sampling" / "round-1" / "chunks"
    (proc,) = launch_ranks(args, 1, tmp_path)
    _wait(lambda: len(list(chunks.glob("chunk-*.jsonl"))) >= 2, proc, "round 1's first chunks")
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "while sampling round 1" in out and "Traceback" not in out
    assert manifest(runs / "usr1")["stages"]["rejection_sampling"]["status"] == "preempted"
    kept = len(list(chunks.glob("chunk-*.jsonl")))
    assert 2 <= kept < 16
    again = rlhf(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"round 1: {kept} of 16 chunk(s) already drawn; drawing the other {16 - kept}" in again.stderr


def test_a_failed_round_is_fixed_by_the_advised_lower_threshold(base, runs, tmp_path):
    """stage.threshold above every score: the round fails after drawing and scoring, advising a lower threshold. The
    same command with a lower threshold selects again from the saved candidates, draws none, and completes."""
    args = [
        "rejection_sampling",
        *FAST,
        *RS,
        *_copy(base, runs, "advice"),
        "stage.max_steps=1",
        "stage.selection=threshold",
    ]
    high = rlhf(*args, "stage.threshold=100.0", cwd=tmp_path)
    assert high.returncode == 2, high.stderr
    assert "round 1 selected 0 sample(s)" in high.stderr and "a lower stage.threshold (now 100)" in high.stderr
    round1 = runs / "advice" / "rejection_sampling" / "round-1"
    drawn = (round1 / "candidates.jsonl").read_bytes()
    scores = sorted(r["score"] for r in _rows(round1 / "candidates.jsonl") if r["score"] is not None)
    threshold = scores[len(scores) // 2]  # the median: about half the candidates pass

    low = rlhf(*args, f"stage.threshold={threshold}", cwd=tmp_path)
    assert low.returncode == 0, low.stderr
    assert (
        f"round 1: stage.threshold changed (100.0 -> {threshold}): selecting again from the saved 64 candidates"
        in low.stderr
    )
    assert "sampled" not in low.stderr and (round1 / "candidates.jsonl").read_bytes() == drawn  # none drawn again
    expected = [
        (r["prompt_index"], r["candidate"])
        for r in _rows(round1 / "candidates.jsonl")
        if r["score"] is not None and r["score"] >= threshold and not r["duplicate"]
    ]
    assert [(r["prompt_index"], r["candidate"]) for r in _rows(round1 / "selected.jsonl")] == expected
    assert manifest(runs / "advice")["stages"]["rejection_sampling"]["status"] == "completed"
    rounds = [r for r in metrics(runs / "advice", "rejection_sampling") if "selected_score_mean" in r]
    assert len(rounds) == 1 and rounds[0]["selected"] == len(expected) and "responses/s" in rounds[0]


def test_a_round_resumed_under_another_n_samples_is_drawn_again(base, runs, tmp_path):
    """Preempted while drawing round 1 with N = 3, resumed with N = 2: the chunks drawn with 3 are discarded (a line
    says so) and the round drawn again, so each prompt's group holds that prompt's 2 candidates and no other's."""
    args = [
        "rejection_sampling",
        *FAST,
        *RS,
        *PARITY,
        *_copy(base, runs, "regroup"),
        "stage.prompts_per_round=32",
        "stage.generation_batch_size=2",
        "stage.max_steps=2",
    ]
    round1 = runs / "regroup" / "rejection_sampling" / "round-1"
    (proc,) = launch_ranks([*args, "stage.n_samples=3"], 1, tmp_path)
    _wait(lambda: len(list((round1 / "chunks").glob("chunk-*.jsonl"))) >= 2, proc, "round 1's first chunks")
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    kept = len(list((round1 / "chunks").glob("chunk-*.jsonl")))
    assert 2 <= kept < 16

    again = rlhf(*args, "stage.n_samples=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (
        f"round 1: stage.n_samples changed (3 -> 2): drawing the candidates again ({kept} drawn chunk(s) discarded)"
    ) in again.stderr
    assert "already drawn" not in again.stderr
    cands, chosen = _check_best_of_n(round1, 2)  # every prompt's group: its own 2 candidates, the best selected
    assert len(cands) == 64 and sorted({r["candidate"] for r in cands}) == [0, 1]
    assert len({r["prompt_index"] for r in chosen}) == len(chosen)


def test_too_few_selected_samples_for_a_batch_fail_clearly(base, runs, tmp_path):
    res = rlhf(
        "rejection_sampling",
        *FAST,
        *RS,
        *_copy(base, runs, "bad"),
        "stage.max_steps=1",
        "stage.prompts_per_round=2",
        "stage.micro_batch_size=8",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert "round 1 selected 2 sample(s), fewer than one global batch of 16" in res.stderr
    assert "Traceback" not in res.stderr
