"""Ctrl-C: inside the training loop the first one asks for a checkpoint (like SIGTERM), a second one stops at once;
after a Ctrl-C that stopped at once, the message says where the next run starts."""

import signal

import pytest

from rlhf_cli import cli, preempt
from rlhf_cli.run_dir import Run


@pytest.fixture(autouse=True)
def no_signal_yet(monkeypatch):
    monkeypatch.setattr(preempt, "_received", [])


def test_first_ctrl_c_in_the_loop_asks_for_a_checkpoint_a_second_stops_at_once(capsys):
    before = signal.getsignal(signal.SIGINT)
    with preempt.ctrl_c_saves():
        signal.raise_signal(signal.SIGINT)
        assert preempt.requested() and preempt.signal_name() == "Ctrl-C (SIGINT)"
        assert "Ctrl-C again stops at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # outside the loop Ctrl-C stops at once again


def test_preemption_signals_name_themselves():
    assert preempt.signal_name() == ""  # another rank's signal
    preempt._received.append(signal.SIGTERM)
    assert preempt.signal_name() == "SIGTERM"


def _interrupted_in(run):
    def stage(cfg, run):  # the shape of a stage's run(cfg, run), interrupted while loading
        raise KeyboardInterrupt

    try:
        stage(None, run)
    except KeyboardInterrupt as exc:
        return cli.after_ctrl_c(exc)


def test_after_ctrl_c_says_where_the_next_run_starts(tmp_path):
    run = Run(root=tmp_path / "demo", stage="sft")
    assert _interrupted_in(run) == "no checkpoint yet: the next run starts at step 0"
    for step in (5, 10):
        (run.checkpoints_dir / f"step-{step}").mkdir(parents=True)
        (run.checkpoints_dir / f"step-{step}" / "COMPLETE").touch()
    (run.checkpoints_dir / ".tmp-step-15").mkdir()  # cut mid-write: not resumable
    expected = f"the next run resumes from step 10 ({run.checkpoints_dir / 'step-10'})"
    assert _interrupted_in(run) == expected
    assert "if there is one" in _interrupted_in(None)  # before the run directory was opened


def test_ctrl_c_while_loading_swallowed_by_a_library_still_stops_before_the_first_step(monkeypatch):
    """A Ctrl-C while DeepSpeed or a model loads raises at once; if a bare `except:` on the way swallows it, the
    training loop refuses to start instead of training on as if nothing had been pressed."""
    monkeypatch.setattr(preempt, "_stopped_while_loading", [])
    monkeypatch.setattr(preempt, "_received", [])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *preempt.SIGNALS)}
    try:
        preempt.install()
        try:  # what an optional import guarded by a bare except does to it
            signal.raise_signal(signal.SIGINT)
        except BaseException:  # noqa: BLE001
            pass
        with pytest.raises(KeyboardInterrupt):
            with preempt.ctrl_c_saves():
                raise AssertionError("the loop must not start")
        assert not preempt.requested()  # a stop, not a checkpoint request
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
