"""The SLURM tests (`make test-slurm`; `make test` deselects the `slurm` marker): the sbatch scripts run as jobs on a
real single-host SLURM cluster, which `slurm_cluster` starts with scripts/slurm_cluster.sh when a test first needs it
(installing munge and slurm-wlm when they are missing) and stops at the end if it started it. Where that cannot be
done (not root, no apt, a real cluster's slurm.conf on this host) the tests are skipped with the reason, or fail with
RLHF_REQUIRE_SLURM=1 (CI: .ci/run)."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by rlhf scripts/slurm_cluster.sh"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: jobs on the single-host SLURM cluster (tests/slurm, `make test-slurm`; not in `make test`)"
    )


def _unavailable(reason: str) -> None:
    if os.environ.get("RLHF_REQUIRE_SLURM") == "1":
        pytest.fail(f"RLHF_REQUIRE_SLURM=1 and the SLURM test cluster is not available: {reason}", pytrace=False)
    pytest.skip(f"no SLURM test cluster: {reason}")


def _ours_running() -> bool:
    """scripts/slurm_cluster.sh's cluster runs (its config, its daemons up), started by hand or an earlier session."""
    return subprocess.run(["bash", str(CLUSTER), "running"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[list[str]]:
    """The cluster's node names (idle), started here if it is not running; stopped at the end if started here."""
    if CONF.is_file() and MARK not in CONF.read_text(errors="replace"):
        _unavailable(
            f"{CONF} is not scripts/slurm_cluster.sh's (a real cluster's config?); the tests do not submit "
            "jobs to a real cluster"
        )
    started = False
    if not _ours_running():
        if os.geteuid() != 0:
            _unavailable("starting it needs root: run `sudo scripts/slurm_cluster.sh start` first")
        try:
            res = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            _unavailable("scripts/slurm_cluster.sh start took over 15 minutes")
        if res.returncode != 0:
            _unavailable(f"scripts/slurm_cluster.sh start failed: {(res.stdout + res.stderr)[-2000:]}")
        started = True
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True)
    yield sorted(set(nodes.stdout.split()))
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
