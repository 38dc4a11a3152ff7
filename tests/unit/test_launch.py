"""Launch helpers: the deepspeed launcher's --local_rank, the torchrun command of a self-launch."""

import os

import pytest

from rlhf_cli.config.compose import compose
from rlhf_cli.errors import UserError
from rlhf_cli.launch import strip_local_rank, torchrun_command


def test_deepspeed_launcher_local_rank_is_taken_out(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=3", "optim.lr=1"]) == ["optim.lr=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank(["optim.lr=1", "--local_rank", "1"]) == ["optim.lr=1"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_self_launch_command_forwards_usr1_and_keeps_overrides():
    cfg = compose("sft", ["launcher.nproc_per_node=4", "launcher.nnodes=2", "launcher.node_rank=1"])
    cmd = torchrun_command(cfg.launcher, "sft", ["optim.lr=1e-4", "launcher.nproc_per_node=4"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=127.0.0.1"} <= set(cmd)
    single = torchrun_command(compose("sft", ["launcher.nproc_per_node=2"]).launcher, "sft", [])
    assert "--standalone" in single and not any(a.startswith("--master_port") for a in single)
    assert any(a.startswith("--signals_to_handle=") and "SIGUSR1" in a for a in cmd)
    assert cmd[-5:] == ["-m", "rlhf_cli", "sft", "optim.lr=1e-4", "launcher.nproc_per_node=4"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["launcher.nproc_per_node=0"], "config key `launcher.nproc_per_node` is 0, must be >= 1"),
        (["launcher.nnodes=0"], "config key `launcher.nnodes` is 0, must be >= 1"),
        (
            ["launcher.nnodes=2", "launcher.node_rank=2"],
            "config key `launcher.node_rank` is 2, must be in [0, launcher.nnodes) (launcher.nnodes is 2)",
        ),
        (["launcher.node_rank=-1"], "config key `launcher.node_rank` is -1, must be in [0, launcher.nnodes)"),
        (["launcher.master_port=0"], "config key `launcher.master_port` is 0, must be in [1, 65535]"),
        (["launcher.master_port=65536"], "config key `launcher.master_port` is 65536, must be in [1, 65535]"),
    ],
)
def test_launcher_values_out_of_range_are_refused(overrides, message):
    """nproc_per_node=0 used to run one process silently; a node rank beyond nnodes would hang at rendezvous."""
    with pytest.raises(UserError) as err:
        compose("sft", overrides)
    assert message in str(err.value)


def test_launcher_edges_are_accepted():
    cfg = compose("sft", ["launcher.nnodes=2", "launcher.node_rank=1", "launcher.master_port=65535"])
    assert cfg.launcher.node_rank == 1
