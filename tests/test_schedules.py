"""The three schedules (sequential, blocked, parallel) against the dense reference.

Sequences here are long enough (T ≥ 16) for the blocked schedule to run its two levels,
with T not a multiple of the block count, so the padding path is exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions.kl import kl_divergence

import reference as ref
from helpers import dense, make_case, random_posterior, random_prior
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace, kl_terms
from numpyro_lds.chains import affine_recursion, chain_moments, chain_sample
from numpyro_lds.kalman import kalman_filter
from numpyro_lds.posterior import posterior_log_prob, posterior_stats
from numpyro_lds.schedules import PARALLEL_BLOCK, SCHEDULES, prefix_scan, resolve_schedule

RTOL = 1e-8
ATOL = 1e-10
FAST = ["blocked", "parallel"]

# (id, k, T, prior batch, time-varying, potential kwargs)
CASES = [
    ("T17_masked", 2, 17, (), True, {"mask": True}),
    ("T23_d_lt_k_batched", 3, 23, (2,), False, {"d": 1, "batch": (2,)}),
    ("T40_diag", 1, 40, (), False, {"diag": True}),
    ("T18_k9_lapack", 9, 18, (), False, {"d": 2, "mask": True}),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


@pytest.mark.parametrize("schedule", FAST)
def test_moments_and_log_normalizer_match_dense(case, schedule):
    prior, post = make_case(case, schedule=schedule)
    T, k = post.event_shape
    for d in (prior, post):
        mean, cov, cross = d.mean, d.marginal_covariance, d.cross_covariance
        for idx, (m, c, log_z) in dense(d).items():
            ms, cs, xs = ref.blocks(m, c, T, k)
            np.testing.assert_allclose(mean[idx], ms, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(cov[idx], cs, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(cross[idx], xs, rtol=RTOL, atol=ATOL)
            if d is post:
                np.testing.assert_allclose(post.log_normalizer[idx], log_z, rtol=RTOL)


@pytest.mark.parametrize("schedule", FAST)
def test_kl_matches_sequential_and_dense(case, schedule):
    _, q = make_case(case, seed=0, schedule=schedule)
    p, _ = make_case(case, seed=1, schedule=schedule)
    kl = np.asarray(kl_divergence(q, p))
    expected = [
        ref.mvn_kl(mq, Cq, *dense(p)[idx[len(idx) - len(p.batch_shape) :]][:2])
        for idx, (mq, Cq, _) in dense(q).items()
    ]
    np.testing.assert_allclose(kl.reshape(-1), expected, rtol=RTOL)
    np.testing.assert_allclose(q.kl_to_prior(), kl_terms(q, q.prior).kl, rtol=RTOL)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
@pytest.mark.parametrize("schedule", FAST)
def test_samples_and_gradients_equal_sequential(case, schedule):
    key = jax.random.key(0)
    _, q_seq = make_case(case, schedule="sequential")
    _, q = make_case(case, schedule=schedule)
    np.testing.assert_allclose(q.sample(key, (2,)), q_seq.sample(key, (2,)), rtol=1e-9, atol=1e-9)

    def loss(sched, y, A):
        prior, post = make_case(case, schedule=sched)
        prior = LinearGaussianStateSpace(
            prior.initial_mean,
            prior.initial_cov,
            A,
            prior.transition_cov,
            prior.transition_offset,
            num_steps=prior.num_steps,
            schedule=sched,
        )
        q = LDSPosterior(
            prior,
            y,
            post.potential_cov,
            potential_var=post.potential_var,
            emission_matrix=post.emission_matrix,
            mask=post.potential_mask,
        )
        return jnp.sum(kl_divergence(q, prior)) + jnp.sum(q.sample(key))

    prior, post = make_case(case, schedule="sequential")
    args = (post.potential_mean, prior.transition_matrix)
    # Under jit, as SVI runs it (and one compilation instead of one per primitive).
    g_seq = jax.jit(jax.grad(lambda *a: loss("sequential", *a), (0, 1)))(*args)
    g = jax.jit(jax.grad(lambda *a: loss(schedule, *a), (0, 1)))(*args)
    for a, b in zip(g, g_seq, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 50, 100])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_prefix_scan_is_an_inclusive_prefix(schedule, n):
    """Non-commutative check: 2×2 matrix products in time order."""
    rng = np.random.default_rng(n)
    mats = jnp.asarray(rng.normal(size=(n, 2, 2)))
    out = prefix_scan(lambda a, b: jnp.matmul(b, a), mats, schedule)
    acc = np.eye(2)
    for t in range(n):
        acc = np.asarray(mats[t]) @ acc
        np.testing.assert_allclose(out[t], acc, rtol=1e-12)


def test_parallel_prefix_scan_traces_its_operator_a_fixed_number_of_times():
    """What bounds the parallel schedule's compile time: its operator is traced once for a
    block of PARALLEL_BLOCK elements or fewer and three times for any longer sequence (in
    blocks, across the block totals, the last combination), not once per level."""
    counts = {}
    for n in (2, PARALLEL_BLOCK, PARALLEL_BLOCK + 1, 40, 4_000, 400_000):
        calls = []

        def op(a, b, calls=calls):
            calls.append(None)
            return jnp.matmul(b, a)

        jax.jit(lambda m: prefix_scan(op, m, "parallel")).lower(jnp.zeros((n, 2, 2)))
        counts[n] = len(calls)
    assert counts == {
        2: 1,
        PARALLEL_BLOCK: 1,
        PARALLEL_BLOCK + 1: 3,
        40: 3,
        4_000: 3,
        400_000: 3,
    }


def test_default_schedule_is_sequential_on_cpu_and_parallel_on_accelerators():
    # the documented default, chosen by measurement (docs/performance.md)
    prior, _ = make_case(CASES[0], schedule=None)
    assert prior.schedule is None  # kept, and resolved where a computation runs
    expected = "sequential" if jax.default_backend() == "cpu" else "parallel"
    assert resolve_schedule(prior.schedule) == expected


@pytest.mark.parametrize("schedule", [None, "fast", True])
def test_core_functions_refuse_anything_but_an_explicit_schedule(schedule):
    """The distributions resolve ``None``; the core functions that take a schedule check it
    where it enters, before any work, rather than treating an unknown one as sequential."""
    rng = np.random.default_rng(0)
    post = random_posterior(rng, random_prior(rng, 2, 4))
    (chain, potentials), _ = post.sequence_args()
    calls = {
        "chain_moments": lambda: chain_moments(chain, 4, schedule),
        "chain_sample": lambda: chain_sample(chain, jnp.zeros((4, 2)), schedule),
        "affine_recursion": lambda: affine_recursion(
            jnp.zeros(2), chain.transition_matrix, jnp.zeros((3, 2)), schedule
        ),
        "kalman_filter": lambda: kalman_filter(chain, potentials, schedule),
        "posterior_stats": lambda: posterior_stats(chain, potentials, schedule),
        "posterior_log_prob": lambda: posterior_log_prob(
            chain, potentials, jnp.zeros((4, 2)), schedule
        ),
        "prefix_scan": lambda: prefix_scan(jnp.add, jnp.zeros(4), schedule),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"schedule must be one of .*got {schedule!r}"):
            call()
            pytest.fail(f"{name} accepted schedule={schedule!r}")
