"""Evaluation on several ranks with an eval set that does not divide evenly: under ZeRO-3 every forward all-gathers
parameters, so every rank must run the same forwards, and the result must equal one process's over all examples.

SFT and RM run end to end on 2 ranks (torchrun, gloo) with every parameter partitioned; before the shared shard
(`eval_batches`) rank 0 ran one forward more than rank 1 and the run hung. DPO's and PPO's `evaluate` run in a
2-rank gloo world of their own (plain models, no DeepSpeed: the forwards are counted instead), next to the same
calls on one rank; that world also checks that the ZeRO-3 override below makes every eval forward a collective."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAST, free_port, manifest, metrics, ranks, rlhf

# ZeRO-3 keeps a small model whole (parameters under the persistence threshold; after training, parameters the
# traced step or the prefetcher will reuse), and then an eval forward is no collective and unequal forwards pass
# unnoticed. These settings make the tiny model behave like a large one: every forward gathers each layer and
# releases it afterwards (`test_partition_all_...` checks it).
PARTITION_ALL = (
    "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0,"
    "stage3_max_reuse_distance:0,stage3_prefetch_bucket_size:0}}"
)
TINY = [arg for arg in FAST if arg.startswith("model.tiny.")]
# Eval batches of 4 over 9 examples: ranks of 5 and 4 examples, 2 forwards and 1 before the shared shard.
EVAL = ["stage.eval_batch_size=4", "stage.eval_every=1", "stage.max_steps=2", "stage.save_every=0"]
ONE = ["stage.micro_batch_size=8", "stage.gradient_accumulation_steps=1"]  # equal global batch 8 on 1 and 2 ranks
TWO = ["stage.micro_batch_size=4", "stage.gradient_accumulation_steps=1"]
SFT_KEYS = ("eval_loss", "eval_perplexity")
RM_KEYS = ("eval_accuracy", "eval_loss", "eval_margin", "reward_mean", "reward_std", "eval_pairs")


def _one_and_two_ranks(stage: str, data: list[str], keys: tuple[str, ...], runs: Path, tmp_path: Path):
    """The eval metrics after step 1 and at the end, of 1 process and of 2 ranks under ZeRO-3."""
    base = [stage, *FAST, f"run.root={runs}", "deepspeed=zero3", PARTITION_ALL, *EVAL, *data]
    one = rlhf(*base, *ONE, "run.name=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = ranks([*base, *TWO, "run.name=two"], cwd=tmp_path, timeout=180)  # a hang fails
    assert two.returncode == 0, two.stderr[-3000:]
    out = []
    for name in ("one", "two"):
        evals = [{k: r[k] for k in keys} for r in metrics(runs / name, stage) if keys[0] in r]
        assert len(evals) == 2 and manifest(runs / name)["stages"][stage]["status"] == "completed"
        out.append(evals)
    return out


def test_sft_zero3_uneven_eval_on_two_ranks_matches_one(runs, tmp_path):
    data = ["data.eval_fraction=0.0225", "data.max_samples=64"]  # 9 of the 400 examples held out
    one, two = _one_and_two_ranks("sft", data, SFT_KEYS, runs, tmp_path)
    assert manifest(runs / "two")["stages"]["sft"]["metrics"]["data"]["eval_examples"] == 9
    for a, b in zip(one, two, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["eval_perplexity"] == pytest.approx(a["eval_perplexity"], rel=1e-5)


def test_rm_zero3_uneven_eval_on_two_ranks_matches_one(runs, tmp_path):
    data = ["model.name_or_path=builtin:tiny-llama", "data.eval_fraction=0.015", "data.max_samples=64"]
    one, two = _one_and_two_ranks("rm", data, RM_KEYS, runs, tmp_path)  # 9 of the 594 pairs held out
    for a, b in zip(one, two, strict=True):
        assert a["eval_pairs"] == b["eval_pairs"] == 9
        assert a["eval_accuracy"] == b["eval_accuracy"]
        for key in ("eval_loss", "eval_margin", "reward_mean", "reward_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


# --- DPO and PPO `evaluate` in a 2-rank gloo world -------------------------------------------------------------


def _tokenizer():
    from rlhf_cli.config.compose import compose
    from rlhf_cli.models import load_tokenizer

    return load_tokenizer(compose("sft", TINY).model)


# 9: ranks of 5 and 4 examples; 1: rank 1 has no example of its own and runs its forward on a filler.
SIZES = (9, 1)


def _dpo_eval(dist) -> dict[int, tuple[dict, list[int]]]:
    """For each n in SIZES: DPO's eval metrics over the first n of 9 pairs (reference log-probs precomputed: fillers
    index that table) and the rows of each policy forward on this rank."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_preference_datasets
    from rlhf_cli.models import disable_dropout, load_causal_lm
    from rlhf_cli.stages import dpo

    cfg = compose(
        "dpo",
        [
            *TINY,
            "model.name_or_path=builtin:tiny-llama",
            "stage.eval_batch_size=4",
            "stage.precompute_ref=true",
            "stage.beta=0.5",
        ],
    )
    tok = _tokenizer()
    examples = build_preference_datasets(cfg.data, tok, seed=cfg.seed).eval[:9]
    ref = dpo.Reference(cfg.stage, cfg, "builtin:tiny-llama", tok, dist)
    ref.precompute({"eval": examples}, tok.pad_token_id)
    policy = load_causal_lm(cfg.model, tok, seed=1)  # not the reference's weights: rewards are not all 0
    disable_dropout(policy)
    rows: list[int] = []
    policy.register_forward_pre_hook(lambda m, a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    out = {}
    for n in SIZES:
        rows.clear()
        out[n] = dpo.evaluate(policy, ref, cfg.stage, examples[:n], tok.pad_token_id, dist), list(rows)
    return out


class _Reward:
    """A reward that depends on the prompt and the response (so a mix-up shows), recording each batch's size."""

    def __init__(self):
        self.rows: list[int] = []

    def score(self, prompts, seq, responses) -> torch.Tensor:
        self.rows.append(len(prompts))
        tokens = (seq.response_ids * seq.response_mask.long()).sum(-1).double()
        return tokens % 97 / 10 + torch.tensor([len(p.input_ids) for p in prompts], dtype=torch.float64)


def _ppo_eval(dist) -> dict[int, tuple[dict, list[int]]]:
    """For each n in SIZES: PPO's greedy eval metrics over the first n of 9 prompts and the rows of each reward call
    (a forward of a reward model) on this rank."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.models import disable_dropout, load_causal_lm
    from rlhf_cli.rollout.engines import HF
    from rlhf_cli.rollout.evaluation import PolicyEval, evaluate_policy

    cfg = compose(
        "ppo",
        [
            *TINY,
            "model.name_or_path=builtin:tiny-llama",
            "stage.eval_batch_size=4",
            "stage.generation.max_new_tokens=8",
        ],
    )
    tok = _tokenizer()
    examples = build_prompt_datasets(cfg.data, tok, seed=cfg.seed).train[:9]
    model = load_causal_lm(cfg.model, tok, seed=0)
    disable_dropout(model)
    actor, reward = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0), _Reward()
    out = {}
    for n in SIZES:
        reward.rows.clear()
        ctx = SimpleNamespace(cfg=cfg, tokenizer=tok, dist=dist, rollout=HF)
        how = PolicyEval.of_stage(ctx)
        out[n] = evaluate_policy(actor, reward, examples[:n], how), list(reward.rows)
    return out


def _whole_after_eval_forward(extra: list[str], world_size: int) -> int:
    """Parameters a ZeRO-3 engine on the tiny model holds whole after 2 training steps and an eval forward, with the
    overrides `extra`. 0: every parameter was gathered for the forward and released after it (a collective)."""
    from rlhf_cli import engine as eng
    from rlhf_cli.config.compose import compose
    from rlhf_cli.models import load_causal_lm

    cfg = compose("sft", [*TINY, "deepspeed=zero3", *extra])
    model = load_causal_lm(cfg.model, _tokenizer(), seed=0)
    engine = eng.initialize(model, eng.ds_config(cfg.deepspeed, cfg.optim, 2, 1, world_size), cfg.optim, 2)
    ids = torch.arange(5, 17).view(2, 6)
    for _ in range(2):  # DeepSpeed records the step's trace in the first step; the prefetcher uses it afterwards
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        engine(input_ids=ids)
    return sum(p.numel() > 0 for p in engine.module.parameters())


def _rank_main(rank: int, world_size: int, port: int, out: Path) -> None:
    from rlhf_cli import engine as eng

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist = eng.init_distributed()
    result = {
        "dpo": _dpo_eval(dist),
        "ppo": _ppo_eval(dist),
        "whole": {
            "default": _whole_after_eval_forward([], world_size),
            "partition_all": _whole_after_eval_forward([PARTITION_ALL], world_size),
        },
    }
    torch.save(result, out / f"rank-{rank}.pt")
    eng.shutdown()
    eng.exit_now(0)  # as the CLI does: interpreter teardown can abort a gloo rank


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo ranks saw (see `_rank_main`); fails after 180 s, which is what ranks out of step do."""
    out = tmp_path_factory.mktemp("two_ranks")
    ctx = mp.start_processes(_rank_main, args=(2, free_port(), out), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank evaluation did not finish in 180 s")
    return [torch.load(out / f"rank-{rank}.pt", weights_only=False) for rank in range(2)]


ONE_RANK = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))


def test_partition_all_override_makes_every_eval_forward_gather(two_ranks):
    """With the override the end-to-end tests use, no parameter stays whole after an eval forward that follows
    training (so each forward all-gathers: unequal forwards hang); with plain `deepspeed=zero3` some do."""
    for rank in two_ranks:
        assert rank["whole"]["partition_all"] == 0
        assert rank["whole"]["default"] > 0


# Rows of each forward on each rank, in eval batches of 4 (DPO: chosen and rejected rows of each pair).
@pytest.mark.parametrize(
    ("stage", "n", "rows"), [("dpo", 9, [8, 2]), ("ppo", 9, [4, 1]), ("dpo", 1, [2]), ("ppo", 1, [1])]
)
def test_evaluate_on_two_ranks_runs_equal_forwards_and_matches_one(two_ranks, stage, n, rows):
    expected, _ = {"dpo": _dpo_eval, "ppo": _ppo_eval}[stage](ONE_RANK)[n]
    (got0, rows0), (got1, rows1) = two_ranks[0][stage][n], two_ranks[1][stage][n]
    assert rows0 == rows1 == rows
    assert got0 == got1 and got0.keys() == expected.keys() and expected
    for key, value in expected.items():
        # abs: DPO's rewards are differences of fp32 log-prob sums near -100 whose rounding depends on the batch's
        # padding (other batches on 2 ranks); a filler counted or an example left out moves a mean by ~1/9.
        assert got0[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
