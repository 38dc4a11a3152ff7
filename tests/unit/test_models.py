"""Models: shipped tokenizer and data, the tiny Llama, loading from folders, pad handling, LoRA merge."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from helpers import ASSETS, REPO, TINY
from huggingface_hub import constants as hf_constants
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models import (
    BUILTIN_TINY,
    apply_lora,
    build_tiny_llama,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    merged_for_export,
    tiny_tokenizer,
    tiny_tokenizer_path,
)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, messages, gen_prompt=False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt)["input_ids"])


# ---------------------------------------------------------------- shipped tokenizer and data


def test_shipped_tokenizer_tokens(tok):
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|end|>", 1)
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token is None
    assert tok.padding_side == "right"
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [2, 3, 4]
    assert 1000 < len(tok) <= 2048
    # Loading the folder directly (what from_pretrained on a copied tokenizer does) gives the same thing.
    again = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    assert again.chat_template == tok.chat_template == _script("make_tiny_tokenizer").CHAT_TEMPLATE
    assert again.eos_token_id == 1 and again.pad_token_id == 0


def test_round_trip_and_no_implicit_specials(tok):
    for text in ["What is 86 plus 66?", "  two  spaces\n\nand lines\n", "café, naïve, 日本, 🙂", ""]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert not set(ids) & set(tok.all_special_ids)  # no BOS/EOS is added behind the caller's back
    assert tok("<|user|>")["input_ids"] == [3]  # special tokens in text stay single ids


def test_chat_template_prefix_stable(tok):
    conv = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "assistant", "content": "12 plus 30 is 42."},
        {"role": "user", "content": "\nAnd reversed?\n"},
        {"role": "assistant", "content": "\n 42 plus\n\n12."},
    ]
    newline = tok("\n")["input_ids"]
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        prompt, full = _ids(tok, conv[:i], gen_prompt=True), _ids(tok, conv[: i + 1])
        assert full[: len(prompt)] == prompt
        # The assistant turn is content + <|end|> + "\n", tokenized on its own exactly as in context.
        turn = full[len(prompt) :]
        assert turn == tok(m["content"])["input_ids"] + [tok.eos_token_id] + newline
    rendered = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhat is 12 plus 30?<|end|>\n<|assistant|>\n"


def test_data_script_deterministic_and_correct(tmp_path):
    data = _script("make_sample_data")
    out = data.main(["--out", str(tmp_path / "d.jsonl")])
    assert out.read_bytes() == (ASSETS / "sample_dolly.jsonl").read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 400 and len({(r["instruction"], r["context"]) for r in rows}) == 400
    assert all(set(r) == {"instruction", "context", "response", "category"} and r["response"] for r in rows)
    assert len({r["category"] for r in rows}) >= 7
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a // b}
    checked = 0
    for r in rows:  # every worked arithmetic answer is right
        for a, op, b, c in re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", r["response"]):
            assert ops[op](int(a), int(b)) == int(c)
            checked += 1
        if r["instruction"].startswith("Sort these words alphabetically: "):
            words = r["instruction"].split(": ", 1)[1].rstrip(".").split(", ")
            assert r["response"] == ", ".join(sorted(words))
    assert checked >= 30


def test_tokenizer_script_deterministic(tmp_path):
    script = _script("make_tiny_tokenizer")
    script.main(["--out", str(tmp_path / "tok")])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (ASSETS / "tiny_tokenizer" / name).read_bytes(), name


# ---------------------------------------------------------------- tiny model


def test_build_tiny_llama_deterministic_and_shaped(tok):
    rng_before = torch.random.get_rng_state()
    a, b, c = (build_tiny_llama(TINY, tok, seed) for seed in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is not consumed
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 32, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 64)
    assert cfg.attention_dropout == 0.0 and not cfg.tie_word_embeddings
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    assert (cfg.pad_token_id, cfg.eos_token_id) == (0, 1)
    gen = a.generation_config
    assert (gen.pad_token_id, gen.eos_token_id, gen.do_sample) == (0, 1, False)


def test_forward_shapes(tok):
    model = build_tiny_llama(TINY, tok, 0)
    batch = tok(["What is 2 plus 3?", "Hi"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)


def test_generation_stops_at_eos(tok):
    """Overfit two conversations, then batch-generate: each stops at <|end|> and is padded after it."""
    model = build_tiny_llama(TINY, tok, 0)
    pairs = [("Name a color.", "Blue."), ("What is the capital of France?", "The capital of France is Paris.")]
    prompts = [_ids(tok, [{"role": "user", "content": q}], gen_prompt=True) for q, _ in pairs]
    targets = [tok(a)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = sum(
            model(input_ids=torch.tensor([p + t]), labels=torch.tensor([[-100] * len(p) + t])).loss
            for p, t in zip(prompts, targets, strict=True)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tok.padding_side = "left"
    try:
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    finally:
        tok.padding_side = "right"
    out = model.generate(**batch, max_new_tokens=20)[:, batch["input_ids"].shape[1] :].tolist()
    assert len(out[0]) < 20  # stopped early: the longer answer ended with eos, not at the length limit
    for row, target in zip(out, targets, strict=True):
        assert row[: len(target)] == target
        assert all(t == tok.pad_token_id for t in row[len(target) :])


# ---------------------------------------------------------------- loading


def test_builtin_load(tok):
    cfg = ModelConfig(name_or_path=BUILTIN_TINY, tiny=TINY)
    loaded = load_tokenizer(cfg)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.padding_side == "right"
    model = load_causal_lm(cfg, loaded, seed=3, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tok)


def test_load_causal_lm_from_local_folder_and_stage_dir(tmp_path, tok):
    model = build_tiny_llama(TINY, tok, 5).eval()
    final = tmp_path / "runs" / "demo" / "sft" / "final"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    ids = torch.tensor([tok("What is 5 plus 7?")["input_ids"]])
    # The stage folder itself resolves to its final/; the final/ folder loads directly.
    for path in (final, final.parent):
        cfg = ModelConfig(name_or_path=str(path))
        loaded_tok = load_tokenizer(cfg)
        assert loaded_tok.chat_template == tok.chat_template and loaded_tok.pad_token_id == 0
        loaded = load_causal_lm(cfg, loaded_tok, seed=0).eval()
        assert isinstance(loaded, LlamaForCausalLM)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def _small_tokenizer(specials: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE over a few lines, whose special tokens are exactly `specials`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["hello world", "the cat sat on the mat"] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)


def test_missing_pad_is_added_and_embeddings_resized(tmp_path):
    no_pad = _small_tokenizer(["<|end|>"], eos_token="<|end|>")
    no_pad.save_pretrained(tmp_path)
    base = build_tiny_llama(TINY, no_pad, 0).eval()
    base.save_pretrained(tmp_path)
    old = len(no_pad)
    cfg = ModelConfig(name_or_path=str(tmp_path), chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    tok = load_tokenizer(cfg)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == old != tok.eos_token_id and len(tok) == old + 1
    model = load_causal_lm(cfg, tok, seed=0).eval()
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        assert emb.weight.shape[0] == old + 1
        assert torch.allclose(emb.weight[old], emb.weight[:old].mean(0))
    assert model.config.pad_token_id == model.generation_config.pad_token_id == old
    ids = torch.tensor([no_pad("the cat sat")["input_ids"]])
    with torch.no_grad():  # existing tokens' logits are untouched by the new row
        assert torch.allclose(model(ids).logits[..., :old], base(ids).logits, atol=1e-6)


def test_pad_equal_to_eos_reuses_reserved_token(tmp_path):
    specials = ["<|end|>", "<|finetune_right_pad_id|>"]
    _small_tokenizer(specials, eos_token="<|end|>", pad_token="<|end|>").save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), chat_template="{{ messages[0].content }}")
    tok = load_tokenizer(cfg)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(tmp_path)))  # reused, nothing added


def test_chat_template_required_and_checked(tmp_path):
    _small_tokenizer(["<|end|>", "<pad>"], eos_token="<|end|>", pad_token="<pad>").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model.chat_template"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(UserError, match="model.chat_template does not render"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path), chat_template="{% for m in messages %}"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tmp_path), chat_template="{{ messages[0].content }}"))
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello"


def test_missing_local_path_is_user_error(tmp_path, tok):
    missing = tmp_path / "no" / "such" / "model"
    cfg = ModelConfig(name_or_path=str(missing))
    with pytest.raises(UserError, match="no such folder") as err:
        load_tokenizer(cfg)
    assert str(missing) in str(err.value)
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_causal_lm(cfg, tok, seed=0)
    with pytest.raises(UserError, match="unknown built-in"):
        load_tokenizer(ModelConfig(name_or_path="builtin:huge-llama"))


def test_unfetchable_hub_id_is_user_error(monkeypatch, tok):
    # Offline mode makes the hub client fail at once instead of retrying a network that is not there.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(name_or_path="rlhf-cli-tests/definitely-not-a-model")
    for load in (lambda: load_tokenizer(cfg), lambda: load_causal_lm(cfg, tok, seed=0)):
        with pytest.raises(UserError, match="HF_HUB_OFFLINE") as err:
            load()
        assert "rlhf-cli-tests/definitely-not-a-model" in str(err.value) and "local folder" in str(err.value)


def test_attn_implementation(tok):
    eager = load_causal_lm(ModelConfig(attn_implementation="eager", tiny=TINY), tok, seed=0)
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="model.attn_implementation='no_such_kernel'"):
        load_causal_lm(ModelConfig(attn_implementation="no_such_kernel", tiny=TINY), tok, seed=0)


# ---------------------------------------------------------------- LoRA


def test_lora_wraps_and_merges_to_same_outputs(tok):
    model = apply_lora(build_tiny_llama(TINY, tok, 0), LoRAConfig(enabled=True, r=4, alpha=8))
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # lora_B starts at zero; make the adapters do something so the merge is tested
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    ids = torch.tensor([tok("Sort these words: cat, sun, apple.")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merged_for_export(model, merge=True)
        assert isinstance(merged, LlamaForCausalLM) and not isinstance(merged, PeftModel)
        assert not [k for k in merged.state_dict() if "lora" in k or "base_model" in k]
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.equal(model(input_ids=ids).logits, expected)  # the live PeftModel kept its adapters
    assert merged_for_export(model, merge=False) is model
    plain = build_tiny_llama(TINY, tok, 0)
    assert merged_for_export(plain) is plain


def test_lora_unknown_target_is_user_error(tok):
    with pytest.raises(UserError, match=r"c_attn.*q_proj"):
        apply_lora(build_tiny_llama(TINY, tok, 0), LoRAConfig(target_modules=["q_proj", "c_attn"]))


def test_gradient_checkpointing_with_lora(tok):
    model = apply_lora(build_tiny_llama(TINY, tok, 0), LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    enable_gradient_checkpointing(model)
    model.train()
    ids = torch.tensor([tok("What is 3 plus 4?")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.config.use_cache is False
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_disable_dropout_reaches_functional_attention_dropout():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_cli.models import disable_dropout

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            attention_dropout=0.5,
        )
    )
    model.train()
    ids = torch.randint(0, 50, (2, 8))
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    assert not torch.allclose(a, model(ids).logits)  # dropout is live before
    disable_dropout(model)
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    torch.testing.assert_close(a, model(ids).logits)
    assert model.config.attention_dropout == 0.0


# ---------------------------------------------------------------- damaged weight files


def _saved_folder(tmp_path, tok, **save_kwargs):
    folder = tmp_path / "model"
    build_tiny_llama(TINY, tok, 0).save_pretrained(folder, **save_kwargs)
    tok.save_pretrained(folder)
    return folder


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_truncated_safetensors_is_named_before_loading(tmp_path, tok):
    from rlhf_cli.commands.generate import GenerateArgs, generate

    folder = _saved_folder(tmp_path, tok)
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    _truncate(weights, full - 100)
    expected = f"{weights} is incomplete or corrupt (file is {full - 100} bytes, its header says {full}): re-export"
    cfg = ModelConfig(name_or_path=str(folder))
    assert load_tokenizer(cfg).eos_token  # the tokenizer does not read the weights
    for load in (lambda: load_causal_lm(cfg, tok, seed=0), lambda: generate(str(folder), GenerateArgs(prompt="hi"))):
        with pytest.raises(UserError, match=re.escape(expected)):
            load()


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda path: _truncate(path, 5), "file is 5 bytes, less than the 8-byte header length"),
        (lambda path: _truncate(path, 40), "file is 40 bytes, its header alone says"),
        (lambda path: path.write_bytes((2).to_bytes(8, "little") + b"{["), "its header is not a safetensors header"),
    ],
)
def test_safetensors_header_checks(tmp_path, tok, damage, problem):
    from rlhf_cli.models.weights import check_weight_files

    folder = _saved_folder(tmp_path, tok)
    check_weight_files(folder)  # intact
    damage(folder / "model.safetensors")
    with pytest.raises(
        UserError, match=re.escape(f"{folder / 'model.safetensors'} is incomplete or corrupt ({problem}")
    ):
        check_weight_files(folder)


def test_sharded_checkpoint_needs_every_shard_intact(tmp_path, tok):
    folder = _saved_folder(tmp_path, tok, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2
    cfg = ModelConfig(name_or_path=str(folder))
    _truncate(folder / shards[1], 1000)
    with pytest.raises(
        UserError, match=re.escape(f"{folder / shards[1]} is incomplete or corrupt (file is 1000 bytes")
    ):
        load_causal_lm(cfg, tok, seed=0)
    (folder / shards[1]).unlink()
    with pytest.raises(UserError, match=re.escape(f"{index} names {shards[1]}, missing from {folder}")):
        load_causal_lm(cfg, tok, seed=0)


def test_damage_the_header_check_cannot_see_is_still_one_message(tmp_path, tok):
    """A header that frames the file correctly but that safetensors rejects (an unknown dtype), and an old-style
    (pickle) .bin cut short: the library's own error becomes a UserError naming the folder."""
    folder = _saved_folder(tmp_path, tok)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b'"F32"', b'"X32"'))
    cfg = ModelConfig(name_or_path=str(folder))
    with pytest.raises(
        UserError, match=re.escape(f"the weights in {folder} are incomplete or corrupt (SafetensorError")
    ):
        load_causal_lm(cfg, tok, seed=0)
    weights.unlink()
    state = build_tiny_llama(TINY, tok, 0).state_dict()
    old_bin = folder / "pytorch_model.bin"
    torch.save(state, old_bin, _use_new_zipfile_serialization=False)
    _truncate(old_bin, old_bin.stat().st_size // 2)
    with pytest.raises(UserError, match=re.escape(f"the weights in {folder} are incomplete or corrupt (RuntimeError")):
        load_causal_lm(cfg, tok, seed=0)
    torch.save(state, old_bin)  # the zip format: its directory is at the end, so the header check sees a cut
    _truncate(old_bin, old_bin.stat().st_size // 2)
    with pytest.raises(UserError, match=re.escape(f"{old_bin} is incomplete or corrupt (file is")):
        load_causal_lm(cfg, tok, seed=0)


def test_unreadable_cached_hub_weights_say_how_to_clear_the_cache():
    from safetensors import SafetensorError

    from rlhf_cli.models.load import load_pretrained

    class Broken:  # what from_pretrained raises for a hub id whose cached file was cut short
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    with pytest.raises(UserError, match="the cached weights of 'org/model' are incomplete or corrupt") as err:
        load_pretrained(Broken, "org/model", ModelConfig(name_or_path="org/model"))
    assert "`hf cache rm model/org/model`" in str(err.value)
