"""`rlhf rm` end to end on the tiny model (after a short `rlhf sft`), its errors and accuracy gate, an encoder
(BERT) reward model, a slice of HH-RLHF, and `rlhf score` with a reward model and with a 3-class classifier."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, manifest, metrics, rlhf
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_cli import cli
from rlhf_cli.commands import score as score_cmd
from rlhf_cli.config.schema import PairDataConfig
from rlhf_cli.data import build_preference_datasets, collate_preference
from rlhf_cli.data.sources import ASSETS_DIR
from rlhf_cli.models import tiny_tokenizer
from rlhf_cli.models.reward import sequence_logits

HH = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
QUICK = [*FAST, "stage.save_every=0", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> Path:
    """A run directory holding a short sft and an rm trained from it (eval every 4 steps, gate at 0)."""
    root = tmp_path_factory.mktemp("e2e")
    runs = root / "runs"
    sft = rlhf("sft", *QUICK, f"run.root={runs}", "run.name=e2e", "stage.max_steps=4", cwd=root)
    assert sft.returncode == 0, sft.stderr
    args = [*QUICK, f"run.root={runs}", "run.name=e2e", "stage.max_steps=8", "stage.eval_every=4"]
    rm = rlhf("rm", *args, "stage.save_every=4", "stage.min_eval_accuracy=0", cwd=root)
    assert rm.returncode == 0, rm.stderr
    return runs / "e2e"


def _eval_rewards(run_dir: Path, final: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards (N,) of the rm stage's eval pairs, recomputed with plain transformers."""
    cfg = OmegaConf.load(run_dir / "rm" / "config.yaml")
    tok = AutoTokenizer.from_pretrained(final)
    data = build_preference_datasets(PairDataConfig(**OmegaConf.to_container(cfg.data)), tok, seed=cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch = collate_preference(data.eval, tok.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return scores.chunk(2)


def _check_reload(run_dir: Path) -> dict:
    """final/ loads with AutoModelForSequenceClassification and scores the eval pairs as training did."""
    final = run_dir / "rm" / "final"
    rec = manifest(run_dir)["stages"]["rm"]["metrics"]
    chosen, rejected = _eval_rewards(run_dir, final)
    both = torch.cat([chosen, rejected])
    assert len(chosen) == rec["eval_pairs"] > 0
    assert float((chosen > rejected).float().mean()) == pytest.approx(rec["eval_accuracy"], abs=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(rec["eval_margin"], rel=1e-4, abs=1e-5)
    assert float(both.mean()) == pytest.approx(rec["reward_mean"], rel=1e-4, abs=1e-5)
    assert float(both.std(unbiased=False)) == pytest.approx(rec["reward_std"], rel=1e-4)
    return rec


def test_rm_end_to_end_after_sft(e2e):
    rec = manifest(e2e)["stages"]["rm"]
    assert rec["status"] == "completed" and rec["outputs"] == {"final": "rm/final"}
    assert rec["inputs"]["model"] == "sft/final" and rec["inputs"]["model_name_or_path"] == "stage:sft"
    assert rec["inputs"]["data"] == "builtin:sample_preferences" and rec["metrics"]["steps"] == 8
    m = _check_reload(e2e)
    assert 0 < m["reward_std"] and 0.0 <= m["eval_accuracy"] <= 1.0 and m["data"]["train_examples"] == 533
    steps = [r for r in metrics(e2e, "rm") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("accuracy", "margin", "grad_norm", "pairs/s", "tokens", "tok/s", "reward_chosen", "lr"):
        assert all(r[key] is not None for r in steps), key
    assert all(r["pairs"] == 8 and r["loss"] > 0 for r in steps)
    evals = [r["step"] for r in metrics(e2e, "rm") if "eval_accuracy" in r]
    assert evals == [4, 8] and all("reward_std" in r for r in metrics(e2e, "rm") if "eval_accuracy" in r)
    # A completed stage drops its resume checkpoints (stage.keep_checkpoints=false) and says so in its summary.
    assert not (e2e / "rm" / "checkpoints").exists() and rec["summary"]["disk_bytes"]["checkpoints"] > 0
    assert "target_tokens" not in rec["metrics"] and rec["summary"]["headline"]["eval_accuracy"]
    config = json.loads((e2e / "rm" / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == 0 and (e2e / "rm" / "final" / "chat_template.jinja").is_file()
    stats = json.loads((e2e / "rm" / "final" / "reward_stats.json").read_text())  # read by ppo's rm_stats
    assert stats == {k: m[k] for k in ("reward_mean", "reward_std", "eval_pairs")}


def test_rm_without_sft_names_the_command(tmp_path):
    res = rlhf("rm", *QUICK, f"run.root={tmp_path / 'runs'}", "run.name=nosft", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "rlhf sft run.name=nosft" in res.stderr and "Traceback" not in res.stderr


def test_accuracy_gate_fails_the_stage_and_keeps_final(tmp_path):
    runs = tmp_path / "runs"
    args = [*QUICK, f"run.root={runs}", "run.name=gate", "model.name_or_path=builtin:tiny-llama", "stage.max_steps=2"]
    res = rlhf("rm", *args, "stage.min_eval_accuracy=1.0", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "below stage.min_eval_accuracy=1;" in res.stderr and "Try training longer" in res.stderr
    rec = manifest(runs / "gate")["stages"]["rm"]
    assert rec["status"] == "failed" and "min_eval_accuracy" in rec["error"]
    assert 0 <= rec["metrics"]["eval_accuracy"] < 1.0 and "reward_mean" in rec["metrics"]
    AutoModelForSequenceClassification.from_pretrained(runs / "gate" / "rm" / "final")  # kept for inspection


def _bert_folder(folder: Path) -> Path:
    """A tiny BERT backbone and a WordPiece tokenizer trained on the sample pairs (no chat template, no EOS)."""
    rows = [json.loads(line) for line in (ASSETS_DIR / "sample_preferences.jsonl").read_text().splitlines()]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = (r[k] for r in rows for k in ("prompt", "chosen", "rejected"))
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # as BERT's own tokenizer
    )
    config = BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return _save_seeded(BertModel, config, tok, folder)


def test_encoder_reward_model_trains_reloads_and_scores(tmp_path):
    bert = _bert_folder(tmp_path / "bert")
    runs = tmp_path / "runs"
    args = [*QUICK, f"run.root={runs}", "run.name=bert", f"model.name_or_path={bert}", "stage.max_steps=6"]
    res = rlhf("rm", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    final = runs / "bert" / "rm" / "final"
    rec = _check_reload(runs / "bert")
    assert rec["data"]["train_examples"] == 533
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1
    assert tok.eos_token == "[SEP]" and tok.chat_template  # the pair template travels with the checkpoint
    assert model.config.hidden_dropout_prob == 0.0
    prompt, response = "What is the plural of 'glass'?", "The plural of 'glass' is 'glasses'."
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert text == f"[CLS]{prompt}[SEP]{response}[SEP]"
    with torch.no_grad():
        expected = float(model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0])
    assert _score_one(["model=" + str(final), f"prompt={prompt}", f"response={response}"]) == pytest.approx(
        expected, rel=1e-4, abs=1e-5
    )


@pytest.mark.skipif(not HH.is_file(), reason=f"{HH} is not here")
def test_short_rm_run_on_hh_rlhf_slice(tmp_path):
    runs = tmp_path / "runs"
    args = [
        *QUICK,
        "data=hh_rlhf",
        f"data.source={HH}",
        "data.eval_split=null",
        "data.eval_fraction=0.02",
        "data.max_samples=64",
        "data.max_length=256",
        "model.name_or_path=builtin:tiny-llama",
        f"run.root={runs}",
        "run.name=hh",
        "stage.max_steps=4",
    ]
    res = rlhf("rm", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with gzip.open(HH, "rt") as fh:
        n_rows = sum(1 for line in fh if line.strip())
    data = manifest(runs / "hh")["stages"]["rm"]["metrics"]["data"]
    assert data["rows_read"] == n_rows and data["train_examples"] <= 64 and data["eval_examples"] > 0
    assert "eval_accuracy" in manifest(runs / "hh")["stages"]["rm"]["metrics"]


# ---------------------------------------------------------------- rlhf score


def _score_one(args: list[str]) -> float:
    out, err, code = _cli_score(args)
    assert code == 0, err
    assert out.startswith("score: "), out  # `score: <value> (<model>, <what the value is>)`
    return float(out.split()[1])


def _cli_score(args: list[str]) -> tuple[str, str, int]:
    """`rlhf score ...` in this process (dispatch, error handling and exit code as on the command line)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    cli.COMMANDS.setdefault("score", ("rlhf_cli.commands.score", "rlhf score"))  # until cli.py registers it
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["score", *args])
    return out.getvalue(), err.getvalue(), code


def test_score_jsonl_and_single_pair_with_the_trained_rm(e2e, tmp_path):
    rows = [
        {"prompt": "What is the plural of 'glass'?", "response": "The plural of 'glass' is 'glasses'.", "id": 1},
        {"prompt": [{"role": "user", "content": "Is 69 even or odd?"}], "response": "69 is odd."},
        {"prompt": "Give an antonym of the word 'up'.", "response": "Whatever. The opposite of 'up' is 'down'."},
    ]
    src, dst = tmp_path / "pairs.jsonl", tmp_path / "out" / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_args = [f"run={e2e.name}", f"root={e2e.parent}"]
    _, err, code = _cli_score([*run_args, f"input={src}", f"output={dst}"])
    assert code == 0 and "scored 3 rows" in err, err
    scored = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == rows  # other fields kept
    # By hand: the chat rendering up to the reply's EOS, through plain transformers' own pooling (pad != EOS).
    final = e2e / "rm" / "final"
    tok, model = AutoTokenizer.from_pretrained(final), AutoModelForSequenceClassification.from_pretrained(final)
    for row, out in zip(rows, scored, strict=True):
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        ids = tok.apply_chat_template([*prompt, {"role": "assistant", "content": row["response"]}], return_dict=False)
        ids = list(ids)[: len(ids) - ids[::-1].index(tok.eos_token_id)]  # up to the last EOS
        with torch.no_grad():
            expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert out["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    single = _score_one([f"model={final}", f"prompt={rows[0]['prompt']}", f"response={rows[0]['response']}"])
    assert single == pytest.approx(scored[0]["score"], rel=1e-5, abs=1e-6)


def test_score_errors_name_the_row_and_the_fix(e2e, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n\n" + json.dumps({"prompt": "Hi"}) + "\n")
    run_args = [f"run={e2e.name}", f"root={e2e.parent}"]
    _, err, code = _cli_score([*run_args, f"input={src}", f"output={tmp_path / 'o.jsonl'}"])
    assert code == 2 and f"{src}:3" in err and "'response'" in err, err
    _, err, code = _cli_score([*run_args, "prompt=Hi"])
    assert code == 2 and "response=" in err
    _, err, code = _cli_score([*run_args, "prompt=Hi", "response=Yo", "reduc=prob"])
    assert code == 2 and "did you mean `reduce`" in err
    _, err, code = _cli_score(["run=missing", f"root={e2e.parent}", "prompt=Hi", "response=Yo"])
    assert code == 2 and "no run directory" in err


def _save_seeded(model_class, config, tok, folder: Path) -> Path:
    """A freshly initialised (seed 0) model of `config` and its tokenizer, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _classifier_folder(folder: Path) -> Path:
    """A tiny 3-label decoder classifier (e.g. a toxicity model) with named labels."""
    tok = tiny_tokenizer()
    labels = {0: "neutral", 1: "toxic", 2: "severe"}
    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, id2label=labels, **shape)
    return _save_seeded(LlamaForSequenceClassification, config, tok, folder)


def test_score_with_a_three_class_classifier(tmp_path):
    folder = _classifier_folder(tmp_path / "clf")
    rows = [{"prompt": "Hi", "response": "Hello, how can I help?"}, {"prompt": "Hi", "response": "Go away."}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, err, code = _cli_score([f"model={folder}", f"input={src}", f"output={tmp_path / 'x.jsonl'}"])
    assert code == 2 and "3 labels (neutral, toxic, severe)" in err and "label=" in err
    results = {}
    for label, reduce in (("toxic", "prob"), ("1", "logit"), ("2", "prob")):
        out = tmp_path / f"{label}-{reduce}.jsonl"
        _, err, code = _cli_score(
            [f"model={folder}", f"input={src}", f"output={out}", f"label={label}", f"reduce={reduce}"]
        )
        assert code == 0, err
        results[label, reduce] = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    tok, model = tiny_tokenizer(), LlamaForSequenceClassification.from_pretrained(folder).eval()
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        ids = list(tok.apply_chat_template(messages, return_dict=False))[:-1]  # up to <|end|>
        with torch.no_grad():
            logits = sequence_logits(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        probs = logits.softmax(-1)
        assert results["toxic", "prob"][i] == pytest.approx(float(probs[1]), rel=1e-5)
        assert results["1", "logit"][i] == pytest.approx(float(logits[1]), rel=1e-5, abs=1e-6)
        assert results["2", "prob"][i] == pytest.approx(float(probs[2]), rel=1e-5)
        assert math.isclose(sum(float(p) for p in probs), 1.0, rel_tol=1e-6)
    _, err, code = _cli_score([f"model={folder}", "prompt=Hi", "response=Yo", "label=rude"])
    assert code == 2 and "label `rude` is not one of" in err
    assert score_cmd.label_index(model.config, "severe") == 2


def test_score_without_chat_template_uses_the_sentence_pair(tmp_path):
    """An off-the-shelf encoder classifier (no chat template): (prompt, response) as a sentence pair, with
    token_type_ids, or the response alone with text=response."""
    folder = _bert_folder(tmp_path / "clf")
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).save_pretrained(folder)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForSequenceClassification.from_pretrained(folder)
    prompt, response = "Is 69 even or odd?", "Whatever. 69 is odd."
    with torch.no_grad():
        pair = model(**tok(prompt, response, return_tensors="pt")).logits[0].softmax(-1)
        alone = model(**tok(response, return_tensors="pt")).logits[0]
    assert tok(prompt, response)["token_type_ids"][-1] == 1  # the pair encoding marks the response segment
    args = [f"model={folder}", f"prompt={prompt}", f"response={response}", "label=1"]
    assert _score_one([*args, "reduce=prob"]) == pytest.approx(float(pair[1]), rel=1e-5)
    assert _score_one([*args, "text=response"]) == pytest.approx(float(alone[1]), rel=1e-5, abs=1e-6)
