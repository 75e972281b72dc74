"""numpyro_lds.posterior: the conditioned chain's statistics, draws and log-density on one
sequence and every schedule, against the dense float64 Gaussian (tests/reference.py), and
their custom VJPs against reverse-mode autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from helpers import dense_inputs, random_posterior, random_prior
from numpyro_lds.chains import GaussMarkovChain
from numpyro_lds.posterior import (
    _posterior_stats,
    posterior_log_prob,
    posterior_sample,
    posterior_stats,
)
from numpyro_lds.potentials import Potentials
from numpyro_lds.schedules import SCHEDULES

RTOL = 1e-8
ATOL = 1e-10
T, K, D = 17, 3, 2  # T = 17: the blocked schedule's two levels, with padding


@pytest.fixture(params=[False, True], ids=["covariances", "variances"])
def problem(request):
    """One masked sequence with d < k (a time-varying emission), its dense posterior
    ``(mean [T*k], cov, log Z)`` and its dense potentials."""
    rng = np.random.default_rng(0)
    post = random_posterior(
        rng, random_prior(rng, K, T), d=D, diag=request.param, emission="time", mask=True
    )
    (chain, potentials), _ = post.sequence_args()
    chain_args, dense_potentials = dense_inputs(post)
    mean, cov = ref.prior_joint(*chain_args, T)
    return chain, potentials, ref.condition_joint(mean, cov, *dense_potentials, K), dense_potentials


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_stats_match_dense(problem, schedule):
    chain, potentials, (mean, cov, log_z), (y, _, H, mask) = problem
    stats = posterior_stats(chain, potentials, schedule)
    for got, want in zip(stats.moments, ref.blocks(mean, cov, T, K), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.log_normalizer, log_z, rtol=RTOL)
    residuals = y - np.einsum("tdk,tk->td", H, mean.reshape(T, K))
    np.testing.assert_allclose(
        stats.potential_residuals, np.where(mask[:, None], residuals, 0.0), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_sample_is_an_affine_map_with_the_dense_law(problem, schedule):
    """A draw is affine in its standard normals ``ε [T, k + d]``, ``z = a + M ε``: the
    posterior is ``N(a, M Mᵀ)``."""
    chain, potentials, (mean, cov, _), _ = problem

    def draw(eps):
        return posterior_sample(chain, potentials, eps.reshape(T, K + D), schedule).reshape(-1)

    # Forward passes only (the draw's gradient is a custom VJP): M's columns by unit noise.
    n = T * (K + D)
    draws = jax.jit(jax.vmap(draw))(jnp.concatenate([jnp.zeros((1, n)), jnp.eye(n)]))
    a, M = draws[0], (draws[1:] - draws[0]).T
    np.testing.assert_allclose(a, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(M @ M.T, cov, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_log_prob_matches_dense(problem, schedule):
    chain, potentials, (mean, cov, _), _ = problem
    z = mean.reshape(T, K) + np.random.default_rng(1).normal(size=(3, T, K))
    expected = [ref.mvn_log_prob(zi.reshape(-1), mean, cov) for zi in z]
    got = posterior_log_prob(chain, potentials, jnp.asarray(z), schedule)
    np.testing.assert_allclose(got, expected, rtol=RTOL)


# Each schedule once and each kind of input once (a Latin square of the 3 x 3 grid): the
# schedules share the VJP's algebra, and their forward values are checked against the
# dense Gaussian in every combination in tests/test_schedules.py.
@pytest.mark.parametrize(
    "schedule, shared, diagonal",
    [("sequential", True, False), ("blocked", False, False), ("parallel", False, True)],
    ids=["sequential-shared_dynamics", "blocked-time_varying", "parallel-diagonal_potentials"],
)
def test_custom_vjp_equals_reverse_mode_for_every_input(schedule, shared, diagonal):
    _check_custom_vjp_against_reverse_mode(schedule, shared, diagonal, OUTPUTS)


OUTPUTS = ("means", "covs", "cross_covs", "log_normalizer")


# The outputs that a caller differentiates; the others' cotangents are symbolic zeros, for
# which the backward pass skips work: log Z alone (a marginal likelihood) runs no tangent
# recursion, the means alone (a draw) no covariance tangent recursion.
@pytest.mark.parametrize(
    "schedule, outputs",
    [(s, ("means",)) for s in ("sequential", "blocked", "parallel")]
    + [("sequential", ("log_normalizer",)), ("sequential", ("covs", "cross_covs"))],
    ids=lambda x: x if isinstance(x, str) else "+".join(x),
)
def test_custom_vjp_of_some_outputs_equals_reverse_mode(schedule, outputs):
    _check_custom_vjp_against_reverse_mode(schedule, False, False, outputs)


def _check_custom_vjp_against_reverse_mode(schedule, shared, diagonal, outputs):
    """posterior_stats' custom VJP (Fisher identity + forward-mode pass) against plain
    reverse-mode autodiff of the same filter and smoother, for random cotangents on the
    moments and the log-normalizer, w.r.t. every input (dynamics, initial state,
    potentials with full or diagonal covariances, emission matrix); masked steps included.

    The reference is reverse mode through the sequential scans on every schedule: the
    schedules compute the same function (their values are checked against the dense
    Gaussian in tests/test_schedules.py), and reverse mode through the blocked and
    parallel scans took 35-47 s to compile here, a tenth of the suite's time."""
    rng = np.random.default_rng(1)
    T, k, d = 18, 3, 2
    n = 1 if shared else T - 1
    chain = GaussMarkovChain(
        jnp.asarray(rng.normal(size=k)),
        jnp.asarray(2.0 * np.eye(k)),
        jnp.asarray(0.5 * rng.normal(size=(n, k, k))),
        jnp.asarray(rng.normal(size=(n, k))),
        jnp.asarray(np.broadcast_to(0.3 * np.eye(k) + 0.05, (n, k, k))),
    )
    mask = jnp.asarray(rng.uniform(size=T) > 0.3)
    pot = (
        jnp.asarray(rng.normal(size=(T, d))),
        jnp.asarray(
            rng.uniform(0.3, 1.5, size=(T, d))
            if diagonal
            else np.broadcast_to(0.5 * np.eye(d) + 0.1, (T, d, d))
        ),
        jnp.asarray(rng.normal(size=(1, d, k))),
    )
    shapes = _posterior_stats(chain, Potentials(*pot, mask), "sequential").moments
    weights = [jnp.asarray(rng.normal(size=x.shape)) for x in shapes]

    def loss(stats_fn, chain, *pot):
        stats = stats_fn(chain, Potentials(*pot, mask))
        pairs = zip(weights, stats.moments, stats.moments._fields, strict=True)
        terms = [jnp.sum(w * x) for w, x, name in pairs if name in outputs]
        if "log_normalizer" in outputs:  # left out, its cotangent is a symbolic zero
            terms.append(0.7 * stats.log_normalizer)
        return sum(terms)

    argnums = (0, 1, 2, 3)
    # Under jit, as SVI runs it: one compilation instead of one per primitive.
    custom = jax.jit(
        jax.grad(lambda *a: loss(lambda c, p: posterior_stats(c, p, schedule), *a), argnums)
    )
    plain = jax.jit(
        jax.grad(lambda *a: loss(lambda c, p: _posterior_stats(c, p, "sequential"), *a), argnums)
    )
    for a, b in zip(
        jax.tree.leaves(custom(chain, *pot)), jax.tree.leaves(plain(chain, *pot)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
