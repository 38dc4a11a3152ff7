"""The wheel carries the configs and the built-in assets, so an installed `rlhf` needs no checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_configs_and_assets(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("rlhf_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_yaml = {f"rlhf_cli/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped_yaml <= names
    for asset in (
        "sample_dolly.jsonl",
        "sample_preferences.jsonl",
        "tiny_tokenizer/tokenizer.json",
        "tiny_tokenizer/tokenizer_config.json",
    ):
        assert f"rlhf_cli/assets/{asset}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # Installed from the wheel (no checkout on the path), `rlhf` composes from the packaged configs.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = "from rlhf_cli.config.compose import config_dir, compose; print(config_dir()); compose('sft', [])"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(site / "rlhf_cli" / "configs")
