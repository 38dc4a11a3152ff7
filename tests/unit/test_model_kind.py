"""What a checkpoint is, read from its files without loading weights (models/kind.py): a causal LM or a sequence
classifier, and whether the classifier's head is in the checkpoint; the refusals built on it, and `load_classifier`'s
check after loading (the path of hub ids)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_cli.config.schema import LoRAConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models import apply_lora, tiny_tokenizer
from rlhf_cli.models.classifier import load_classifier
from rlhf_cli.models.kind import (
    CAUSAL_LM,
    CLASSIFIER,
    Checkpoint,
    check_policy,
    check_reward_sources,
    check_scorer,
    inspect_checkpoint,
    inspect_folder,
)
from rlhf_cli.models.reward import apply_reward_lora

SHAPE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
LORA = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _save(model, tok, folder, **kw):
    model.save_pretrained(folder, **kw)
    tok.save_pretrained(folder)
    return folder


def _config(tok):
    return LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=1, **SHAPE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("kinds")
    config = _config(tok)
    lm = _save(LlamaForCausalLM(config), tok, root / "lm")
    clf = _save(LlamaForSequenceClassification(config), tok, root / "clf")
    headless = _save(LlamaForSequenceClassification(config), tok, root / "headless")
    weights = headless / "model.safetensors"
    save_file(
        {k: v for k, v in load_file(weights).items() if not k.startswith("score.")}, weights, metadata={"format": "pt"}
    )
    sharded = _save(LlamaForSequenceClassification(config), tok, root / "sharded", max_shard_size="20KB")
    bin_lm = _save(LlamaForCausalLM(config), tok, root / "bin_lm")
    torch.save(load_file(bin_lm / "model.safetensors"), bin_lm / "pytorch_model.bin")  # an older checkpoint's layout
    (bin_lm / "model.safetensors").unlink()
    return SimpleNamespace(root=root, lm=lm, clf=clf, headless=headless, sharded=sharded, bin_lm=bin_lm)


def test_inspection_tells_causal_lms_from_classifiers_with_and_without_their_head(folders):
    assert inspect_folder(folders.lm) == Checkpoint(CAUSAL_LM, "LlamaForCausalLM", False)
    assert inspect_folder(folders.clf) == Checkpoint(CLASSIFIER, "LlamaForSequenceClassification", True)
    assert inspect_folder(folders.headless) == Checkpoint(CLASSIFIER, "LlamaForSequenceClassification", False)
    assert json.loads((folders.sharded / "model.safetensors.index.json").read_text())  # really sharded
    assert inspect_folder(folders.sharded).head is True  # the head found in one of the shards
    assert inspect_folder(folders.bin_lm) == Checkpoint(CAUSAL_LM, "LlamaForCausalLM", None)  # .bin: not read
    assert inspect_checkpoint("builtin:tiny-llama")[1].kind == CAUSAL_LM
    assert inspect_checkpoint("org/some-model") == ("org/some-model", None)  # a hub id: judged after loading


def test_a_run_dir_stage_folder_is_read_at_its_final(folders, tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "final").symlink_to(folders.lm)
    source, found = inspect_checkpoint(str(tmp_path / "sft"))
    assert source == str(tmp_path / "sft" / "final") and found.kind == CAUSAL_LM


def test_lora_adapter_folders(folders, tok, tmp_path):
    config = _config(tok)
    with_head = apply_reward_lora(LlamaForSequenceClassification(config), LORA)
    with_head.save_pretrained(tmp_path / "rm_adapter")
    found = inspect_folder(tmp_path / "rm_adapter")
    assert found == Checkpoint(CLASSIFIER, "a SEQ_CLS LoRA adapter", True) and not found.scores_with_random_head
    policy = apply_lora(LlamaForCausalLM(config), LORA)
    policy.save_pretrained(tmp_path / "lm_adapter")
    assert inspect_folder(tmp_path / "lm_adapter") == Checkpoint(CAUSAL_LM, "a CAUSAL_LM LoRA adapter", False)
    # A classifier adapter saved without the head: the head is its base model's, here a causal LM's (none).
    no_head = apply_lora(LlamaForSequenceClassification(config), LORA, "SEQ_CLS")
    no_head.peft_config["default"].modules_to_save = None
    no_head.save_pretrained(tmp_path / "bare")
    with open(tmp_path / "bare" / "adapter_config.json") as fh:
        adapter = json.load(fh)
    weights = load_file(tmp_path / "bare" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".score." not in k}, tmp_path / "bare" / "adapter_model.safetensors")
    for base, head in ((folders.lm, False), (folders.clf, True)):
        adapter["base_model_name_or_path"] = str(base)
        (tmp_path / "bare" / "adapter_config.json").write_text(json.dumps(adapter))
        assert inspect_folder(tmp_path / "bare").head is head


def test_check_scorer_refuses_a_causal_lm_and_a_headless_classifier_naming_the_setting(folders):
    check_scorer(str(folders.clf), "stage.reward.model=x")  # a trained classifier passes
    with pytest.raises(UserError) as err:
        check_scorer(str(folders.lm), "stage.reward.model=stage:sft", "; use rlhf generate")
    message = str(err.value)
    assert message.startswith(
        f"stage.reward.model=stage:sft ({folders.lm}) is a causal language model (LlamaForCausalLM), no score head: "
    )
    assert "randomly initialised head" in message and "rlhf rm" in message and message.endswith("; use rlhf generate")
    with pytest.raises(UserError, match=r"its head missing from the checkpoint") as err:
        check_scorer(str(folders.headless), f"model={folders.headless}", "; use rlhf generate")
    message = str(err.value)  # the hint about `rlhf generate` is for causal LMs only
    assert message.startswith(f"model={folders.headless} is a sequence classifier") and "generate" not in message
    with pytest.raises(UserError, match=r"^\S+/bin_lm is a causal language model \(LlamaForCausalLM\), no score"):
        check_scorer(str(folders.bin_lm), None)  # no setting known: the folder alone
    with pytest.raises(UserError, match="built-in tiny Llama"):
        check_scorer("builtin:tiny-llama", "stage.gold_reward=builtin:tiny-llama")


def test_check_policy_refuses_a_classifier(folders):
    check_policy(str(folders.lm), "model.name_or_path=x")
    check_policy("builtin:tiny-llama", "model.name_or_path=builtin:tiny-llama")
    with pytest.raises(UserError) as err:
        check_policy(str(folders.clf), "stage.policies: stage `rm`")
    assert str(err.value).startswith(
        f"stage.policies: stage `rm` ({folders.clf}) is a sequence classifier (LlamaForSequenceClassification)"
    )
    assert "a policy must be a causal language model" in str(err.value)


def test_check_reward_sources_checks_the_models_a_stage_scores_with(folders):
    run = SimpleNamespace(resolve_source=lambda name: str(folders.lm) if name == "stage:sft" else name)

    def stage(model, function=None, gold=None):
        return SimpleNamespace(reward=SimpleNamespace(model=model, function=function, functions=[]), gold_reward=gold)

    check_reward_sources(stage(str(folders.clf), gold="pkg.mod:gold"), run)  # a gold function is not a model
    check_reward_sources(stage("stage:sft", function="pkg.mod:f"), run)  # a reward function wins over the model
    with pytest.raises(UserError, match=r"^stage\.reward\.model=stage:sft \("):
        check_reward_sources(stage("stage:sft"), run)
    with pytest.raises(UserError, match=r"^stage\.gold_reward=stage:sft \("):
        check_reward_sources(stage(str(folders.clf), gold="stage:sft"), run)
    eval_stage = SimpleNamespace(reward=SimpleNamespace(model="stage:sft", function=None), gold="stage:sft")
    with pytest.raises(UserError, match=r"^stage\.gold=stage:sft \("):
        check_reward_sources(eval_stage, run, gold_key="stage.gold", reward=False)


def test_load_classifier_refuses_before_loading_and_checks_the_loaded_head(folders, tok, tmp_path, monkeypatch):
    tokenizer, model = load_classifier(str(folders.clf), "model=x")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    import rlhf_cli.models.load as load_module

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model that should be refused before loading")

    with monkeypatch.context() as patch:
        patch.setattr(load_module, "load_pretrained", no_load)
        with pytest.raises(UserError, match="causal language model"):
            load_classifier(str(folders.lm), "stage.reward.model=x")
    # What the files cannot tell (a backbone alone, no head name in it): loading tells, as for a hub id.
    bert = BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    _save(BertModel(bert), tok, tmp_path / "bert")
    assert inspect_folder(tmp_path / "bert").kind is None
    with pytest.raises(UserError) as err:
        load_classifier(str(tmp_path / "bert"), "stage.gold_reward=x")
    assert str(err.value).startswith(
        f"stage.gold_reward=x ({tmp_path / 'bert'}) is a BertModel checkpoint, no "
        "classifier head (missing: classifier.bias, classifier.weight): "
    )


def test_a_cut_weight_file_is_reported_before_the_kind(folders, tmp_path):
    """Whatever the folder is meant to be, its files must be replaced first: the damage is the message."""
    cut = tmp_path / "cut"
    shutil.copytree(folders.lm, cut)
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    for check in (lambda: check_scorer(str(cut), "model=x"), lambda: check_policy(str(cut), "model.name_or_path=x")):
        with pytest.raises(UserError, match="model.safetensors is incomplete or corrupt"):
            check()
