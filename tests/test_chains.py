"""numpyro_lds.chains: a Gauss-Markov chain's moments, draws, density and entropy, on one
sequence and every schedule, against the dense float64 Gaussian (tests/reference.py).

T = 17 runs the blocked schedule's two levels with padding (T is not a multiple of its
block count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from helpers import dense_inputs, random_prior
from numpyro_lds.chains import (
    GaussMarkovChain,
    affine_recursion,
    chain_entropy,
    chain_log_prob,
    chain_moments,
    chain_sample,
)
from numpyro_lds.schedules import SCHEDULES

RTOL = 1e-8
ATOL = 1e-10
T, K = 17, 2


def _chain(time_varying=True, seed=0):
    """A random prior's chain and its dense arguments ``(m0, P0, A, b, Q)``."""
    prior = random_prior(np.random.default_rng(seed), K, T, time_varying=time_varying)
    (chain, _), _ = prior.sequence_args()
    return chain, dense_inputs(prior)[0]


def _time_flip(n, k):
    """The permutation of ``[n*k]`` indices that reverses the order of ``n`` blocks of ``k``."""
    return np.arange(n * k).reshape(n, k)[::-1].reshape(-1)


@pytest.mark.parametrize("time_varying", [True, False], ids=["time_varying", "shared"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_chain_moments_match_dense(schedule, time_varying):
    chain, args = _chain(time_varying)
    expected = ref.blocks(*ref.prior_joint(*args, T), T, K)
    for got, want in zip(chain_moments(chain, T, schedule), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_chain_moments_of_a_backward_chain_match_dense(schedule):
    """``reverse=True``: the chain starts at ``z_T`` and its transition ``t`` gives ``z_t``
    from ``z_{t+1}`` (arrays in forward time). Its law is that of the forward chain with
    the transition arrays flipped, read backward; the moments come in forward time."""
    chain, (m0, P0, A, b, Q) = _chain()
    mean, cov = ref.prior_joint(m0, P0, A[::-1], b[::-1], Q[::-1], T)
    flip = _time_flip(T, K)
    expected = ref.blocks(mean[flip], cov[np.ix_(flip, flip)], T, K)
    got = chain_moments(chain, T, schedule, reverse=True)
    for g, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)


def test_chain_log_prob_and_entropy_match_dense():
    chain, args = _chain()
    mean, cov = ref.prior_joint(*args, T)
    z = np.random.default_rng(1).normal(size=(3, T, K))
    expected = [ref.mvn_log_prob(zi.reshape(-1), mean, cov) for zi in z]
    np.testing.assert_allclose(chain_log_prob(chain, jnp.asarray(z)), expected, rtol=RTOL)
    np.testing.assert_allclose(chain_entropy(chain, T), ref.mvn_entropy(cov), rtol=RTOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_chain_sample_is_a_causal_affine_map_with_the_dense_law(schedule):
    """A draw is affine in its standard normals, ``z = a + M ε``: the chain's law is
    ``N(a, M Mᵀ)``, and ``z_t`` depends on ``ε_1, …, ε_t`` alone."""
    chain, args = _chain()
    mean, cov = ref.prior_joint(*args, T)

    def draw(eps):
        return chain_sample(chain, eps.reshape(T, K), schedule).reshape(-1)

    eps0 = jnp.zeros(T * K)
    a, M = draw(eps0), jax.jit(jax.jacfwd(draw))(eps0)
    np.testing.assert_allclose(a, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(M @ M.T, cov, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.triu(M, 1), 0.0)  # causal, with lower Cholesky blocks


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "time_varying"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_affine_recursion_matches_a_loop(schedule, shared):
    rng = np.random.default_rng(2)
    F = rng.normal(size=(1 if shared else T - 1, K, K)) / np.sqrt(K)
    c = rng.normal(size=(T - 1, K))
    x0 = rng.normal(size=K)
    expected = [x0]
    for t in range(T - 1):
        expected.append(F[0 if shared else t] @ expected[-1] + c[t])
    got = affine_recursion(jnp.asarray(x0), jnp.asarray(F), jnp.asarray(c), schedule)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-12, atol=1e-12)


def test_a_chain_of_one_step_is_its_initial_law():
    chain, (m0, P0, *_) = _chain()
    one = GaussMarkovChain(chain.initial_mean, chain.initial_cov, *(x[:0] for x in chain[2:]))
    means, covs, cross = chain_moments(one, 1, "sequential")
    np.testing.assert_allclose(means, m0[None], rtol=1e-15)
    np.testing.assert_allclose(covs, P0[None], rtol=1e-15)
    assert cross.shape == (0, K, K)
