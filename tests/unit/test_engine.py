"""The DeepSpeed config built from the typed settings, the LR schedule and the weight-decay groups."""

import re
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli import checkpoints
from rlhf_cli.config.compose import compose
from rlhf_cli.engine import ds_config, lr_schedule, param_groups


def _cfg(*overrides):
    return compose("sft", list(overrides))


def test_ds_config_batch_algebra_and_clipping():
    cfg = _cfg("optim.max_grad_norm=0.5")
    out = ds_config(cfg.deepspeed, cfg.optim, micro_batch=4, grad_accum=3, world_size=2)
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 24 and out["gradient_clipping"] == 0.5
    assert out["zero_optimization"] == {"stage": 0}
    assert "bf16" not in out and "fp16" not in out
    params = out["optimizer"]["params"]
    assert params["lr"] == cfg.optim.lr and params["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("group", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_ds_config_zero_groups(group):
    cfg = _cfg(f"deepspeed={group}")
    zero = ds_config(cfg.deepspeed, cfg.optim, 1, 1, 1)["zero_optimization"]
    assert zero["stage"] == int(group[4])
    assert ("offload_optimizer" in zero) == ("offload" in group) == ("offload_param" in zero)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_ds_config_precision_and_extra():
    cfg = _cfg("deepspeed.precision=bf16", "+deepspeed.extra.wall_clock_breakdown=true")
    out = ds_config(cfg.deepspeed, cfg.optim, 1, 1, 1)
    assert out["bf16"] == {"enabled": True} and out["wall_clock_breakdown"] is True
    cfg = _cfg("deepspeed.precision=fp16")
    assert ds_config(cfg.deepspeed, cfg.optim, 1, 1, 1)["fp16"]["enabled"] is True


def _lrs(schedule, total=10, warmup=2, floor=0.1):
    optim = SimpleNamespace(schedule=schedule, warmup_steps=warmup, warmup_ratio=0.0, min_lr_ratio=floor)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(optim, total)(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = _lrs("cosine")
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # cosine from 1 at step 2 to the floor 0.1 at step 10: halfway (step 6) is 0.55
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_lr_schedule_linear_and_constant():
    lin = _lrs("linear", floor=0.0)
    assert lin[2] == pytest.approx(1.0) and lin[6] == pytest.approx(0.5)
    assert _lrs("constant")[2:] == pytest.approx([1.0] * 8)


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_checkpoint_refused_when_the_disk_is_too_full(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from rlhf_cli.errors import UserError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10 * 2**30, 9 * 2**30, 2**30))
    checkpoints.check_disk_space(tmp_path / "not" / "yet" / "made", needed=2**29)  # fits: 0.5 GiB of 1 GiB free
    with pytest.raises(UserError, match=r"not enough disk space .* 2\.00 GiB needed, 1\.00 GiB free"):
        checkpoints.check_disk_space(tmp_path, needed=2 * 2**30)


def test_expected_checkpoint_size_uses_the_last_one(tmp_path):
    from rlhf_cli.checkpoints import expected_checkpoint_bytes
    from rlhf_cli.files import COMPLETE_MARKER

    step = tmp_path / "step-4"
    (step / "state").mkdir(parents=True)
    (step / "state" / "blob").write_bytes(b"x" * 1000)
    (step / COMPLETE_MARKER).write_text("")
    assert expected_checkpoint_bytes(engines=[], ckpt_dir=tmp_path) == 1000


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_frozen_model_is_eval_without_grad_in_the_engine_precision(precision, dtype):
    from rlhf_cli import engine as eng

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    ds = SimpleNamespace(zero_stage=0, precision=precision, offload_param=False)
    out = eng.frozen(model, ds, micro_batch=2, device=torch.device("cpu"))
    assert not out.training and not any(p.requires_grad for p in out.parameters())
    assert all(p.dtype == dtype for p in out.parameters())


# ---------------------------------------------------------------- resume from damaged checkpoints


@pytest.fixture(scope="module")
def process_group():
    """A 1-process gloo group for the module, kept to the end of the session: DeepSpeed caches the group, so a
    destroyed and re-created one would break the next engine."""
    import socket

    from rlhf_cli import engine as eng

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            mp.setenv(key, value)
        mp.setenv("MASTER_PORT", str(port))
        eng.init_distributed()
        yield


@pytest.fixture
def trained(tmp_path, process_group):
    """A real DeepSpeed engine on a tiny model, with committed checkpoints step-1..3 in `ckpt`; returns
    (engine, ckpt dir, the weights saved at each step)."""
    from rlhf_cli import engine as eng

    cfg = _cfg("optim.lr=0.1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine = eng.initialize(model, ds_config(cfg.deepspeed, cfg.optim, 2, 1, 1), cfg.optim, total_steps=10)
    ckpt, saved = tmp_path / "checkpoints", {}
    for step in (1, 2, 3):
        _train_one_step(engine)
        checkpoints.save_checkpoint(engine, ckpt, step, {"step": step}, keep_last=3)
        saved[step] = _weights(engine)
    _train_one_step(engine)  # the engine's live state is past every checkpoint
    return engine, ckpt, saved


def _train_one_step(engine):
    x = torch.randn(2, 4)
    engine.backward(engine(x).pow(2).sum())
    engine.step()


def _weights(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def _cut(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _state_file(step_dir):
    return next(step_dir.rglob("*model_states.pt"))


def test_resume_skips_a_damaged_checkpoint_and_sets_it_aside(trained):
    from rlhf_cli.files import complete_checkpoints

    engine, ckpt, saved = trained
    state_file = _state_file(ckpt / "step-3")
    _cut(state_file)
    path, client, notes = checkpoints.resume_latest(engine, ckpt)
    assert path == ckpt / "step-2" and client["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(_weights(engine), saved[2], strict=True))
    assert len(notes) == 1 and "damaged checkpoint(s)" in notes[0] and "resuming from the older step-2" in notes[0]
    assert f"step-3 ({state_file.relative_to(ckpt / 'step-3')}: file is" in notes[0] and "damaged-step-3" in notes[0]
    assert (ckpt / "damaged-step-3").is_dir() and complete_checkpoints(ckpt) == [ckpt / "step-1", ckpt / "step-2"]
    # A new step-3 does not collide with the damaged one, and pruning counts only the good checkpoints.
    checkpoints.save_checkpoint(engine, ckpt, 3, {"step": 3}, keep_last=2)
    assert complete_checkpoints(ckpt) == [ckpt / "step-2", ckpt / "step-3"] and (ckpt / "damaged-step-3").is_dir()
    # Damaged again: the name is taken, the next one gets a suffix.
    _cut(_state_file(ckpt / "step-3"))
    assert checkpoints.resume_latest(engine, ckpt)[0] == ckpt / "step-2" and (ckpt / "damaged-step-3-2").is_dir()


def test_resume_catches_damage_only_the_load_sees(trained, monkeypatch):
    """Damage the cheap file check cannot see is caught from the load error itself."""
    engine, ckpt, _ = trained
    monkeypatch.setattr(checkpoints, "_damaged_file", lambda path: None)
    _cut(_state_file(ckpt / "step-3"))
    path, client, notes = checkpoints.resume_latest(engine, ckpt)
    assert path == ckpt / "step-2" and client["step"] == 2
    assert re.search(r"step-3 \((OSError|RuntimeError): ", notes[0])  # torch's errors for a cut zip archive


def test_ranks_fall_back_together_when_one_rank_fails(trained, monkeypatch):
    """Rank 0 loads step-3 but rank 1 cannot read its shard: both go back to step-2, and rank 0 says why."""
    import torch.distributed as dist

    engine, ckpt, saved = trained

    calls = []

    def gather(out, mine):  # what all_gather_object returns when rank 1 fails on its first try (step-3) only
        calls.append(mine)
        out[:] = [mine, "EOFError: Ran out of input" if len(calls) == 1 else None]

    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(checkpoints, "barrier", lambda: None)
    path, client, notes = checkpoints.resume_latest(engine, ckpt)
    assert path == ckpt / "step-2" and client["step"] == 2 and "step-3 (rank 1: EOFError: Ran out of input)" in notes[0]
    assert all(torch.equal(a, b) for a, b in zip(_weights(engine), saved[2], strict=True))
    assert calls == [None, None]  # rank 0 itself loaded step-3, then went back with rank 1


def test_resume_when_no_checkpoint_loads_names_what_to_remove(trained):
    from rlhf_cli.errors import UserError

    engine, ckpt, _ = trained
    for step in (1, 2, 3):
        _cut(_state_file(ckpt / f"step-{step}"))
    with pytest.raises(UserError, match=r"no checkpoint in .* can be loaded, all are damaged: step-3 \(.*step-1 \("):
        checkpoints.resume_latest(engine, ckpt)
    with pytest.raises(UserError, match=re.escape(f"rm -r {ckpt / 'step-3'} {ckpt / 'step-2'} {ckpt / 'step-1'}")):
        checkpoints.resume_latest(engine, ckpt)
    assert not list(ckpt.glob("damaged-*"))  # nothing renamed when there is nothing to resume from
    assert checkpoints.resume_latest(engine, ckpt / "none") == (None, None, [])


def test_policy_engine_has_no_dropout_left_after_lora(process_group):
    """The policy of DPO / PPO with `model.lora.dropout=0.1`: once the adapters are non-zero (B is 0 at init, which
    hides any dropout), two train-mode forwards are identical and equal the eval-mode forward, so pi / pi_old and
    pi / pi_ref start at 1."""
    from rlhf_cli.models import load_tokenizer
    from rlhf_cli.stages.common import policy_engine

    cfg = compose(
        "dpo",
        [
            "model.name_or_path=builtin:tiny-llama",
            "model.lora.enabled=true",
            "model.lora.dropout=0.1",
            "model.tiny.hidden_size=64",
            "model.tiny.intermediate_size=176",
            "model.tiny.num_hidden_layers=2",
        ],
    )
    tok = load_tokenizer(cfg.model)
    engine = policy_engine(cfg, cfg.model, tok, total_steps=1, world_size=1)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(5, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    engine.train()
    with torch.no_grad():
        first, second = engine(input_ids=ids).logits, engine(input_ids=ids).logits
        engine.eval()
        evaluated = engine(input_ids=ids).logits
    assert torch.equal(first, second) and torch.equal(first, evaluated)
