"""Batches of sequences of different lengths: padded to a common T, with a trailing mask.

Beyond its last potential a posterior chain follows the prior's own transitions, so the
padded steps add nothing to the KL, and the real steps' moments, log-normalizer and
gradients are those of the unpadded sequence. Each unpadded sequence is itself checked
against the dense Gaussian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.kl import kl_divergence

from helpers import dense, random_prior
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

T, K = 17, 2
LENGTHS = (17, 11, 4)


def _truncated(prior, length):
    """The prior's first ``length`` steps, as its own distribution."""
    n = length - 1
    return LinearGaussianStateSpace(
        prior.initial_mean,
        prior.initial_cov,
        prior.transition_matrix[:n],
        prior.transition_cov[:n],
        prior.transition_offset[:n],
        num_steps=length,
    )


def _padded_batch():
    rng = np.random.default_rng(0)
    prior = random_prior(rng, K, T)  # time-varying dynamics and offsets
    y = rng.normal(size=(len(LENGTHS), T, K))
    var = rng.uniform(0.2, 2.0, size=(len(LENGTHS), T, K))
    # Missing steps inside a sequence too, as well as its padding.
    observed = rng.uniform(size=(len(LENGTHS), T)) < 0.8
    valid = np.arange(T) < np.asarray(LENGTHS)[:, None]
    q = LDSPosterior(prior.expand((len(LENGTHS),)), y, potential_var=var, mask=valid & observed)
    unpadded = [
        LDSPosterior(_truncated(prior, n), y[i, :n], potential_var=var[i, :n], mask=observed[i, :n])
        for i, n in enumerate(LENGTHS)
    ]
    return prior, q, unpadded, valid


def test_padded_sequences_equal_the_unpadded_ones_and_the_dense_gaussian():
    # A trailing mask is a mask like any other: tests/test_schedules.py checks masks on
    # every schedule.
    prior, q, unpadded, _ = _padded_batch()
    # Terms A–C against a prior rebuilt from the same arrays, and the identity against q.prior.
    rebuilt = _truncated(prior, T)
    kl_general = kl_divergence(q, rebuilt)
    kl_identity = q.kl_to_prior()
    for i, (n, q_i) in enumerate(zip(LENGTHS, unpadded, strict=True)):
        mean, cov, log_z = dense(q_i)[()]
        sd = np.sqrt(np.diagonal(cov))
        np.testing.assert_allclose(q.mean[i, :n].reshape(-1), mean, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(
            np.sqrt(q.variance[i, :n]).reshape(-1), sd, rtol=1e-9, atol=1e-10
        )
        blocks = cov.reshape(n, K, n, K)
        np.testing.assert_allclose(
            q.marginal_covariance[i, :n], np.einsum("tatb->tab", blocks), rtol=1e-9, atol=1e-10
        )
        np.testing.assert_allclose(q.log_normalizer[i], log_z, rtol=1e-10)
        kl = float(kl_divergence(q_i, _truncated(prior, n)))
        np.testing.assert_allclose(kl_general[i], kl, rtol=1e-10)
        np.testing.assert_allclose(kl_identity[i], kl, rtol=1e-10)


def test_gradients_of_padded_steps_are_zero_and_real_steps_match_unpadded():
    prior, q, unpadded, valid = _padded_batch()

    def total_kl(mean, var):
        return jnp.sum(
            LDSPosterior(q.prior, mean, potential_var=var, mask=q.potential_mask).kl_to_prior()
        )

    g_mean, g_var = jax.grad(total_kl, argnums=(0, 1))(q.potential_mean, q.potential_var)
    assert np.all(g_mean[~valid] == 0.0) and np.all(g_var[~valid] == 0.0)
    for i, (n, q_i) in enumerate(zip(LENGTHS, unpadded, strict=True)):

        def kl_i(mean, var, q_i=q_i):
            return LDSPosterior(
                q_i.prior, mean, potential_var=var, mask=q_i.potential_mask
            ).kl_to_prior()

        e_mean, e_var = jax.grad(kl_i, argnums=(0, 1))(q_i.potential_mean, q_i.potential_var)
        np.testing.assert_allclose(g_mean[i, :n], e_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g_var[i, :n], e_var, rtol=1e-9, atol=1e-12)
