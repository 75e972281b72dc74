"""Property-based tests (hypothesis) over shapes, batch shapes, time-varying parameters, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpyro.distributions.kl import kl_divergence

from helpers import random_posterior, random_prior
from numpyro_lds import kl_terms

SETTINGS = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def problems(draw):
    k = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    pot_batch = (
        draw(st.sampled_from([(), (3,)])) if batch != (2,) else draw(st.sampled_from([(), (2,)]))
    )
    kw = dict(
        d=draw(st.integers(1, 3)),
        diag=draw(st.booleans()),
        mask=draw(st.booleans()),
        batch=pot_batch,
    )
    tv = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    prior = random_prior(rng, k, T, batch, time_varying=tv)
    other = random_prior(rng, k, T, batch, time_varying=not tv)
    q = random_posterior(rng, prior, **kw)
    return prior, other, q


@SETTINGS
@given(problems())
def test_kl_is_nonnegative_and_zero_on_itself(problem):
    prior, other, q = problem
    for a, b in [(q, other), (other, q), (q, prior), (prior, other)]:
        assert np.all(np.asarray(kl_divergence(a, b)) >= -1e-9)
    for a in (prior, q):
        np.testing.assert_allclose(kl_divergence(a, a), 0.0, atol=1e-9)


@SETTINGS
@given(problems())
def test_general_kl_equals_fast_path(problem):
    prior, _, q = problem
    np.testing.assert_allclose(kl_terms(q, prior).kl, q.kl_to_prior(), rtol=1e-8, atol=1e-10)


@SETTINGS
@given(problems())
def test_jit_vmap_grad_invariance(problem):
    prior, other, q = problem
    kl = kl_divergence(q, other)
    np.testing.assert_allclose(
        jax.jit(lambda a, b: kl_divergence(a, b))(q, other), kl, rtol=1e-10, atol=1e-12
    )
    # vmap over a stack of potential means equals the batched distribution
    y = q.potential_mean
    ys = jnp.stack([y, y + 0.5])

    def build(y):
        return type(q)(
            q.prior,
            y,
            q.potential_cov,
            potential_var=q.potential_var,
            emission_matrix=q.emission_matrix,
            mask=q.potential_mask,
        )

    def kl_of(y):
        return kl_divergence(build(y), other)

    vm = jax.vmap(kl_of)(ys)
    np.testing.assert_allclose(vm[0], kl, rtol=1e-10, atol=1e-12)
    if q.batch_shape == ():
        np.testing.assert_allclose(vm, kl_divergence(build(ys), other), rtol=1e-10, atol=1e-12)
    # grad under jit equals eager grad
    g = jax.grad(lambda y: jnp.sum(kl_of(y)))
    np.testing.assert_allclose(jax.jit(g)(y), g(y), rtol=1e-9, atol=1e-12)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(problems())
def test_sample_mean_within_standard_error(problem):
    _, _, q = problem
    n = 4000
    z = np.asarray(q.sample(jax.random.key(0), (n,)))
    sd = np.sqrt(np.asarray(q.variance))
    np.testing.assert_array_less(
        np.abs(z.mean(0) - np.asarray(q.mean)), 5 * sd / np.sqrt(n) + 1e-12
    )
