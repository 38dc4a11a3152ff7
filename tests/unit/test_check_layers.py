"""scripts/check_layers.py finds import circles and imports that point up a layer, those inside functions too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_layers.py"
spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "rlhf_cli" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "rlhf_cli"


def test_an_upward_import_inside_a_function_and_a_circle_are_found(tmp_path):
    pkg = write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "config/__init__.py": "",
            "config/a.py": "from rlhf_cli.config import b\n",
            "config/b.py": "def f():\n    from rlhf_cli.config.a import x\n",
            "run_dir.py": "from rlhf_cli.errors import UserError\n",
            "metrics.py": "def g():\n    import rlhf_cli.cli\n",
            "cli.py": "from rlhf_cli import run_dir, metrics\n",
        },
    )
    graph = layers.imports(pkg)
    assert graph["rlhf_cli.cli"] == {"rlhf_cli.run_dir", "rlhf_cli.metrics"}
    assert layers.upward(graph) == [("rlhf_cli.metrics", "rlhf_cli.cli")]
    assert layers.circles(graph) == [["rlhf_cli.cli", "rlhf_cli.metrics"], ["rlhf_cli.config.a", "rlhf_cli.config.b"]]


def test_the_package_has_no_circle_and_no_upward_import():
    graph = layers.imports(SCRIPT.parents[1] / "rlhf_cli")
    assert "rlhf_cli.registry" in graph and graph["rlhf_cli.cli"]  # the real package, lazy imports included
    assert layers.circles(graph) == []
    assert layers.upward(graph) == []
