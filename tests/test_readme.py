"""Every Python snippet of the README runs as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    matplotlib.use("Agg")
    ns: dict = {}
    exec(compile(blocks[0], str(README), "exec"), ns)
    # the headline fit: the exact smoother at the learned noise levels
    from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

    p, y = ns["result"].params, ns["y"]
    prior = LinearGaussianStateSpace(
        np.zeros(2), np.eye(2), ns["A"], p["process_var"] * np.eye(2), num_steps=ns["T"]
    )
    exact = LDSPosterior(prior, y, potential_var=np.full(y.shape, p["obs_sd"] ** 2))
    q = ns["guide"].get_posteriors(p, y)["z"]
    sd = np.sqrt(np.asarray(exact.variance))
    assert np.max(np.abs(np.asarray(q.mean) - np.asarray(exact.mean)) / sd) < 0.25
    np.testing.assert_allclose(np.sqrt(np.asarray(q.variance)), sd, rtol=0.1)
    assert ns["idata"].posterior["z"].shape[-2:] == (ns["T"], 2)
    for block in blocks[1:]:
        exec(compile(block, str(README), "exec"), ns)
    # padded sequences fitted in minibatches: every sequence's posterior is its exact smoother
    qs, ys, valid = ns["posteriors"]["z"], ns["y"], ns["valid"]
    assert qs.batch_shape == (8,)
    np.testing.assert_array_equal(qs.potential_mask, valid)
    exact = LDSPosterior(
        ns["prior"].expand((8,)), ys, potential_var=np.full(ys.shape, 0.25), mask=valid
    )
    sd = np.sqrt(np.asarray(exact.variance))
    assert np.max(np.abs(np.asarray(qs.mean) - np.asarray(exact.mean)) / sd) < 1e-3
    np.testing.assert_allclose(np.sqrt(np.asarray(qs.variance)), sd, rtol=1e-3)
    assert np.isfinite(ns["loss"])
