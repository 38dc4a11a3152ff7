"""The stage context's model config: `stage:<name>` sources of the model and of the tokenizer both resolve to that
stage's final/ (the tokenizer used to stay `stage:sft` everywhere but in the reward model's stage)."""

from rlhf_cli.config.compose import compose
from rlhf_cli.stages.context import merged_model_config


class FakeRun:
    def resolve_source(self, spec: str) -> str:
        return f"/runs/demo/{spec.removeprefix('stage:')}/final" if spec.startswith("stage:") else spec


def test_stage_sources_of_the_model_and_the_tokenizer_resolve():
    model = merged_model_config(compose("dpo", ["model.tokenizer=stage:rm"]), FakeRun())
    assert model.name_or_path == "/runs/demo/sft/final" and model.tokenizer == "/runs/demo/rm/final"
    assert merged_model_config(compose("dpo", []), FakeRun()).tokenizer is None
    assert merged_model_config(compose("sft", ["model.tokenizer=/tok"]), FakeRun()).tokenizer == "/tok"
