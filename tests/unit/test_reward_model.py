"""Reward models: score position (right padding, pad == EOS), the encoder path, head init, dropout off, LoRA head."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import TINY
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_cli.config.schema import LoRAConfig, ModelConfig, TinyModelConfig
from rlhf_cli.data import PreferencePair, collate_preference, tokenize_pair
from rlhf_cli.errors import UserError
from rlhf_cli.models import merged_for_export, tiny_tokenizer
from rlhf_cli.models.reward import (
    apply_reward_lora,
    check_max_length,
    load_reward_model,
    load_reward_tokenizer,
    scalar_head,
    sequence_logits,
    sequence_scores,
)

BUILTIN = ModelConfig(name_or_path="builtin:tiny-llama", tiny=TINY)
WORDS = "what is two plus two it four five the answer sky blue green hello".split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def decoder(tok):
    return load_reward_model(BUILTIN, BUILTIN.name_or_path, tok, seed=0).eval()


def _alone(model: LlamaForSequenceClassification, ids: list[int]) -> float:
    """The hand-built score: backbone and head on the unpadded sequence, head output at its last token."""
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    return float(model.score(hidden)[0, -1, 0])


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _chat(tok, prompt: str, reply: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(ids)[:-1]  # drop the template's newline after <|end|>: the EOS is the last real token


def test_decoder_scores_at_last_real_token_with_right_padding(tok, decoder):
    rows = [_chat(tok, "What is 2 + 2?", "2 + 2 = 4."), _chat(tok, "Hi", "Hello, how can I help you today?")]
    assert all(r[-1] == tok.eos_token_id for r in rows) and len(rows[0]) != len(rows[1])
    ids, mask = _right_padded(rows, tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(decoder, ids, mask)
        expected = [_alone(decoder, r) for r in rows]
    assert scores.shape == (2,)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # pad != EOS here, so transformers' own pad-id pooling agrees.
    with torch.no_grad():
        torch.testing.assert_close(decoder(input_ids=ids, attention_mask=mask).logits[:, 0], scores)


def test_decoder_scores_at_eos_when_pad_equals_eos(tok, decoder):
    eos = tok.eos_token_id
    rows = [_chat(tok, "What is 2 + 2?", "2 + 2 = 4."), _chat(tok, "Hi", "Hello, how can I help you today?")]
    ids, mask = _right_padded(rows, pad=eos)
    original = decoder.config.pad_token_id
    decoder.config.pad_token_id = eos
    try:
        with torch.no_grad():
            scores = sequence_scores(decoder, ids, mask)
            hf = decoder(input_ids=ids, attention_mask=mask).logits[:, 0]
            at_eos = [_alone(decoder, r) for r in rows]
            before_eos = [_alone(decoder, r[:-1]) for r in rows]
    finally:
        decoder.config.pad_token_id = original
    torch.testing.assert_close(scores, torch.tensor(at_eos), rtol=1e-5, atol=1e-5)
    # The pitfall this guards against (docs/algorithms.md sections 1.5 and 3.2): HF pools the last id != pad, one token
    # early.
    torch.testing.assert_close(hf, torch.tensor(before_eos), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hf, scores)


def test_scores_of_collated_pairs_match_each_sequence_alone(tok, decoder):
    pairs = [PreferencePair("t:1", [{"role": "user", "content": "Name a color."}], "Blue.", "The sky is green today.")]
    pairs.append(PreferencePair("t:2", [{"role": "user", "content": "What is 3 + 4?"}], "3 + 4 = 7.", "3 + 4 = 8."))
    examples = [tokenize_pair(tok, p, max_length=128) for p in pairs]
    batch = collate_preference(examples, tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(decoder, batch["input_ids"], batch["attention_mask"])
        expected = [_alone(decoder, e.prompt_ids + e.chosen_ids) for e in examples]
        expected += [_alone(decoder, e.prompt_ids + e.rejected_ids) for e in examples]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def _bert_folder(path, hidden: int = 32, num_labels: int | None = None, dropout: float = 0.1):
    """A tiny BERT backbone (or classifier) and a word-level BERT-style tokenizer without chat template or EOS."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if num_labels is None:
        BertModel(config).save_pretrained(path)
    else:
        config.num_labels = num_labels
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return ModelConfig(name_or_path=str(path))


def test_encoder_tokenizer_gets_pair_template_and_scores_use_cls_pooling(tmp_path):
    cfg = _bert_folder(tmp_path / "bert")
    tok = load_reward_tokenizer(cfg)
    assert tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
        tokenize=False,
    )
    assert text == "[CLS]what is two plus two[SEP]four[SEP]"
    pair = PreferencePair("t:1", [{"role": "user", "content": "what is two plus two"}], "it is four", "five")
    ex = tokenize_pair(tok, pair, max_length=64)
    assert ex.prompt_ids[0] == tok.cls_token_id and ex.prompt_ids[-1] == tok.sep_token_id
    assert ex.chosen_ids[-1] == ex.rejected_ids[-1] == tok.sep_token_id
    model = load_reward_model(cfg, cfg.name_or_path, tok).eval()
    assert scalar_head(model)[0] == "classifier"
    batch = collate_preference([ex], tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        expected = model.classifier(pooled)[:, 0]
        alone = model(input_ids=torch.tensor([ex.prompt_ids + ex.rejected_ids])).logits[0, 0]
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores[1], alone, rtol=1e-5, atol=1e-5)  # the padded row scores as it does alone


def test_encoder_max_length_is_checked_against_its_positions(tmp_path, decoder):
    cfg = _bert_folder(tmp_path / "bert")
    model = load_reward_model(cfg, cfg.name_or_path, load_reward_tokenizer(cfg))
    check_max_length(model, 64)
    with pytest.raises(UserError, match="data.max_length=65 is longer than the 64 positions"):
        check_max_length(model, 65)
    check_max_length(decoder, 10_000)  # RoPE decoders are not limited


def test_new_head_init_statistics(tok, tmp_path):
    wide = ModelConfig(
        name_or_path="builtin:tiny-llama",
        tiny=TinyModelConfig(
            hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8
        ),
    )
    weight = load_reward_model(wide, wide.name_or_path, tok, seed=3).score.weight.detach()
    assert weight.shape == (1, 1024)
    assert abs(float(weight.mean())) < 3 / math.sqrt(1025) / math.sqrt(1024)  # 3 standard errors
    assert float(weight.std()) == pytest.approx(1 / math.sqrt(1025), rel=0.1)
    again = load_reward_model(wide, wide.name_or_path, tok, seed=3).score.weight.detach()
    assert torch.equal(weight, again)  # seeded: every rank builds the same head
    cfg = _bert_folder(tmp_path / "bert", hidden=512)
    head = load_reward_model(cfg, cfg.name_or_path, load_reward_tokenizer(cfg)).classifier
    assert float(head.weight.detach().std()) == pytest.approx(1 / math.sqrt(513), rel=0.15)
    assert torch.count_nonzero(head.bias) == 0


def test_trained_head_is_kept_and_other_label_counts_replaced(tok, tmp_path):
    model = load_reward_model(BUILTIN, BUILTIN.name_or_path, tok, seed=0)
    with torch.no_grad():
        model.score.weight.fill_(0.5)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    again = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "rm")), str(tmp_path / "rm"), tok, seed=1)
    assert torch.all(again.score.weight == 0.5)
    cfg = _bert_folder(tmp_path / "three", num_labels=3)
    three = load_reward_model(cfg, cfg.name_or_path, load_reward_tokenizer(cfg))
    assert three.config.num_labels == 1 and three.classifier.weight.shape == (1, 32)
    assert torch.count_nonzero(three.classifier.bias) == 0  # re-initialised, not the 3-class head's bias


def test_dropout_off_in_config_and_modules(tmp_path):
    cfg = _bert_folder(tmp_path / "bert", dropout=0.5)
    model = load_reward_model(cfg, cfg.name_or_path, load_reward_tokenizer(cfg)).train()
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    ids = torch.tensor([[2, 5, 6, 3, 9, 3]])
    first = sequence_scores(model, ids, torch.ones_like(ids))
    assert torch.equal(first, sequence_scores(model, ids, torch.ones_like(ids)))  # train mode, yet deterministic


def test_lora_keeps_head_trainable_and_merged_export_holds_it(tok):
    model = load_reward_model(BUILTIN, BUILTIN.name_or_path, tok, seed=0)
    peft_model = apply_reward_lora(model, LoRAConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    ids = torch.tensor([[3, 10, 11, 1, 4, 12, 1], [3, 10, 1, 4, 12, 1, 0]])
    mask = (torch.arange(7) < torch.tensor([[7], [6]])).long()
    with torch.no_grad():
        scalar_head(peft_model)[1].modules_to_save["default"].weight.add_(1.0)
        before = sequence_scores(peft_model, ids, mask)
        merged = merged_for_export(peft_model)
        torch.testing.assert_close(sequence_scores(merged, ids, mask), before)
    assert type(merged).__name__ == "LlamaForSequenceClassification" and isinstance(merged.score, torch.nn.Linear)


def test_sequence_logits_of_a_multi_label_decoder(tok, decoder):
    rows = [_chat(tok, "Hi", "Hello."), _chat(tok, "What is 2 + 2?", "2 + 2 = 4.")]
    ids, mask = _right_padded(rows, tok.pad_token_id)
    three = LlamaForSequenceClassification(decoder.config.__class__(**{**decoder.config.to_dict(), "num_labels": 3}))
    three.model.load_state_dict(decoder.model.state_dict())
    with torch.no_grad():
        logits = sequence_logits(three.eval(), ids, mask)
        hidden = three.model(input_ids=torch.tensor([rows[0]])).last_hidden_state
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], three.score(hidden)[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one output"):
        sequence_scores(three, ids, mask)


def test_truncated_reward_model_is_named_by_its_loaders(tok, decoder, tmp_path):
    """A reward model folder cut short (an interrupted copy): `rlhf rm`/`ppo` (critic, stage.reward.model) and
    `rlhf score` each stop with the file named, before the library reads it."""
    from rlhf_cli.commands.score import load as score_load

    folder = tmp_path / "runs" / "demo" / "rm" / "final"
    decoder.save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(full // 2)
    expected = f"{weights} is incomplete or corrupt (file is {full // 2} bytes, its header says {full})"
    cfg = ModelConfig(name_or_path=str(folder))
    for source in (folder, folder.parent):  # the stage folder resolves to its final/
        with pytest.raises(UserError, match=re.escape(expected)):
            load_reward_model(cfg, str(source), tok)
        with pytest.raises(UserError, match=re.escape(expected)):
            score_load(str(source))
