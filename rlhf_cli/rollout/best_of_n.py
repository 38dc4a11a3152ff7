"""Rejection sampling's data, round by round: which prompts a round samples, N candidates per prompt drawn and scored
chunk by chunk into files, and the round's selection read back from them (docs/algorithms.md section 7).

Files of round k, under `<stage>/round-k/`:
- `drawn.json`: what the candidates are drawn with (policy, N, sampling, reward, prompts; saved_round.py), written
  before the first chunk;
- `chunks/chunk-NNNNN.jsonl`: the candidates of one chunk of `generation_batch_size` prompts, written at once
  (temporary name, then rename), so a killed run keeps every finished chunk and redoes only the missing ones;
- `candidates.jsonl`: every candidate with its score and duplicate flag, merged by rank 0 from the chunks once every
  chunk exists (the chunks then go); the selection reads it, so a selection made again draws nothing. Removed when
  the round completes unless `stage.save_candidates`;
- `selected.jsonl` (what the round fine-tunes on) and `selection.json` (the round's statistics and the rule that
  selected: `rule`), written by rank 0 from candidates.jsonl.

A chunk's draws are seeded by (seed, round, chunk), never by rank: a chunk samples the same candidates whichever rank
draws it, so 2 ranks select exactly what 1 rank does, and a resumed round what an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli import preempt
from rlhf_cli.data import IGNORE_INDEX, collate_prompts
from rlhf_cli.data.sft import SFTExample
from rlhf_cli.files import atomic_write_text
from rlhf_cli.metrics import Sums
from rlhf_cli.rollout.engines import HF
from rlhf_cli.rollout.experience import expand
from rlhf_cli.rollout.generation import decode_responses, sampling_config
from rlhf_cli.rollout.scoring import score_responses
from rlhf_cli.rollout.selection import duplicates, select, selection_stats, valid_mask

CHUNK_GLOB = "chunk-*.jsonl"


@dataclass(frozen=True)
class RoundFiles:
    """The paths of one round."""

    dir: Path

    @classmethod
    def of(cls, stage_dir: Path, round_no: int) -> RoundFiles:
        return cls(stage_dir / f"round-{round_no}")

    @property
    def drawn(self) -> Path:
        return self.dir / "drawn.json"

    @property
    def chunks(self) -> Path:
        return self.dir / "chunks"

    def chunk(self, c: int) -> Path:
        return self.chunks / f"chunk-{c:05d}.jsonl"

    @property
    def selected(self) -> Path:
        return self.dir / "selected.jsonl"

    @property
    def candidates(self) -> Path:
        return self.dir / "candidates.jsonl"

    @property
    def selection(self) -> Path:
        return self.dir / "selection.json"

    @property
    def done(self) -> Path:
        """Written last, once the round's policy is exported: the round is complete."""
        return self.dir / "round.json"


def round_prompts(n_train: int, per_round: int | None, seed: int, round_no: int) -> list[int]:
    """Indices of the training prompts round `round_no` samples: all of them in a seeded order, or the first
    `per_round` of it (a different subset each round)."""
    gen = torch.Generator().manual_seed(seed * 7_919 + round_no)
    order = torch.randperm(n_train, generator=gen).tolist()
    return order[: per_round or n_train]


def chunk_slots(n_chunks: int, done: set[int], rank: int, world_size: int) -> list[int | None]:
    """The chunks this rank draws: the missing ones, dealt round-robin, padded with None so that every rank has the
    same number of slots (each slot ends with a collective: the preemption check)."""
    todo = [c for c in range(n_chunks) if c not in done]
    mine: list[int | None] = list(todo[rank::world_size])
    slots = math.ceil(len(todo) / world_size)
    return mine + [None] * (slots - len(mine))


def finished_chunks(files: RoundFiles) -> set[int]:
    """Chunks already on disk (a temporary file of a killed write does not count)."""
    if not files.chunks.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in files.chunks.glob(CHUNK_GLOB)}


def write_chunk(files: RoundFiles, c: int, rows: list[dict]) -> None:
    """All candidate rows of chunk `c` in one file, atomically (temporary name, fsync, rename)."""
    files.chunks.mkdir(parents=True, exist_ok=True)
    tmp = files.chunks / f".tmp-chunk-{c:05d}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, files.chunk(c))


def candidate_rows(
    round_no: int,
    prompt_idx: list[int],
    prompts: list[Any],
    n: int,
    seq: Any,
    texts: list[str],
    raw: torch.Tensor,
    scores: torch.Tensor,
) -> list[dict]:
    """One JSON row per candidate of a chunk: prompts (B,) each drawn `n` times, so row i is candidate i % n of
    prompt i // n; `seq` the sampled batch (B*n rows), `raw` / `scores` (B*n,) before / after the reward shaping.
    A score that could not be computed (NaN) is written as null."""
    lengths = seq.response_mask.sum(1).long().tolist()
    ids = seq.response_ids.tolist()
    rows = []
    for i, text in enumerate(texts):
        p = i // n
        score, raw_score = float(scores[i]), float(raw[i])
        rows.append(
            {
                "round": round_no,
                "prompt_index": prompt_idx[p],
                "candidate": i % n,
                "prompt": prompts[p].text,
                "response": text,
                "score": score if math.isfinite(score) else None,
                "raw_score": raw_score if math.isfinite(raw_score) else None,
                "ended_with_eos": bool(seq.has_eos[i]),
                "response_ids": ids[i][: lengths[i]],
            }
        )
    return rows


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_groups(rows: list[dict], n_samples: int) -> list[list[dict]]:
    """The candidate rows of each prompt, in the order the prompts were drawn: grouped by prompt index, never by
    position, so one group holds one prompt's candidates. Each prompt must have `n_samples` of them (the draw record
    that reconcile checks makes it so; a file that says otherwise is refused here rather than mis-selected)."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_index"], []).append(row)
    for p, group in groups.items():
        if len(group) != n_samples:
            raise ValueError(f"prompt {p} has {len(group)} candidate(s), not stage.n_samples={n_samples}")
    return list(groups.values())


def merge_chunks(files: RoundFiles, n_chunks: int, n_samples: int) -> int:
    """Rank 0, once every chunk exists: all candidates in candidates.jsonl, each flagged when it copies an earlier
    candidate of its prompt, then the chunk files removed. Returns the number of candidates."""
    rows = [row for c in range(n_chunks) for row in read_rows(files.chunk(c))]
    grid = prompt_groups(rows, n_samples)
    dup = duplicates([[tuple(r["response_ids"]) for r in g] for g in grid])
    for g, flags in zip(grid, dup.tolist(), strict=True):
        for row, is_dup in zip(g, flags, strict=True):
            row["duplicate"] = is_dup
    _write_jsonl(files.candidates, [row for g in grid for row in g])  # before the chunks go: a kill loses nothing
    for path in files.chunks.glob(CHUNK_GLOB):
        path.unlink()
    files.chunks.rmdir()
    return len(rows)


def select_round(files: RoundFiles, n_samples: int, st: Any, rule: dict[str, Any]) -> dict[str, float]:
    """Rank 0: read candidates.jsonl, drop copies and unscorable candidates, select per `st.selection`, write
    selected.jsonl and selection.json (the statistics and `rule`, what saved_round compares a later run's rule with).
    Returns the round's selection statistics."""
    grid = prompt_groups(read_rows(files.candidates), n_samples)
    scores = torch.tensor(
        [[math.nan if r["score"] is None else r["score"] for r in g] for g in grid], dtype=torch.float64
    ).reshape(len(grid), n_samples)
    dup = duplicates([[tuple(r["response_ids"]) for r in g] for g in grid])
    valid = valid_mask(scores, dup)
    chosen = select(scores, valid, st.selection, st.top_k, st.threshold)
    stats = selection_stats(scores, valid_mask(scores), chosen)
    stats["duplicate_fraction"] = float(dup.double().mean()) if dup.numel() else 0.0
    picked = [
        {k: v for k, v in row.items() if k != "duplicate"}
        for g, mask in zip(grid, chosen.tolist(), strict=True)
        for row, keep in zip(g, mask, strict=True)
        if keep
    ]
    _write_jsonl(files.selected, picked)
    atomic_write_text(files.selection, json.dumps({**stats, "rule": rule}, indent=2) + "\n")  # last: selection done
    return stats


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def training_examples(rows: list[dict], prompts: list[Any]) -> list[SFTExample]:
    """SFT examples from selected rows: the prompt's own token ids (the chat template with the generation prompt,
    exactly what was sampled from) followed by the sampled response ids, EOS included when there was one; the loss
    reads the response only. No decode / re-tokenise round trip: the policy learns the very tokens it drew."""
    out = []
    for row in rows:
        prompt = list(prompts[row["prompt_index"]].input_ids)
        response = list(row["response_ids"])
        out.append(SFTExample(input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response))
    return out


@dataclass(frozen=True)
class Drawing:
    """What the candidates of a round are drawn and scored with: the training prompts, the tokenizer, the reward
    source, the stage's config (`st`: n_samples, generation, reward), the reward statistics, the distributed group,
    the seed; `collective`: every generation and reward forward is a collective (ZeRO-3); the rollout `engine`
    (rollout/engines.py)."""

    prompts: list[Any]
    tokenizer: Any
    reward: Any
    st: Any
    rm_stats: Any
    dist: Any
    seed: int
    collective: bool = False
    engine: Any = HF


def sample_chunks(
    model: Any, chunks: list[list[int]], files: RoundFiles, round_no: int, how: Drawing, say: Any
) -> dict[str, float]:
    """Draw and score the chunks of round `round_no` that are not on disk yet (`chunks[c]`: prompt indices), this
    rank's share of them, each written as soon as it is scored. `how.collective` (ZeRO-3: every generation and reward
    forward is a collective): a rank without a chunk for a slot draws a filler and discards it. After every slot the
    ranks ask each other about SIGTERM / SIGUSR1 / Ctrl-C and stop together (Preempted) with the finished chunks kept.
    Returns the throughput of this call: responses/s, gen_tok/s, generation and scoring seconds (rank 0's)."""
    st, tokenizer, dist = how.st, how.tokenizer, how.dist
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Rank 0's listing, not each rank's own: a rank that looked after another had written a chunk would deal the
    # chunks differently and one chunk would be drawn by no rank.
    done = eng.from_main(finished_chunks(files) if dist.is_main else None)
    slots = chunk_slots(len(chunks), done, dist.rank, dist.world_size)
    counts = Sums("candidates", "tokens")  # new candidates and their tokens written by this rank
    seconds = Sums("generation", "scoring")  # this rank's
    started, reported = time.perf_counter(), 0
    if done and dist.is_main:
        say(
            f"round {round_no}: {len(done)} of {len(chunks)} chunk(s) already drawn; drawing the other "
            f"{len(chunks) - len(done)}"
        )
    with preempt.ctrl_c_saves():
        for k, c in enumerate(slots):
            if c is not None or how.collective:
                key = c if c is not None else 0  # a filler redraws chunk 0 and throws it away
                rows, took = draw_chunk(
                    model, chunks[key], how, gen_config, how.seed * 1_000_003 + round_no * 100_003 + key, round_no
                )
                seconds.add(generation=took[0], scoring=took[1])
                if c is not None:
                    write_chunk(files, c, rows)
                    counts.add(candidates=len(rows), tokens=sum(len(r["response_ids"]) for r in rows))
            if eng.any_rank(preempt.requested()):
                raise preempt.Preempted(
                    f"stopped by {preempt.signal_name() or 'a signal on another rank'} while sampling round "
                    f"{round_no}: {len(finished_chunks(files))} of {len(chunks)} chunks kept in {files.chunks}; run "
                    "the same command again to draw the rest"
                )
            if dist.is_main and (k + 1) * 10 // len(slots) > reported:  # about every tenth of the round
                reported = (k + 1) * 10 // len(slots)
                say(f"round {round_no}: sampled {len(done) + (k + 1) * dist.world_size}/{len(chunks)} chunk(s)")
    wall = time.perf_counter() - started
    total, took = counts.all_reduced(), seconds.local()
    return {
        "responses/s": total["candidates"] / max(wall, 1e-9),
        "gen_tok/s": total["tokens"] / max(wall, 1e-9),
        "generation_seconds": took["generation"],
        "scoring_seconds": took["scoring"],
        "new_tokens": total["tokens"],
    }


@torch.no_grad()
def draw_chunk(
    model: Any, prompt_idx: list[int], how: Drawing, gen_config: Any, seed: int, round_no: int
) -> tuple[list[dict], tuple[float, float]]:
    """`st.n_samples` candidates for each prompt of one chunk, in one generate call (each prompt repeated, its copies
    consecutive), seeded by `seed`; scored, reward-shaped (missing-EOS rule), as candidate rows. Returns the rows
    and (generation seconds, scoring seconds)."""
    st, tokenizer = how.st, how.tokenizer
    chosen = [how.prompts[i] for i in prompt_idx]
    expanded, _ = expand(chosen, st.n_samples)
    batch = {k: v.to(how.dist.device) for k, v in collate_prompts(expanded, tokenizer.pad_token_id).items()}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    seq = how.engine.generate(model, batch, gen_config)
    t1 = time.perf_counter()
    texts = decode_responses(tokenizer, seq)
    scores = score_responses(how.reward, expanded, seq, texts, st.reward, how.rm_stats, allow_invalid=True)
    rows = candidate_rows(round_no, prompt_idx, chosen, st.n_samples, seq, texts, scores.raw, scores.shaped)
    return rows, (t1 - t0, time.perf_counter() - t1)
