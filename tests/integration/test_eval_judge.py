"""`rlhf eval stage.judge=<teacher>`: the teacher's log-likelihood of each policy's answers (rollout/evaluation.py
`judge_loglik` / `judge_values`, first on hand-computed numbers with a bigram stand-in for the judge), then end to end
on a tiny sft run: the columns in eval.json, the printed table and the manifest, the judge recorded as an input, a
trained judge rating the greedy answers above a random one, and a judge with another tokenizer refused before any
weights load."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, manifest, rlhf

from rlhf_cli.rollout.comparison import table
from rlhf_cli.rollout.evaluation import judge_loglik, judge_summary, judge_sums, judge_values
from rlhf_cli.rollout.generation import Sequences

# ---------------------------------------------------------------- the log-likelihood on a tiny case

# A bigram judge over 3 tokens (2 = EOS): P[prev][next]; its logits log P, so log_softmax gives log P back.
P = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.5, 0.375], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)


class Bigram(torch.nn.Module):
    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        return SimpleNamespace(logits=P.log()[input_ids][:, -logits_to_keep:].float())


def test_judge_loglik_sums_the_response_tokens_and_averages_per_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 99.0, float("nan")], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # unequal lengths, junk after the end, an empty row
    out = judge_loglik(logprobs, mask)
    torch.testing.assert_close(out["judge_logp_seq"][:2], torch.tensor([-3.5, -3.0], dtype=torch.float64))
    torch.testing.assert_close(out["judge_logp_token"][:2], torch.tensor([-3.5 / 3, -3.0], dtype=torch.float64))
    assert out["judge_logp_seq"][2].isnan() and out["judge_logp_token"][2].isnan()  # no 0, no 0 / 0
    # Means over the responses with weight 1 and a value: the empty row and the filler row (weight 0) are out.
    summary = judge_summary(judge_sums(out, torch.tensor([1.0, 1.0, 1.0])))
    assert summary["judge_logp_seq"] == pytest.approx(-3.25) and summary["judge_logp_seq_se"] == pytest.approx(0.25)
    summary = judge_summary(judge_sums(out, torch.tensor([1.0, 0.0, 1.0])))
    assert summary["judge_logp_token"] == pytest.approx(-3.5 / 3) and summary["judge_logp_token_se"] == 0.0


def test_judge_values_reads_the_judges_next_token_log_probs_of_the_response():
    # Row 0: prompt 1 1, answer 0 1 2 (EOS): log P[1][0] + log P[0][1] + log P[1][2]. Row 1: prompt (pad) 1, answer
    # 2 (EOS at once) then padding: log P[1][2] alone.
    ids = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 0, 0]])
    seq = Sequences(
        input_ids=ids,
        attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]),
        position_ids=torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]),
        response_mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
        has_eos=torch.tensor([True, True]),
        prompt_len=2,
    )
    out = judge_values(Bigram(), seq)
    row0 = math.log(0.125) + math.log(0.25) + math.log(0.375)
    want_seq = torch.tensor([row0, math.log(0.375)], dtype=torch.float64)
    torch.testing.assert_close(out["judge_logp_seq"], want_seq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["judge_logp_token"], want_seq / torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_the_comparison_table_shows_the_judges_columns_only_where_a_judge_ran():
    rows = {"reference": {"judge_logp_token": -1.25, "judge_logp_token_se": 0.5}, "sft": {}}
    lines = table(rows)
    assert lines[0].endswith(f"{'judge logp/tok':>18}") and "judge logp/seq" not in lines[0]  # no value: no column
    assert lines[1].endswith(f"{'-1.250 +- 0.500':>18}") and lines[2].endswith(f"{'-':>18}")
    assert "judge" not in table({"sft": {"kl": 0.0, "kl_se": 0.0}})[0]  # without a judge, the table as it was


# ---------------------------------------------------------------- rlhf eval with a judge

EVAL = [
    "logging.progress=false",
    "stage.generation.max_new_tokens=8",
    "stage.eval_batch_size=16",
    "stage.max_prompts=8",
    "stage.kl_samples=0",
    "stage.policies=[sft]",
    "stage.reward.function=length_reward:score",
]
LENGTH_REWARD = "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A run with a short sft stage on the FAST model."""
    root = tmp_path_factory.mktemp("judge_base")
    res = rlhf("sft", *FAST, f"run.root={root}", "run.name=base", "stage.max_steps=10", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "base"


def _eval(sft_run, runs, tmp_path, name, *extra):
    shutil.copytree(sft_run, runs / name, ignore=shutil.ignore_patterns(".lock"))
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    return rlhf("eval", *EVAL, f"run.root={runs}", f"run.name={name}", *extra, cwd=tmp_path)


def test_eval_reports_the_judges_log_likelihood_next_to_the_reward(sft_run, runs, tmp_path):
    res = _eval(sft_run, runs, tmp_path, "own", "stage.judge=stage:sft")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((runs / "own" / "eval" / "eval.json").read_text())
    assert out["judge"] == "stage:sft"
    ref, sft = out["results"]["reference"], out["results"]["sft"]
    for key in ("reward_mean", "judge_logp_token", "judge_logp_token_se", "judge_logp_seq", "judge_logp_seq_se"):
        assert key in ref and key in sft, key
    # Greedy answers of the same model: the same numbers; a log-likelihood is <= 0, and a sum of at least one
    # token's is at most its mean per token.
    assert sft["judge_logp_token"] == ref["judge_logp_token"] and sft["judge_logp_seq"] == ref["judge_logp_seq"]
    assert sft["judge_logp_seq"] <= sft["judge_logp_token"] < 0
    assert "judge logp/tok" in res.stderr and "judge logp/seq" in res.stderr and "reward" in res.stderr
    rec = manifest(runs / "own")["stages"]["eval"]
    assert rec["metrics"]["sft/judge_logp_token"] == sft["judge_logp_token"]
    # An input like the policies: fingerprinted by the sft stage's completion (a new sft makes this eval stale).
    completion = manifest(runs / "own")["stages"]["sft"]["completion"]["id"]
    assert rec["provenance"]["inputs"]["stage.judge"]["fp"] == completion

    # A random judge with the same tokenizer (the built-in tiny model) finds those answers far less likely.
    res = _eval(sft_run, runs, tmp_path, "random", "stage.judge=builtin:tiny-llama", *FAST[:5])
    assert res.returncode == 0, res.stderr[-3000:]
    rand = json.loads((runs / "random" / "eval" / "eval.json").read_text())["results"]["sft"]
    assert rand["judge_logp_token"] < sft["judge_logp_token"] - 0.5


def test_a_judge_with_another_tokenizer_is_refused_naming_both(sft_run, runs, tmp_path):
    other = tmp_path / "other_judge"
    shutil.copytree(sft_run / "sft" / "final", other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text() + "{# another template #}")
    res = _eval(sft_run, runs, tmp_path, "bad", f"stage.judge={other}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"stage.judge={other}: its tokenizer ({other}) is not the policies' (" in res.stderr
    assert str(runs / "bad" / "sft" / "final") in res.stderr and "Traceback" not in res.stderr
    assert not (runs / "bad" / "eval" / "eval.json").exists()
