"""Every Python snippet of the README and of the recipes page runs as written, in order, in
one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run_snippets(path):
    """Run the page's Python blocks in order in one namespace, and return it."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"no Python snippet in {path}"
    matplotlib.use("Agg")
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), ns)
    return ns


def test_readme_snippet_runs_as_written():
    ns = _run_snippets(ROOT / "README.md")
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


def test_recipes_run_as_written():
    ns = _run_snippets(ROOT / "docs" / "recipes.md")
    from numpyro_lds import LDSPosterior

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
    # the marginal likelihood and its gradient w.r.t. every argument
    assert np.isfinite(ns["loss"])
    assert all(np.all(np.isfinite(g)) for g in ns["grads"])
