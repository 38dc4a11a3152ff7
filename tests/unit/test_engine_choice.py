"""Which rollout engine runs (config/rollout_engine.py): as asked, `auto` by what is installed and visible, one clear
message when vllm is asked for and missing; `rlhf explain` says the same as the stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_cli.config import rollout_engine as re_mod
from rlhf_cli.config.online import RolloutConfig
from rlhf_cli.errors import UserError


@pytest.mark.parametrize(
    "requested,installed,gpu,engine,why",
    [
        ("hf", True, True, "hf", "rollout.engine=hf"),
        ("vllm", True, False, "vllm", "rollout.engine=vllm"),
        ("auto", False, True, "hf", "vllm not installed"),
        ("auto", True, False, "hf", "no GPU"),
        ("auto", True, True, "vllm", "vllm installed and a GPU visible"),
    ],
)
def test_choice_and_reason(monkeypatch, requested, installed, gpu, engine, why):
    monkeypatch.setattr(re_mod, "vllm_installed", lambda: installed)
    name, reason = re_mod.choose_engine(requested, gpu)
    assert name == engine and why in reason


def test_vllm_asked_for_and_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(re_mod, "vllm_installed", lambda: False)
    with pytest.raises(UserError, match=r"rollout.engine=vllm, but vllm is not installed: .*make install-vllm"):
        re_mod.choose_engine("vllm", True)


def test_explain_lines_name_the_engine_and_vllms_memory(monkeypatch):
    monkeypatch.setattr(re_mod, "vllm_installed", lambda: True)
    monkeypatch.setattr(re_mod, "gpu_visible", lambda: True)
    lines = re_mod.engine_lines(RolloutConfig(engine="auto", vllm_gpu_memory_utilization=0.4))
    assert lines[0] == "rollout engine: vllm (rollout.engine=auto: vllm installed and a GPU visible)"
    assert "up to 0.4 of each GPU" in lines[1]
    assert re_mod.engine_lines(RolloutConfig()) == ["rollout engine: hf (rollout.engine=hf)"]


def test_explain_of_an_online_stage_prints_the_engine_without_loading_torch():
    code = (
        "import sys; from rlhf_cli.commands.explain import report; from rlhf_cli.config.compose import compose; "
        "print(report(compose('grpo', ['rollout.engine=auto']), 'grpo')); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    name, why = re_mod.choose_engine("auto", re_mod.gpu_visible())
    assert f"rollout engine: {name} ({why})" in out
    assert out.strip().endswith("False")
