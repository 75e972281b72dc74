"""Gradients of batches whose sequences share their covariances.

When a batch differs only in the potentials' means (shared dynamics and potential
variances: a Kalman smoother over many series with one noise model), the smoothed
covariances are the same for every sequence. Under ``vmap`` JAX then leaves them
unbatched inside the custom VJP of ``posterior_stats``, and handed the summed cotangent of
such an output to every member's backward pass: every gradient through the covariances
was counted once per sequence (``posterior._batched_with``). The reference here is the sum
of the per-sequence gradients, each computed unbatched (those are checked against finite
differences and the dense Gaussian in the other test files), and finite-difference checks
of the batched gradient itself: the KL, a draw, the log-density of fixed paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.test_util import check_grads
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LDSPosterior, LinearGaussianStateSpace

T, K, BATCH = 6, 2, 3
RNG = np.random.default_rng(11)
MEANS = jnp.asarray(RNG.normal(size=(BATCH, T, K)))
OFFSET = jnp.asarray(RNG.normal(size=K))


def _prior_with_decay(a, schedule):
    A = a * jnp.eye(K) + 0.1 * jnp.ones((K, K))
    Q = 0.3 * jnp.eye(K) + 0.05
    return LinearGaussianStateSpace(
        jnp.zeros(K), jnp.eye(K), A, Q, OFFSET, num_steps=T, schedule=schedule
    )


QUANTITIES = {
    "kl_to_prior": lambda q, p: q.kl_to_prior(),
    # A rebuilt prior: the general closed form (Terms A–C)
    "kl_terms": lambda q, p: kl_divergence(q, _prior_with_decay(*p)),
    "log_normalizer": lambda q, p: q.log_normalizer,
    "covariances": lambda q, p: (
        jnp.sum(jnp.sin(q.marginal_covariance), (-3, -2, -1))
        + jnp.sum(jnp.cos(q.cross_covariance), (-3, -2, -1))
    ),
}


def _value(quantity, var, a, means, schedule):
    q = LDSPosterior(_prior_with_decay(a, schedule), means, potential_var=var)
    return jnp.sum(QUANTITIES[quantity](q, (a, schedule)))


def _per_sequence_sum(quantity, var, a, schedule):
    return sum(_value(quantity, var, a, MEANS[b], schedule) for b in range(BATCH))


# The KL on every schedule; the other outputs of the same custom VJP on the default one.
CASES = [(q, s) for q in ("kl_to_prior", "kl_terms") for s in ("sequential", "blocked", "parallel")]
CASES += [(q, "sequential") for q in ("log_normalizer", "covariances")]


@pytest.mark.parametrize("quantity, schedule", CASES)
def test_shared_covariances_batch_gradient_is_sum_of_sequence_gradients(quantity, schedule):
    var = jnp.asarray(RNG.uniform(0.3, 1.5, size=(T, K)))
    a = jnp.asarray(0.8)
    # Under jit, as SVI runs it: one compilation instead of one per primitive.
    batched = jax.jit(
        jax.value_and_grad(lambda v, a: _value(quantity, v, a, MEANS, schedule), (0, 1))
    )
    looped = jax.jit(
        jax.value_and_grad(lambda v, a: _per_sequence_sum(quantity, v, a, schedule), (0, 1))
    )
    (have, have_grads), (want, want_grads) = batched(var, a), looped(var, a)
    np.testing.assert_allclose(have, want, rtol=1e-12)
    for g_have, g_want in zip(have_grads, want_grads, strict=True):
        assert np.max(np.abs(g_want)) > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(g_have, g_want, rtol=1e-10, atol=1e-12)


def test_user_vmap_over_data_gives_the_sum_of_sequence_gradients():
    """``jax.vmap`` over the data alone, the covariance inputs closed over."""
    var = jnp.asarray(RNG.uniform(0.3, 1.5, size=(T, K)))
    a = jnp.asarray(0.8)

    def vmapped(v, a):
        one = lambda y: _value("kl_terms", v, a, y, "sequential")  # noqa: E731
        return jnp.sum(jax.vmap(one)(MEANS))

    have = jax.jit(jax.grad(vmapped, (0, 1)))(var, a)
    looped = lambda v, a: _per_sequence_sum("kl_terms", v, a, "sequential")  # noqa: E731
    want = jax.jit(jax.grad(looped, (0, 1)))(var, a)
    for g_have, g_want in zip(have, want, strict=True):
        np.testing.assert_allclose(g_have, g_want, rtol=1e-10, atol=1e-12)


PATH = jnp.asarray(RNG.normal(size=(BATCH, T, K)))
BATCHED_FNS = {
    "kl_terms": lambda v, a: _value("kl_terms", v, a, MEANS, "sequential"),
    # A draw (the means alone are differentiated) and the log-density of fixed paths.
    "draw": lambda v, a: jnp.sum(
        jnp.sin(
            LDSPosterior(_prior_with_decay(a, None), MEANS, potential_var=v).rsample(
                jax.random.key(2)
            )
        )
    ),
    "log_prob": lambda v, a: jnp.sum(
        LDSPosterior(_prior_with_decay(a, None), MEANS, potential_var=v).log_prob(PATH)
    ),
}


@pytest.mark.parametrize("quantity", list(BATCHED_FNS))
def test_shared_covariances_batch_gradient_matches_finite_differences(quantity):
    var = jnp.asarray(RNG.uniform(0.3, 1.5, size=(T, K)))
    check_grads(
        BATCHED_FNS[quantity],
        (var, jnp.asarray(0.8)),
        order=1,
        modes=["rev"],
        eps=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO])
def test_vectorized_particles_equal_particles_one_at_a_time(elbo):
    """NumPyro's ``vectorize_particles`` runs guide and model under ``vmap`` over the
    particles' keys: the draws are batched, the guide's parameters not. The gradient must
    be the one of the particles computed one after another, with the same keys."""

    def model(y):
        a = numpyro.param("a", 0.8)
        r = numpyro.param("r", 0.7, constraint=dist.constraints.positive)
        with numpyro.plate("series", y.shape[0]):
            z = numpyro.sample("z", _prior_with_decay(a, "sequential"))
            numpyro.sample("y", dist.Normal(z, r).to_event(2), obs=y)

    guide = AutoLDSGuide(model)
    svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(0.1), elbo())
    params = svi.get_params(svi.init(jax.random.key(0), MEANS))

    def grad(vectorize):
        loss = elbo(num_particles=3, vectorize_particles=vectorize)
        return jax.jit(jax.grad(lambda p: loss.loss(jax.random.key(1), p, model, guide, MEANS)))(
            params
        )

    have, want = grad(True), grad(False)
    for name in want:
        np.testing.assert_allclose(have[name], want[name], rtol=1e-10, atol=1e-12)
