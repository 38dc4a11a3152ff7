"""A refused stage leaves nothing behind: no run directory for a new run name (nor the folders made above it), and in an
existing run no manifest entry, no stage folder, nothing changed; a refusal that needs no model comes before torch
loads (rlhf_cli/stage_state.py `open_run` and `check_sources`, run_dir.py `Run.discard`, cli.py `record_stop`).
Each CLI case is one fresh interpreter that stops before torch (about 0.5 s)."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rlhf_cli.cli import record_stop
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.files import COMPLETE_MARKER
from rlhf_cli.provenance import new_completion
from rlhf_cli.run_dir import _take_lock
from rlhf_cli.stage_state import open_run

HEAVY = ("torch", "transformers", "deepspeed", "peft")
# The CLI in a fresh interpreter, then the heavy libraries it imported.
PROBE = f"""
import sys
from rlhf_cli.cli import main
code = main(sys.argv[1:])
print("LOADED", *[m for m in {HEAVY!r} if m in sys.modules])
sys.exit(code)
"""


def run_cli(args: list[str], cwd, **env: str) -> tuple[int, set[str], str]:
    """(exit code, heavy libraries imported, stderr) of `rlhf <args>`; `env` adds to the environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env={**base, **env}, timeout=120
    )
    loaded = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded, res.stderr
    return res.returncode, set(loaded[-1]), res.stderr


def snapshot(root) -> dict[str, bytes | None]:
    """Every path under `root` with a file's bytes. The lock file is left out: each opening writes its holder."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
        if p.name != ".lock"
    }


def existing_run(runs):
    """Run `x`: sft completed and intact, rm interrupted with a complete resume checkpoint."""
    root = runs / "x"
    (root / "sft" / "final").mkdir(parents=True)
    (root / "sft" / "final" / "config.json").write_text("{}")
    (root / "rm" / "checkpoints" / "step-2").mkdir(parents=True)
    (root / "rm" / "checkpoints" / "step-2" / COMPLETE_MARKER).write_text("step 2\n")
    outputs = {"final": "sft/final"}
    sft = {
        "status": "completed",
        "outputs": outputs,
        "completion": new_completion(root, outputs),
        "ended_at": "2026-12-01T10:00:00+0000",
    }
    stages = {"sft": sft, "rm": {"status": "interrupted", "last_step": 2}}
    (root / "manifest.json").write_text(json.dumps({"run": "x", "stages": stages}, indent=2) + "\n")
    return root


def _run_cfg(runs, name="x", overwrite=False):
    return SimpleNamespace(root=str(runs), name=name, overwrite=overwrite)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["rm"], "run `rlhf sft run.name=new` first"),
        (["ppo"], "run `rlhf sft run.name=new` first"),
        (["sft", "data.source=./missing.jsonl"], "data.source: file not found: ./missing.jsonl"),
        (["sft", "data.source=builtin:nope"], "no built-in dataset 'builtin:nope'"),
        (["sft", "model.name_or_path=./no_model"], "'./no_model': no such folder"),
        (["rm", "launcher.nproc_per_node=2"], "run `rlhf sft run.name=new` first"),  # before torchrun starts
        (["pipeline", "sft.data.source=./missing.jsonl"], "file not found: ./missing.jsonl"),  # its first stage
    ],
)
def test_a_refusal_on_a_new_run_name_leaves_no_run_directory_and_loads_no_torch(tmp_path, args, needle):
    runs = tmp_path / "runs"  # not there either: the folders made above the run directory go too
    code, loaded, err = run_cli([*args, f"run.root={runs}", "run.name=new"], tmp_path)
    assert code == 2 and needle in err, err
    assert not loaded
    assert not runs.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ppo", "stage.reward.model=stage:rm", "stage.reward.function=null"], "stage `rm` of run `x` is interrupted"),
        (["sft"], "stage `sft` of run `x` is already complete"),
        (["sft", "run.overwrite=true", "data.source=./missing.jsonl"], "file not found"),  # nothing set aside
        (["rm", "data.source=./missing.jsonl"], "file not found"),  # a stage with saved work: its record stays
        (["dpo", "model.tokenizer=./no_tokenizer"], "'./no_tokenizer': no such folder"),  # a new stage: no entry
    ],
)
def test_a_refusal_in_an_existing_run_changes_nothing_in_it(tmp_path, args, needle):
    root = existing_run(tmp_path / "runs")
    before = snapshot(root)
    code, loaded, err = run_cli([*args, f"run.root={root.parent}", "run.name=x"], tmp_path)
    assert code == 2 and needle in err, err
    assert not loaded
    assert snapshot(root) == before


def test_rank_zero_under_a_launcher_refuses_before_joining_the_group(tmp_path):
    """torchrun / srun start the ranks themselves: rank 0 checks the run directory before torch and DeepSpeed load
    (the other ranks would then wait at the rendezvous, as they did for a refusal after it)."""
    runs = tmp_path / "runs"
    code, loaded, err = run_cli(
        ["rm", f"run.root={runs}", "run.name=new"], tmp_path, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"
    )
    assert code == 2 and "run `rlhf sft run.name=new` first" in err, err
    assert not loaded and not runs.exists()


def test_a_check_alone_leaves_nothing(tmp_path):
    runs = tmp_path / "runs"
    open_run(_run_cfg(runs, "new"), "sft", check_only=True)
    assert not runs.exists()
    root = existing_run(runs)
    before = snapshot(root)
    open_run(_run_cfg(runs), "rm", check_only=True)
    assert snapshot(root) == before


def test_a_refusal_after_the_run_is_opened_undoes_what_this_command_made(tmp_path):
    """A refusal that needs the model or the data's rows (a bad row under data.bad_rows=fail) comes once the stage
    runs, after `open_run` made the run directory: `record_stop` removes it again, and it can be opened anew."""
    runs = tmp_path / "deep" / "runs"
    run = open_run(_run_cfg(runs, "new"), "sft")
    assert run.stage_dir.is_dir() and (run.root / ".lock").is_file()
    record_stop(run, "sft", DataError("bad row at data.jsonl:3"))
    assert not (tmp_path / "deep").exists()
    open_run(_run_cfg(runs, "new"), "sft").release()  # free, and made again
    assert (runs / "new" / "sft").is_dir()


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_a_refusal_after_the_run_is_opened_keeps_an_existing_run_as_it_was(tmp_path, stage):
    """rm had saved work and an `interrupted` record: both stay (a refusal used to mark it failed); dpo had nothing:
    it gets no folder and no entry."""
    root = existing_run(tmp_path / "runs")
    before = snapshot(root)
    run = open_run(_run_cfg(root.parent), stage)
    record_stop(run, stage, UserError("refused"))
    assert snapshot(root) == before
    open_run(_run_cfg(root.parent), stage).release()  # the lock was released


def test_a_stage_that_began_is_recorded_when_it_stops(tmp_path):
    runs = tmp_path / "runs"
    run = open_run(_run_cfg(runs, "new"), "sft")
    run.begin("seed: 1\n", "abc", {}, None)
    record_stop(run, "sft", UserError("eval_accuracy 0.5 < stage.min_eval_accuracy"))
    run.release()
    record = json.loads((runs / "new" / "manifest.json").read_text())["stages"]["sft"]
    assert record["status"] == "failed" and "min_eval_accuracy" in record["error"]
    assert (runs / "new" / "sft" / "config.yaml").is_file()


@pytest.mark.parametrize("made_again", [False, True])
def test_a_lock_file_removed_meanwhile_is_not_held(tmp_path, monkeypatch, made_again):
    """Between a command's opening of the lock file and its lock, a refused command removed the run directory it had
    made (and another may have made it again): the lock held must be on the file that is there now, else two commands
    could each hold one (`_take_lock` retries)."""
    root, real, calls = tmp_path / "r", fcntl.flock, []

    def flock(fh, op):
        if not calls:
            calls.append(op)
            shutil.rmtree(root)
            if made_again:
                root.mkdir()
                (root / ".lock").touch()
        return real(fh, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    run = open_run(_run_cfg(tmp_path, "r"), "sft")
    assert calls and os.path.samestat(os.fstat(run._lock.fileno()), os.stat(root / ".lock"))
    assert run.made == ([] if made_again else [root])  # only what this command made is its to remove
    run.release()
    assert _take_lock(tmp_path / "gone") is None  # no folder: nothing to lock, nothing made


def test_only_names_the_loaders_refuse_at_once_are_checked_before_loading(tmp_path):
    """A hub id (dataset or model) is the loaders' to fetch, an existing file or folder is read: neither is refused."""
    from rlhf_cli.stage_state import check_sources

    data, model = tmp_path / "d.jsonl", tmp_path / "m"
    data.write_text("{}\n")
    model.mkdir()
    check_sources({"data.source": "databricks/databricks-dolly-15k", "model.name_or_path": "Qwen/Qwen2.5-0.5B"})
    check_sources(
        {
            "data.source": str(data),
            "model.name_or_path": str(model),
            "model.tokenizer": "builtin:tiny-llama",
            "stage.reference": "stage:sft",
        }
    )
    with pytest.raises(DataError, match="file not found"):
        check_sources({"data.source": str(tmp_path / "gone.json.gz")})
    with pytest.raises(UserError, match="unknown built-in model"):
        check_sources({"model.name_or_path": "builtin:huge"})
