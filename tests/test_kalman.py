"""numpyro_lds.kalman: the Kalman update and filter and the RTS backward chain, on one
sequence and every schedule, against the dense float64 Gaussian (tests/reference.py).

The filter at step ``t`` is the dense prior of ``z_{1:t}`` conditioned on the potentials
up to ``t`` (up to ``t − 1`` for the prediction), read at ``z_t``; the smoother's backward
chain has the law of the dense posterior, read backward in time."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from helpers import dense_inputs, make_case, spd
from numpyro_lds.kalman import condition_on_potentials, kalman_filter, kalman_update
from numpyro_lds.schedules import SCHEDULES

RTOL = 1e-8
ATOL = 1e-10
T = 17  # the blocked schedule's two levels, with padding

# One sequence each, in the case format of tests/helpers.make_case:
# (id, k, T, prior batch, time-varying, potential kwargs)
CASES = [
    ("full_masked", 2, T, (), True, {"mask": True}),
    ("diag_shared_dynamics", 3, T, (), False, {"diag": True}),
    ("d_lt_k_time_emission", 3, T, (), True, {"d": 2, "emission": "time", "mask": True}),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, post = make_case(request.param)
    (chain, potentials), _ = post.sequence_args()
    return chain, potentials, dense_inputs(post)


def _dense_marginal_given(chain_args, potentials, observed_until, t):
    """Mean and covariance of ``z_t`` (0-based) given the potentials at steps
    ``< observed_until`` (and the mask), from the dense joint of ``z_{1:T}``."""
    y, R, H, mask = potentials
    k = len(chain_args[0])
    mean, cov = ref.prior_joint(*chain_args, T)
    seen = mask & (np.arange(T) < observed_until)
    mean, cov, _ = ref.condition_joint(mean, cov, y, R, H, seen, k)
    s = slice(t * k, (t + 1) * k)
    return mean[s], cov[s, s]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_filter_matches_dense_conditioning(case, schedule):
    chain, potentials, (chain_args, dense_potentials) = case
    out = kalman_filter(chain, potentials, schedule)
    for t in range(T):
        for (m, P), observed_until in [
            ((out.predicted_means[t], out.predicted_covs[t]), t),
            ((out.filtered_means[t], out.filtered_covs[t]), t + 1),
        ]:
            want_m, want_P = _dense_marginal_given(chain_args, dense_potentials, observed_until, t)
            np.testing.assert_allclose(m, want_m, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(P, want_P, rtol=RTOL, atol=ATOL)
    mean, cov = ref.prior_joint(*chain_args, T)
    k = len(chain_args[0])
    _, _, log_z = ref.condition_joint(mean, cov, *dense_potentials, k)
    np.testing.assert_allclose(out.log_normalizer, log_z, rtol=RTOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_backward_chain_has_the_dense_posterior_law(case, schedule):
    """``condition_on_potentials``' chain runs backward (``z_T`` first): as a forward chain
    over ``z_T, …, z_1`` its dense joint is the dense posterior's, flipped in time."""
    chain, potentials, (chain_args, dense_potentials) = case
    k = len(chain_args[0])
    posterior = condition_on_potentials(chain, potentials, schedule)
    backward = [np.asarray(x) for x in posterior.backward_chain]
    mean_b, cov_b = ref.prior_joint(*backward, T)
    mean, cov = ref.prior_joint(*chain_args, T)
    mean, cov, log_z = ref.condition_joint(mean, cov, *dense_potentials, k)
    flip = np.arange(T * k).reshape(T, k)[::-1].reshape(-1)
    np.testing.assert_allclose(mean_b, mean[flip], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(cov_b, cov[np.ix_(flip, flip)], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(posterior.log_normalizer, log_z, rtol=RTOL)


@pytest.mark.parametrize("diagonal", [False, True], ids=["covariance", "variances"])
def test_kalman_update_is_bayes_rule(diagonal):
    """One step: ``N(m, P)`` times ``N(y; H z, R)`` in information form, the innovation's
    log-density, and an unobserved step left as it was (zero gain, identity residual map)."""
    rng = np.random.default_rng(3)
    k, d = 3, 2
    m, P = rng.normal(size=k), spd(rng, (), k)
    y, H = rng.normal(size=d), rng.normal(size=(d, k))
    R_dense = np.diag(rng.uniform(0.3, 2.0, size=d)) if diagonal else spd(rng, (), d)
    R = np.diag(R_dense) if diagonal else R_dense
    precision = np.linalg.inv(P) + H.T @ np.linalg.solve(R_dense, H)
    cov = np.linalg.inv(precision)
    mean = cov @ (np.linalg.solve(P, m) + H.T @ np.linalg.solve(R_dense, y))
    args = [jnp.asarray(x) for x in (m, P, y, R, H)]
    out = kalman_update(*args, jnp.asarray(True))
    np.testing.assert_allclose(out.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(out.cov, cov, rtol=1e-12)
    innovation = H @ P @ H.T + R_dense
    gain = P @ H.T @ np.linalg.inv(innovation)
    np.testing.assert_allclose(out.log_lik, ref.mvn_log_prob(y, H @ m, innovation), rtol=1e-12)
    np.testing.assert_allclose(out.gain, gain, rtol=1e-12)
    chol = np.asarray(out.chol_innovation)
    np.testing.assert_allclose(chol @ chol.T, innovation, rtol=1e-12)
    np.testing.assert_allclose(out.residual_map, np.eye(k) - gain @ H, rtol=1e-12, atol=1e-14)
    skipped = kalman_update(*args, jnp.asarray(False))
    np.testing.assert_array_equal(skipped.mean, m)
    np.testing.assert_array_equal(skipped.cov, P)
    np.testing.assert_array_equal(skipped.log_lik, 0.0)
    np.testing.assert_array_equal(skipped.gain, 0.0)
    np.testing.assert_array_equal(skipped.residual_map, np.eye(k))
