"""Data-parallel SVI over two (simulated) devices gives the one-device loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]

SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, "examples")
from sharded_svi import fit, simulate

devices = jax.devices()
y = simulate(jax.random.key(0), 6, 20)
single, p_single, _ = fit(y, 15, 0.05)
sharded, p_sharded, state = fit(y, 15, 0.05, devices)
potentials = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 3]
print(json.dumps({
    "num_devices": len(devices),
    "single": single.tolist(),
    "sharded": sharded.tolist(),
    "p_single": p_single,
    "p_sharded": p_sharded,
    "shard_devices": sorted({len(x.sharding.device_set) for x in potentials}),
    "shard_shapes": sorted({x.addressable_shards[0].data.shape[0] for x in potentials}),
}))
"""


def test_two_device_sharded_svi_matches_one_device():
    # two simulated host devices: on the CPU backend, also where an accelerator is present
    flags = "--xla_force_host_platform_device_count=2 " + os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_devices"] == 2
    # the per-sequence state really is split: 6 sequences, 3 per device
    assert out["shard_devices"] == [2] and out["shard_shapes"] == [3]
    np.testing.assert_allclose(out["sharded"], out["single"], rtol=1e-12)
    for name, value in out["p_single"].items():
        np.testing.assert_allclose(out["p_sharded"][name], value, rtol=1e-10)
    assert out["single"][-1] < out["single"][0]  # it trains
