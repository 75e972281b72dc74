"""Float32 against a float64 run of the same code on a hard problem.

Spectral radius 0.999, process noise 1e-4·I, potential variances 1e-4 … 1e4, 30% of steps
masked. The full-length case (T = 100 000) is ``benchmarks/float32_robustness.py``; its
results are in ``benchmarks/results/float32_robustness.txt``.
"""

import numpy as np
import pytest

from float32_robustness import compare


@pytest.mark.parametrize("T", [3000])
def test_float32_matches_float64_on_a_hard_long_sequence(T):
    r = compare(T)
    assert all(r["finite"].values()), r["finite"]
    assert r["kl_rel_err"] <= 1e-3
    assert r["grad_y_rel_err"] <= 1e-3 and r["grad_var_rel_err"] <= 1e-3
    # The general formula (Terms A-C), which SVI uses: as robust.
    assert r["kl_terms_rel_err"] <= 1e-3 and r["grad_terms_rel_err"] <= 1e-3
    # log q and its gradient (Trace_ELBO's path), the latter by the log-normalizer identity.
    assert r["log_prob_rel_err"] <= 1e-4 and r["grad_log_prob_rel_err"] <= 1e-4
    assert r["max_asymmetry"] == 0.0
    assert r["min_eigenvalue"] > 0.0
    assert np.isfinite(r["kl32"])
