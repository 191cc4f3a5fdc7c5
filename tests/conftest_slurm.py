"""The `slurm_cluster` fixture: a real single-node SLURM with accounting, for launcher tests.

Loaded as a pytest plugin (`pytest_plugins = ["tests.conftest_slurm"]`). If a cluster is
already up (e.g. CI ran slurm/local/up.sh and exported SLURM_CONF), the fixture uses it and
leaves it running; otherwise it runs up.sh itself and down.sh at the end of the session. Where
no cluster can start (not root, no Debian packages, no network for apt) the tests skip with the
reason on a developer machine and fail under CI=true.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "slurm" / "local" / "up.sh"
DOWN = REPO / "slurm" / "local" / "down.sh"


def _skip_or_fail(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def _responds(env: dict) -> bool:
    """slurmctld answers and accounting works (sacct is what submitit's states rest on)."""
    if not shutil.which("scontrol") or not env.get("SLURM_CONF"):
        return False
    try:
        for cmd in (["scontrol", "ping"], ["sacct", "-n", "-X", "-S", "now"]):
            if subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode != 0:
                return False
    except subprocess.TimeoutExpired:
        return False
    return True


def _local_dir() -> str:
    return os.environ.get("SLURM_LOCAL_DIR", "/tmp/dipddpm-slurm")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the environment the cluster needs (SLURM_CONF, ...), also set in os.environ."""
    env = dict(os.environ)
    if not env.get("SLURM_CONF"):
        conf = Path(_local_dir()) / "etc" / "slurm.conf"
        if conf.exists():
            env["SLURM_CONF"] = str(conf)
    started = False
    if not _responds(env):
        if os.geteuid() != 0:
            _skip_or_fail("no SLURM cluster, and slurm/local/up.sh needs root")
        if not shutil.which("apt-get") and not shutil.which("slurmctld"):
            _skip_or_fail("no SLURM cluster, and no apt-get to install one (Debian only)")
        problem = None
        try:
            proc = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                problem = "slurm/local/up.sh failed: " + \
                    " | ".join(proc.stderr.strip().splitlines()[-3:])
        except subprocess.TimeoutExpired:
            problem = "slurm/local/up.sh did not finish within 600 s"
        if problem is None:
            for name, value in re.findall(r"^export (\w+)=(\S+)$", proc.stdout, re.M):
                env[name] = value
            if not _responds(env):
                problem = "slurm/local/up.sh ran but the cluster does not answer"
        if problem is not None:  # stop whatever half of it did start
            subprocess.run(["bash", str(DOWN)], capture_output=True, timeout=120)
            _skip_or_fail(problem)
        started = True
    if env.get("SLURM_CONF", "").startswith(_local_dir() + os.sep):
        env.setdefault("SLURM_LOCAL_DIR", _local_dir())
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SLURM_CONF", "SLURM_LOCAL_DIR"):
            if env.get(name):
                mp.setenv(name, env[name])
        yield env
    if started:
        subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, timeout=120)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds; still runs in CI")
