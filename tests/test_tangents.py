"""numpyro_lds.tangents: the filter's and the smoother's written-out directional
derivatives against ``jax.jvp`` of the dense float64 Gaussian (tests/reference.py), on one
sequence and every schedule.

The direction (``docs/derivation.md``, section 8): the transition matrices move by
``ε F_dot`` and each step's density is tilted by ``exp(ε(−½ zᵀ J_dot_t z + h_dot_tᵀ z))``.
Densely that adds ``ε J_dot_t`` to the joint precision's diagonal block ``t`` and
``ε h_dot_t`` to the information vector, so the filter at ``t`` is the joint of ``z_{1:T}``
with the potentials and tilts up to ``t`` (up to ``t − 1`` for the prediction), read at
``z_t``, and the smoother is the joint with all of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from helpers import dense_inputs, random_posterior, random_prior, spd
from numpyro_lds.chains import chain_moments
from numpyro_lds.kalman import kalman_filter, rts_kernels
from numpyro_lds.linalg import matvec
from numpyro_lds.schedules import SCHEDULES
from numpyro_lds.tangents import filter_tangent, smoothed_tangent

RTOL = 1e-8
ATOL = 1e-10
T, K, D = 17, 3, 2  # T = 17: the blocked schedule's two levels, with padding


def _problem(means_only):
    """One masked sequence with a time-varying emission, and a direction: zero ``F_dot``
    and ``J_dot`` for ``means_only`` (the only direction its recursions cover)."""
    rng = np.random.default_rng(0)
    post = random_posterior(rng, random_prior(rng, K, T), d=D, emission="time", mask=True)
    (chain, potentials), _ = post.sequence_args()
    F_dot = rng.normal(size=(T - 1, K, K))
    J_dot = spd(rng, (T,), K) - 1.0 * np.eye(K)  # symmetric, of either sign
    h_dot = rng.normal(size=(T, K))
    if means_only:
        F_dot, J_dot = np.zeros_like(F_dot), np.zeros_like(J_dot)
    direction = tuple(jnp.asarray(x) for x in (F_dot, J_dot, h_dot))
    return chain, potentials, dense_inputs(post), direction


def _dense_moments(eps, dense_args, direction):
    """Means ``[T + 1, T, k]``, covariances ``[T + 1, T, k, k]`` and lag-one
    cross-covariances ``[T + 1, T − 1, k, k]`` of ``z_{1:T}`` at ``ε``: entry ``u`` given
    the potentials and tilts of the steps before ``u``. The filter at ``t`` is the marginal
    of ``z_t`` in entry ``t + 1`` (the later states, unobserved, integrate out), the
    prediction in entry ``t``, the smoother entry ``T``."""
    (m0, P0, A, b, Q), (y, R, H, mask) = dense_args
    F_dot, J_dot, h_dot = direction
    H = np.broadcast_to(H, (T,) + H.shape[1:])
    lam_prior, h_prior = ref.prior_information(m0, P0, A + eps * F_dot, b, Q, T)
    R_inv_H = np.linalg.solve(R, H)
    lam_nodes = mask[:, None, None] * np.einsum("tdk,tdl->tkl", H, R_inv_H) + eps * J_dot
    h_nodes = mask[:, None] * np.einsum("tdk,td->tk", R_inv_H, y) + eps * h_dot
    before = (np.arange(T)[None, :] < np.arange(T + 1)[:, None]).astype(float)  # [u, s]
    lam = lam_prior + jnp.einsum("us,skl,st->usktl", before, lam_nodes, np.eye(T)).reshape(
        T + 1, T * K, T * K
    )
    h = h_prior + jnp.einsum("us,sk->usk", before, h_nodes).reshape(T + 1, T * K)
    cov = jnp.linalg.inv(lam)
    mean = jnp.einsum("uij,uj->ui", cov, h).reshape(T + 1, T, K)
    cov = cov.reshape(T + 1, T, K, T, K)
    covs = jnp.stack([cov[:, t, :, t, :] for t in range(T)], 1)
    cross = jnp.stack([cov[:, t + 1, :, t, :] for t in range(T - 1)], 1)
    return mean, covs, cross


def _dense_derivative(dense_args, direction):
    """``d/dε`` of :func:`_dense_moments` at ``ε = 0``, by ``jax.jvp``."""
    fn = jax.jit(lambda e: _dense_moments(e, dense_args, direction))
    return jax.jvp(fn, (0.0,), (1.0,))[1]


@pytest.mark.parametrize("means_only", [False, True], ids=["all", "means_only"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_filter_tangent_is_the_derivative_of_the_dense_filter(schedule, means_only):
    chain, potentials, dense_args, direction = _problem(means_only)
    F_dot, J_dot, h_dot = direction
    filtered = kalman_filter(chain, potentials, schedule)
    node_information = h_dot - matvec(J_dot, filtered.filtered_means)
    got = filter_tangent(
        chain, potentials, filtered, F_dot, J_dot, node_information, schedule, means_only
    )
    means, covs, _ = _dense_derivative(dense_args, direction)
    steps = np.arange(T)
    for got_m, got_P, entry in [
        (got.predicted_means, got.predicted_covs, steps),
        (got.filtered_means, got.filtered_covs, steps + 1),
    ]:
        np.testing.assert_allclose(got_m, means[entry, steps], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got_P, covs[entry, steps], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("means_only", [False, True], ids=["all", "means_only"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_smoothed_tangent_is_the_derivative_of_the_dense_smoother(schedule, means_only):
    chain, potentials, dense_args, direction = _problem(means_only)
    F_dot, J_dot, h_dot = direction
    filtered = kalman_filter(chain, potentials, schedule)
    node_information = h_dot - matvec(J_dot, filtered.filtered_means)
    filtered_dot = filter_tangent(
        chain, potentials, filtered, F_dot, J_dot, node_information, schedule, means_only
    )
    moments = chain_moments(rts_kernels(chain, filtered), T, schedule, reverse=True)
    got = smoothed_tangent(chain, filtered, filtered_dot, F_dot, moments, schedule, means_only)
    want = [x[T] for x in _dense_derivative(dense_args, direction)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
