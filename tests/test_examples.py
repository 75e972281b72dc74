"""Smoke tests: every example runs end to end with tiny arguments and writes its figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import user_environment

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = [
    ("quickstart.py", ["--num-steps", "20"]),
    (
        "poisson_lds.py",
        ["--latent-dim", "2", "--num-neurons", "5", "--num-bins", "30", "--num-steps", "5"],
    ),
    (
        "lds_tracking.py",
        ["--num-timesteps", "15", "--num-steps", "20", "--nuts-timesteps", "5"]
        + ["--num-warmup", "20", "--num-samples", "20"],
    ),
    (
        "svae.py",
        ["--num-sequences", "2", "--num-timesteps", "6", "--num-steps", "5", "--mc-kl"]
        + ["--batch-size", "1"],
    ),
]


@pytest.mark.parametrize(
    "script,args", EXAMPLES, ids=[e[0] + "-" + "-".join(e[1][-2:]) for e in EXAMPLES]
)
def test_example_runs(script, args, tmp_path):
    out = tmp_path / "figure.png"
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0


def test_sharded_example_runs_as_documented():
    """The README's command, ``XLA_FLAGS=--xla_force_host_platform_device_count=2 python
    examples/sharded_svi.py``, at small sizes through its own flags."""
    env = user_environment(
        XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    args = ["--num-sequences", "4", "--num-timesteps", "20", "--num-steps", "30"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sharded_svi.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s)" in proc.stdout
    difference = float(proc.stdout.split("largest relative difference of the loss curves:")[1])
    assert difference < 1e-5  # float32 round-off of the cross-device sums
