"""Preference data: format adapters (with bad rows and their locations), margins, shared-prompt tokenization,
truncation (of the replies, or of the prompt's oldest turns), dataset building, collation, the built-in sample, and the
real HH-RLHF file when it is present.

Token-level expectations use the project's tiny tokenizer (byte-level BPE, eos `<|end|>` = 1, pad 0, template
`<|role|>\\ncontent<|end|>\\n`), decoding ids back to text where exact ids would be unreadable.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import HH_REAL, REPO, assistant, system, user

from rlhf_cli.config.schema import PreferenceDataConfig
from rlhf_cli.data import (
    IGNORE_INDEX,
    DropExample,
    PreferenceExample,
    PreferencePair,
    adapt_preference_rows,
    build_preference_datasets,
    collate_preference,
    load_rows,
    tokenize_pair,
)
from rlhf_cli.data.sft import BOUNDARY_MERGE, NO_ROOM, PROMPT_TRUNCATED, SHORT_AFTER_TRUNCATION, TOO_LONG
from rlhf_cli.errors import DataError
from rlhf_cli.models.tiny import tiny_tokenizer

FIXTURES = REPO / "tests" / "fixtures" / "preference"
EOS = 1


def adapt(path: Path, fmt: str, **cfg):
    return adapt_preference_rows(load_rows(str(path)), PreferenceDataConfig(source=str(path), format=fmt, **cfg))


def bad_lines(adapted, path: Path) -> dict[int, str]:
    """Bad rows as {line number: reason}, checking that each location is `path:LINE`."""
    out = {}
    for bad in adapted.bad_rows:
        where, line = bad.location.rsplit(":", 1)
        assert where == str(path)
        out[int(line)] = bad.reason
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- adapters


def test_hh_rlhf_splits_transcripts_into_shared_prompt_and_final_replies():
    out = adapt(FIXTURES / "hh_rlhf.jsonl", "hh_rlhf")
    assert [int(p.location.rsplit(":", 1)[1]) for p in out.pairs] == [1, 2, 3, 10]
    multi, spaced, merged, inline = out.pairs
    assert multi.prompt == [
        user("How do I boil an egg?"),
        assistant("Put it in boiling water for about nine minutes."),
        user("And for a soft one?"),
    ]
    assert (multi.chosen, multi.rejected) == (
        "About six minutes, then cool it in cold water.",
        "Why would you want that?",
    )
    # Surrounding whitespace and the trailing newline are stripped, so both sides share the prompt.
    assert spaced.prompt == [user("What is the capital of France?")]
    assert (spaced.chosen, spaced.rejected) == ("Paris is the capital of France.", "Lyon.")
    # Consecutive turns of one role are joined, empty turns dropped: roles alternate for chat templates.
    assert merged.prompt == [
        user("Hi there.\n\nCan you help me with a recipe?"),
        assistant("Sure.\n\nWhat would you like to cook?"),
        user("Pancakes."),
    ]
    # "Human:" inside a reply (no blank line before it) is text, as in the real data.
    assert inline.chosen == "Human: yes it is late."
    assert all(p.margin is None for p in out.pairs)


def test_hh_rlhf_bad_rows_have_locations_and_reasons():
    out = adapt(FIXTURES / "hh_rlhf.jsonl", "hh_rlhf")
    assert bad_lines(out, FIXTURES / "hh_rlhf.jsonl") == {
        4: "'chosen' ends with an empty 'Assistant:' reply",
        5: "'chosen' and 'rejected' differ before the final assistant reply",
        6: "'chosen' does not end with an 'Assistant:' reply",
        7: "'chosen' and 'rejected' replies are identical",
        8: "missing field 'rejected'",
        9: "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
    }


def test_shp_orders_by_label_and_filters_by_score_ratio():
    out = adapt(FIXTURES / "shp.jsonl", "shp")
    first, second = out.pairs
    assert first.prompt == [user("What is a good first houseplant?")]
    assert (first.chosen, first.rejected) == ("A pothos: it survives low light and missed waterings.", "Cactus lol")
    # labels 0: B is preferred.
    assert (second.chosen, second.rejected) == ("Let the dough rise longer and knead it more.", "Buy bread instead.")
    # Ratio 15/10 < 2: filtered and counted, not a bad row.
    assert out.skipped == {"SHP score ratio below data.shp_min_score_ratio=2": 1}
    assert bad_lines(out, FIXTURES / "shp.jsonl") == {
        4: "missing field 'score_B'",
        5: "field 'labels' must be 0 or 1, got 2",
    }
    assert len(adapt(FIXTURES / "shp.jsonl", "shp", shp_min_score_ratio=1.5).pairs) == 3


def test_ultrafeedback_takes_final_assistant_messages_and_shared_history():
    out = adapt(FIXTURES / "ultrafeedback.jsonl", "ultrafeedback")
    haiku, french, bare = out.pairs
    assert haiku.prompt == [user("Write a haiku about rain.")]
    assert haiku.chosen.startswith("Soft rain on the roof\n") and haiku.rejected == "Rain is wet."
    assert french.prompt == [
        system("You are a translator."),
        user("Say hello."),
        assistant("Hello."),
        user("And now in French?"),
    ]
    assert (french.chosen, french.rejected) == ("Bonjour.", "Hola.")
    # Conversations holding only the reply take the prompt column.
    assert bare.prompt == [user("What is 2 + 2?")] and (bare.chosen, bare.rejected) == ("4.", "5.")
    assert bad_lines(out, FIXTURES / "ultrafeedback.jsonl") == {
        3: "'chosen' and 'rejected' differ before the final assistant reply",
        4: "'rejected[1]' is an empty assistant message",
        5: "'rejected' must end with an assistant message",
    }


def test_generic_jsonl_strings_message_lists_and_implicit_prompt():
    out = adapt(FIXTURES / "pairs.jsonl", "jsonl")
    plain, listed, implicit = out.pairs
    assert plain.prompt == [user("What is 2 plus 2?")]
    assert (plain.chosen, plain.rejected) == ("2 plus 2 is 4.", "2 plus 2 is 5.")
    assert listed.prompt == [system("Be brief."), user("Name a planet.")] and listed.chosen == "Mars."
    assert implicit.prompt == [user("Say hi.")] and (implicit.chosen, implicit.rejected) == ("Hi!", "Go away.")
    assert bad_lines(out, FIXTURES / "pairs.jsonl") == {
        4: "'chosen' and 'rejected' differ before the final assistant reply",
        5: "missing field 'chosen'",
        6: "field 'chosen' must be a string, got int",
        7: "field 'rejected' is empty",
        8: "'chosen' and 'rejected' replies are identical",
        9: "the prompt must end with a user message",
        10: "'chosen' holds a conversation that differs from 'prompt'",
    }


def test_margin_column_and_strength_map(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "gap": 1.5, "strength": "significantly better"},
        {"prompt": "a", "chosen": "b", "rejected": "d", "gap": 0, "strength": "negligibly better"},
        {"prompt": "a", "chosen": "b", "rejected": "e", "gap": "big", "strength": "unsure"},
    ]
    path = write_rows(tmp_path / "m.jsonl", rows)
    by_number = adapt(path, "jsonl", margin_column="gap")
    assert [p.margin for p in by_number.pairs] == [1.5, 0.0]
    assert bad_lines(by_number, path) == {3: "field 'gap' must be a finite number, got 'big'"}
    llama2 = {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0}
    by_label = adapt(path, "jsonl", strength_column="strength", margin_map=llama2)
    assert [p.margin for p in by_label.pairs] == [3.0, 0.0]
    (reason,) = bad_lines(by_label, path).values()
    assert reason.startswith("unknown preference strength 'unsure' in field 'strength'")
    assert "significantly better, better, slightly better, negligibly better" in reason


def test_system_prompt_is_prepended_unless_the_row_has_one():
    out = adapt(FIXTURES / "pairs.jsonl", "jsonl", system_prompt="Be kind.")
    assert out.pairs[0].prompt == [system("Be kind."), user("What is 2 plus 2?")]
    assert out.pairs[1].prompt[0] == system("Be brief.")


# ---------------------------------------------------------------- tokenization

PAIR = PreferencePair("x:1", [user("What is 2 plus 2?")], "2 plus 2 is 4.", "I will not tell you that.", 0.5)


def test_pair_shares_prompt_ids_and_both_replies_end_with_eos(tok):
    ex = tokenize_pair(tok, PAIR, max_length=64)
    assert tok.decode(ex.prompt_ids) == "<|user|>\nWhat is 2 plus 2?<|end|>\n<|assistant|>\n"
    assert ex.prompt_ids == tok.apply_chat_template(PAIR.prompt, add_generation_prompt=True, return_dict=False)
    # The reply span stops at EOS: the newline the template adds after it is not part of the reply.
    assert tok.decode(ex.chosen_ids) == "2 plus 2 is 4.<|end|>"
    assert tok.decode(ex.rejected_ids) == "I will not tell you that.<|end|>"
    assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == EOS
    assert EOS not in ex.chosen_ids[:-1]
    assert ex.margin == 0.5
    # prompt + reply is exactly the full rendering, up to the EOS.
    full = tok.apply_chat_template([*PAIR.prompt, assistant(PAIR.chosen)], return_dict=False)
    assert ex.prompt_ids + ex.chosen_ids == full[: len(ex.prompt_ids) + len(ex.chosen_ids)]


def test_multi_turn_prompt_is_one_rendering_with_generation_prompt(tok):
    prompt = [system("Be brief."), user("Hi."), assistant("Hello."), user("Name a planet.")]
    ex = tokenize_pair(tok, PreferencePair("x", prompt, "Mars.", "A fish."), max_length=64)
    assert ex.prompt_ids == tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ex.chosen_ids) == "Mars.<|end|>" and tok.decode(ex.rejected_ids) == "A fish.<|end|>"


def test_eos_appended_when_the_template_ends_turns_with_another_token():
    tok = tiny_tokenizer()
    tok.chat_template = tok.chat_template.replace("<|end|>", "<|system|>")
    ex = tokenize_pair(tok, PAIR, max_length=64)
    # Same rule as SFT: the whole turn (marker and newline) then the appended, trained EOS.
    assert tok.decode(ex.chosen_ids) == "2 plus 2 is 4.<|system|>\n<|end|>"
    assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == EOS


def test_truncation_policies(tok):
    ex = tokenize_pair(tok, PAIR, max_length=64)
    p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    assert r > c  # the rejected reply is the longer one here
    assert tokenize_pair(tok, PAIR, max_length=p + r) == ex  # exactly fits
    with pytest.raises(DropExample) as drop:
        tokenize_pair(tok, PAIR, max_length=p + r - 1)
    assert drop.value.reason == TOO_LONG
    with pytest.raises(DropExample) as drop:
        tokenize_pair(tok, PAIR, max_length=p, truncation="truncate_response")
    assert drop.value.reason == NO_ROOM
    cut = tokenize_pair(tok, PAIR, max_length=p + c - 1, truncation="truncate_response")
    assert cut.prompt_ids == ex.prompt_ids
    assert cut.chosen_ids == ex.chosen_ids[:-1] and cut.rejected_ids == ex.rejected_ids[: c - 1]  # EOS lost
    assert cut.response_truncated and not ex.response_truncated  # counted in the data report
    with pytest.raises(DropExample) as drop:
        tokenize_pair(tok, PAIR, max_length=p + 2, truncation="truncate_response", min_response_tokens=3)
    assert drop.value.reason == SHORT_AFTER_TRUNCATION


def test_replies_identical_after_truncation_are_dropped(tok):
    pair = PreferencePair("x", [user("Count.")], "one two three four", "one two three five")
    with pytest.raises(DropExample) as drop:
        tokenize_pair(
            tok, pair, max_length=len(tokenize_pair(tok, pair, 64).prompt_ids) + 2, truncation="truncate_response"
        )
    assert drop.value.reason == "chosen and rejected identical after truncation"


CHAT = [
    system("Be brief."),
    user("Hi."),
    assistant("Hello, how can I help?"),
    user("Tell me about space."),
    assistant("Space is big."),
    user("Name a planet."),
]
LONG_PAIR = PreferencePair("x", CHAT, "Mars.", "A fish that swims in the sea.")


def render_prompt(tok, prompt) -> list[int]:
    return tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)


def test_truncate_prompt_cuts_oldest_turns_of_the_one_shared_prompt(tok):
    full = tokenize_pair(tok, LONG_PAIR, max_length=512)
    tail, shortest = [CHAT[0], *CHAT[3:]], [CHAT[0], CHAT[-1]]  # first exchange cut; both cut
    longer = len(full.rejected_ids)  # 11 tokens; chosen 5; prompts 74 (whole), 51 (tail), 21 (shortest)
    assert longer > len(full.chosen_ids)
    room = len(render_prompt(tok, tail)) + longer
    ex = tokenize_pair(tok, LONG_PAIR, max_length=room, truncation="truncate_prompt")
    # Chosen and rejected share the cut prompt, and keep exactly the ids they have after the whole prompt.
    assert ex == PreferenceExample(render_prompt(tok, tail), full.chosen_ids, full.rejected_ids, prompt_truncated=True)
    assert tok.decode(ex.prompt_ids).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nTell me about space.")
    assert tok.decode(ex.prompt_ids).endswith("<|user|>\nName a planet.<|end|>\n<|assistant|>\n")
    # The room is the longer reply's: one token less and the next exchange goes too.
    ex = tokenize_pair(tok, LONG_PAIR, max_length=room - 1, truncation="truncate_prompt")
    assert ex.prompt_ids == render_prompt(tok, shortest)
    assert (ex.chosen_ids, ex.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    assert tokenize_pair(tok, LONG_PAIR, max_length=512, truncation="truncate_prompt") == full  # fits: not cut
    with pytest.raises(DropExample) as drop:  # the whole 74-token prompt fills `room`
        tokenize_pair(tok, LONG_PAIR, max_length=room, truncation="drop")
    assert drop.value.reason == NO_ROOM
    # The system prompt and the final question are never cut: when they leave too little room, the pair is dropped
    # with the reason `drop` gives.
    for max_length, reason in ((len(render_prompt(tok, shortest)) + longer - 1, TOO_LONG), (21, NO_ROOM)):
        with pytest.raises(DropExample) as drop:
            tokenize_pair(tok, LONG_PAIR, max_length=max_length, truncation="truncate_prompt")
        assert drop.value.reason == reason


def test_bpe_merge_across_the_prompt_boundary_drops_the_pair():
    tok = tiny_tokenizer()
    # The generation prompt ends with a space, which the byte-level BPE merges into " no" in the full text.
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DropExample) as drop:
        tokenize_pair(tok, PreferencePair("x", [user("hi")], "hello there", "no"), max_length=64)
    assert drop.value.reason == BOUNDARY_MERGE


# ---------------------------------------------------------------- datasets


def cfg(path: Path, fmt: str = "jsonl", **kw) -> PreferenceDataConfig:
    return PreferenceDataConfig(source=str(path), format=fmt, **{"max_length": 128, **kw})


def test_build_reports_bad_rows_drops_and_caps(tok, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(10)]
    rows += [{"prompt": "x"}, {"prompt": "Long?", "chosen": "word " * 200, "rejected": "short"}]
    path = write_rows(tmp_path / "p.jsonl", rows)
    data = build_preference_datasets(cfg(path, eval_fraction=0.2), tok, seed=3)
    report = data.report
    assert report.rows_read == 12 and report.bad_rows == 1
    assert report.bad_row_samples == [f"{path}:11: missing field 'chosen'"]
    assert report.dropped.get(TOO_LONG, 0) + report.eval_dropped.get(TOO_LONG, 0) == 1
    assert report.train_examples + report.eval_examples == 10 and report.eval_examples == 2
    again = build_preference_datasets(cfg(path, eval_fraction=0.2), tok, seed=3)
    assert again.train == data.train and again.eval == data.eval
    capped = build_preference_datasets(cfg(path, eval_fraction=0.2, max_samples=2), tok, seed=3)
    assert len(capped.train) == 2 and capped.eval == data.eval  # the cap applies after the eval split


def test_build_counts_pairs_whose_prompt_was_truncated(tok, tmp_path):
    rows = [{"prompt": CHAT, "chosen": LONG_PAIR.chosen, "rejected": LONG_PAIR.rejected}]
    rows += [{"prompt": "Name a planet.", "chosen": "Venus.", "rejected": "A cat."}]
    path = write_rows(tmp_path / "p.jsonl", rows)
    # 62 tokens: the prompt without its first exchange (51) and the longer reply (11).
    data = build_preference_datasets(cfg(path, eval_fraction=0.0, max_length=62, truncation="truncate_prompt"), tok, 0)
    assert [ex.prompt_truncated for ex in data.train] == [True, False]
    assert data.report.dropped == {} and data.report.truncated == {PROMPT_TRUNCATED: 1}
    assert "\ntruncated: prompt cut to its final turns x1" in data.report.summary()
    data = build_preference_datasets(cfg(path, eval_fraction=0.0, max_length=62), tok, 0)
    assert (data.report.dropped, data.report.truncated, len(data.train)) == ({NO_ROOM: 1}, {}, 1)


def test_held_out_fraction_keeps_pairs_of_one_prompt_together(tok, tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": reply}
        for i in range(8)
        for reply in ("No.", "Nah.")
    ]
    path = write_rows(tmp_path / "p.jsonl", rows)
    for seed in range(4):
        data = build_preference_datasets(cfg(path, eval_fraction=0.25), tok, seed=seed)
        train_prompts = {tuple(ex.prompt_ids) for ex in data.train}
        eval_prompts = {tuple(ex.prompt_ids) for ex in data.eval}
        assert len(eval_prompts) == 2 and len(data.eval) == 4  # 25% of the 8 prompts, both pairs of each
        assert not train_prompts & eval_prompts


def test_build_fails_on_bad_rows_with_location_and_hint(tok):
    with pytest.raises(DataError) as err:
        build_preference_datasets(cfg(FIXTURES / "hh_rlhf.jsonl", "hh_rlhf", bad_rows="fail"), tok, seed=0)
    message = str(err.value)
    assert f"{FIXTURES / 'hh_rlhf.jsonl'}:4" in message and "data.bad_rows=skip" in message


def test_build_with_no_pair_left_and_config_errors(tok, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "a b c d e f", "chosen": "g", "rejected": "h"}])
    with pytest.raises(DataError, match="no preference pair left"):
        build_preference_datasets(cfg(path, max_length=4), tok, seed=0)
    with pytest.raises(DataError, match="both set"):
        build_preference_datasets(cfg(path, margin_column="m", strength_column="s"), tok, seed=0)
    with pytest.raises(DataError, match="margin_map is empty"):
        build_preference_datasets(cfg(path, strength_column="s"), tok, seed=0)
    with pytest.raises(DataError, match="unknown preference format"):
        build_preference_datasets(cfg(path, "dolly"), tok, seed=0)


# ---------------------------------------------------------------- batching


def test_collate_stacks_chosen_then_rejected_with_prompt_masked():
    a = PreferenceExample([5, 6], [7, EOS], [8, 9, EOS], margin=1.0)
    b = PreferenceExample([5], [10, 11, 12, EOS], [13, EOS], margin=0.0)
    batch = collate_preference([a, b], pad_token_id=0)
    X = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, EOS, 0],  # chosen_0
        [5, 10, 11, 12, EOS],  # chosen_1
        [5, 6, 8, 9, EOS],  # rejected_0
        [5, 13, EOS, 0, 0],  # rejected_1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [X, X, 7, EOS, X],
        [X, 10, 11, 12, EOS],
        [X, X, 8, 9, EOS],
        [X, 13, EOS, X, X],
    ]
    assert batch["prompt_lengths"].tolist() == [2, 1, 2, 1]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.0, 0.0]


def test_collate_with_pad_equal_to_eos_keeps_eos_labels_and_mask():
    ex = PreferenceExample([5], [7, EOS], [8, 9, 10, EOS])
    batch = collate_preference([ex], pad_token_id=EOS)
    assert batch["input_ids"][0].tolist() == [5, 7, EOS, EOS, EOS]  # EOS then two pads that look the same
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, EOS, IGNORE_INDEX, IGNORE_INDEX]


# ---------------------------------------------------------------- built-in sample and real data


def test_builtin_sample_tokenizes_without_drops(tok):
    data = build_preference_datasets(PreferenceDataConfig(max_length=256), tok, seed=0)
    report = data.report
    assert report.rows_read == 594 and report.bad_rows == 0 and not report.dropped and not report.eval_dropped
    assert report.train_examples + report.eval_examples == 594 and report.eval_examples > 0
    for ex in data.train + data.eval:
        assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == EOS and ex.chosen_ids != ex.rejected_ids


def test_sample_script_is_deterministic_and_length_is_no_signal(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_sample_preferences", REPO / "scripts" / "make_sample_preferences.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--out", str(tmp_path / "p.jsonl")])
    assert out.read_bytes() == (REPO / "rlhf_cli" / "assets" / "sample_preferences.jsonl").read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(Counter(r["kind"] for r in rows)) == {"wrong_fact", "rude", "off_topic", "truncated", "repetition"}
    assert all(r["chosen"] != r["rejected"] for r in rows)
    mean_chosen = sum(len(r["chosen"]) for r in rows) / len(rows)
    mean_rejected = sum(len(r["rejected"]) for r in rows) / len(rows)
    assert abs(mean_chosen - mean_rejected) < 0.1 * mean_chosen
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    assert max(longer, shorter) < 0.5 * len(rows)


@pytest.mark.skipif(not HH_REAL.is_file(), reason=f"real HH-RLHF test split not found at {HH_REAL}")
def test_hh_rlhf_real_file_parses_with_few_reasoned_drops(tok):
    rows = load_rows(str(HH_REAL))
    out = adapt_preference_rows(rows, PreferenceDataConfig(source=str(HH_REAL), format="hh_rlhf"))
    reasons = Counter(bad.reason for bad in out.bad_rows)
    print(f"HH-RLHF harmless-base test: {len(rows)} rows -> {len(out.pairs)} pairs; bad rows: {dict(reasons)}")
    assert len(rows) == 2312
    assert len(out.pairs) + len(out.bad_rows) == len(rows) and not out.skipped
    # The only rows left out are the four whose chosen transcript ends with "Assistant:" and nothing after it.
    assert reasons == {"'chosen' ends with an empty 'Assistant:' reply": 4}
    assert sorted(int(bad.location.rsplit(":", 1)[1]) for bad in out.bad_rows) == [87, 517, 926, 1104]
    for pair in out.pairs[:150]:  # all 2,308 take ~6 s on a CPU; a slice keeps the suite fast
        ex = tokenize_pair(tok, pair, max_length=4096)
        assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == EOS
        assert ex.prompt_ids == tok.apply_chat_template(pair.prompt, add_generation_prompt=True, return_dict=False)


@pytest.mark.skipif(not HH_REAL.is_file(), reason=f"real HH-RLHF test split not found at {HH_REAL}")
def test_hh_rlhf_real_file_truncate_prompt_keeps_the_long_dialogues(tok):
    """At max_length=256, `drop` loses more than half of the first 400 pairs (long multi-turn prompts), biasing the
    data towards short dialogues; `truncate_prompt` keeps all but those whose final question and longer reply
    alone exceed 256 tokens. (All 2,308 pairs: drop 1,275, truncate_prompt 384 with 891 cut; ~25 s, hence a slice.)"""
    reports = {}
    for truncation in ("drop", "truncate_prompt"):
        config = PreferenceDataConfig(
            source=str(HH_REAL),
            format="hh_rlhf",
            max_length=256,
            truncation=truncation,
            eval_fraction=0.0,
            max_samples=400,
        )
        data = build_preference_datasets(config, tok, seed=0)
        print(f"HH-RLHF first 400 pairs, max_length=256, {truncation}: {data.report.summary()}")
        assert all(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) <= 256 for ex in data.train)
        reports[truncation] = data.report
    assert reports["drop"].dropped == {NO_ROOM: 123, TOO_LONG: 92} and reports["drop"].truncated == {}
    assert reports["truncate_prompt"].dropped == {TOO_LONG: 62}
    assert reports["truncate_prompt"].truncated == {PROMPT_TRUNCATED: 153}
    assert reports["truncate_prompt"].train_examples == 400 - 62 == reports["drop"].train_examples + 153
