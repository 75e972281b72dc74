"""Gradients against finite differences; sample moments against standard-error bounds."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from numpyro.distributions.kl import kl_divergence

from helpers import random_posterior, random_prior
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace, kl_terms

PRIOR_FIELDS = (
    "initial_mean",
    "initial_cov",
    "transition_matrix",
    "transition_cov",
    "transition_offset",
)


def _sym(a):
    # finite differences perturb one entry at a time; keep covariances symmetric
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _prior_from(params, T):
    m0, P0, A, Q, b = (params[f] for f in PRIOR_FIELDS)
    return LinearGaussianStateSpace(m0, _sym(P0), A, _sym(Q), b, num_steps=T)


@pytest.mark.parametrize("p_kind", ["prior", "posterior"])
def test_kl_gradient_wrt_every_input_matches_finite_differences(p_kind):
    rng = np.random.default_rng(0)
    T, k, d = 4, 2, 3
    q_prior = random_prior(rng, k, T)
    p_prior = random_prior(rng, k, T)
    q_post = random_posterior(rng, q_prior, d=d, mask=True)
    p_post = random_posterior(rng, p_prior, diag=True)
    params = {
        "q": {f: getattr(q_prior, f) for f in PRIOR_FIELDS},
        "p": {f: getattr(p_prior, f) for f in PRIOR_FIELDS},
        "y": q_post.potential_mean,
        "R": q_post.potential_cov,
        "H": q_post.emission_matrix,
        "y_p": p_post.potential_mean,
        "var_p": p_post.potential_var,
    }
    mask = q_post.potential_mask

    def kl(params):
        q = LDSPosterior(
            _prior_from(params["q"], T),
            params["y"],
            _sym(params["R"]),
            emission_matrix=params["H"],
            mask=mask,
        )
        p = _prior_from(params["p"], T)
        if p_kind == "posterior":
            p = LDSPosterior(p, params["y_p"], potential_var=params["var_p"])
        return kl_divergence(q, p)

    check_grads(kl, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_kl_to_own_prior_shortcut_gradient_equals_general_formula():
    """``kl_divergence(q, q.prior)`` takes ``Σ E_q log φ − log Z``; its gradient w.r.t. every
    input (the prior's parameters reach it through q and p) must be the general formula's."""
    rng = np.random.default_rng(1)
    T, k, d = 4, 2, 3
    prior = random_prior(rng, k, T)
    post = random_posterior(rng, prior, d=d, mask=True)
    params = {
        "prior": {f: getattr(prior, f) for f in PRIOR_FIELDS},
        "y": post.potential_mean,
        "R": post.potential_cov,
        "H": post.emission_matrix,
    }

    def posterior(params):
        return LDSPosterior(
            _prior_from(params["prior"], T),
            params["y"],
            _sym(params["R"]),
            emission_matrix=params["H"],
            mask=post.potential_mask,
        )

    def shortcut(params):
        q = posterior(params)
        return kl_divergence(q, q.prior)

    def general(params):
        q = posterior(params)
        return kl_terms(q, q.prior).kl

    np.testing.assert_allclose(shortcut(params), general(params), rtol=1e-10)
    grads = jax.grad(shortcut)(params), jax.grad(general)(params)
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    check_grads(shortcut, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["prior", "posterior", "posterior_diag_emission"])
def test_log_prob_and_sample_gradients_match_finite_differences(kind):
    rng = np.random.default_rng(1)
    T, k = 3, 2
    prior = random_prior(rng, k, T)
    diag = kind == "posterior_diag_emission"
    post = random_posterior(rng, prior, d=3 if diag else None, diag=diag, mask=True)
    # Two paths with different weights: log q's gradient w.r.t. the posterior's inputs sums
    # each path's explicit gradient minus the weights' sum times ∇ log Z.
    z = jnp.asarray(rng.normal(size=(2, T, k)))
    weights = jnp.asarray(rng.normal(size=(T, k)))
    key = jax.random.key(3)

    def build(params):
        d = _prior_from(params["prior"], T)
        if kind == "posterior":
            d = LDSPosterior(d, params["y"], _sym(params["R"]), mask=post.potential_mask)
        elif diag:
            d = LDSPosterior(
                d,
                params["y"],
                potential_var=params["R"],
                emission_matrix=params["H"],
                mask=post.potential_mask,
            )
        return d

    params = {
        "prior": {f: getattr(prior, f) for f in PRIOR_FIELDS},
        "y": post.potential_mean,
        "R": post.potential_var if diag else post.potential_cov,
    }
    if diag:
        params["H"] = post.emission_matrix
    lp_weights = jnp.array([0.7, -1.3])
    check_grads(
        lambda p, z: jnp.sum(lp_weights * build(p).log_prob(z)),
        (params, z),
        order=1,
        modes=["rev"],
        eps=1e-6,
    )
    check_grads(
        lambda p: jnp.sum(build(p).sample(key) * weights),
        (params,),
        order=1,
        modes=["rev"],
        eps=1e-6,
    )


@pytest.mark.parametrize("kind", ["prior", "posterior", "posterior_diag_emission"])
def test_sample_moments_within_standard_error(kind):
    rng = np.random.default_rng(2)
    T, k, n = 4, 2, 20_000
    d = random_prior(rng, k, T, batch=(2,))
    if kind == "posterior":
        d = random_posterior(rng, d, batch=(2,), mask=True)
    elif kind == "posterior_diag_emission":
        # d ≠ k, diagonal covariances: the pseudo-potentials' noise takes the other path.
        d = random_posterior(rng, d, d=3, batch=(2,), diag=True, mask=True)
    z = np.asarray(d.sample(jax.random.key(0), (n,)))
    assert z.shape == (n,) + d.batch_shape + d.event_shape
    mean, cov = np.asarray(d.mean), np.asarray(d.marginal_covariance)
    cross = np.asarray(d.cross_covariance)
    var = np.diagonal(cov, 0, -2, -1)
    # E[z]: standard error sqrt(var / n); 5 SE over 16 numbers.
    np.testing.assert_array_less(np.abs(z.mean(0) - mean), 5 * np.sqrt(var / n))
    # Cov(z_t): entry (i, j) has variance (S_ii S_jj + S_ij²) / n.
    c = z - z.mean(0)
    emp = np.einsum("n...i,n...j->...ij", c, c) / (n - 1)
    se = np.sqrt((var[..., :, None] * var[..., None, :] + cov**2) / n)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se)
    # Cov(z_{t+1}, z_t): variance (S^{t+1}_ii S^t_jj + C_ij²) / n.
    emp_x = np.einsum("n...i,n...j->...ij", c[..., 1:, :], c[..., :-1, :]) / (n - 1)
    se_x = np.sqrt((var[..., 1:, :, None] * var[..., :-1, None, :] + cross**2) / n)
    np.testing.assert_array_less(np.abs(emp_x - cross), 5 * se_x)


def test_sample_shapes_and_log_prob_broadcast():
    rng = np.random.default_rng(4)
    prior = random_prior(rng, 3, 5, batch=(2,))
    post = random_posterior(rng, prior, batch=(4, 2), diag=True)
    for d in (prior, post):
        z = d.sample(jax.random.key(0), (6, 1))
        assert z.shape == (6, 1) + d.batch_shape + d.event_shape
        assert d.log_prob(z).shape == (6, 1) + d.batch_shape
        # a value without batch dims broadcasts against the batch
        assert d.log_prob(z[0, 0, ...][(0,) * len(d.batch_shape)]).shape == d.batch_shape


def test_distributions_are_pytrees_under_jit_and_vmap():
    rng = np.random.default_rng(5)
    prior = random_prior(rng, 2, 4)
    post = random_posterior(rng, prior, mask=True)
    z = jnp.asarray(rng.normal(size=(4, 2)))
    # jit: distributions pass through as arguments and come back out
    for d in (prior, post):
        lp, kl, d_out = jax.jit(lambda d: (d.log_prob(z), kl_divergence(d, prior), d))(d)
        np.testing.assert_allclose(lp, d.log_prob(z), rtol=1e-12)
        # atol: KL(prior ‖ prior) is 0, left as rounding of either sign (GPU: -1.8e-15)
        np.testing.assert_allclose(kl, kl_divergence(d, prior), rtol=1e-12, atol=1e-12)
        assert type(d_out) is type(d) and d_out.batch_shape == d.batch_shape
    # vmap over the potentials: the same as the batched distribution
    ys = jnp.asarray(rng.normal(size=(3, 4, 2)))

    def kl_of(y):
        return kl_divergence(LDSPosterior(prior, y, post.potential_cov), prior)

    batched = LDSPosterior(prior, ys, post.potential_cov)
    np.testing.assert_allclose(jax.vmap(kl_of)(ys), kl_divergence(batched, prior), rtol=1e-12)


def test_variances_equal_their_diagonal_covariance():
    """``potential_var`` (kept as ``[T, d]``, never a ``d × d`` matrix) against the same
    potentials as ``potential_cov = diag(var)``: KL, moments and log-normalizer agree, and
    the gradient w.r.t. the variances is the diagonal of that w.r.t. the covariances."""
    rng = np.random.default_rng(5)
    T, k, d = 7, 3, 2
    prior = random_prior(rng, k, T)
    y = jnp.asarray(rng.normal(size=(T, d)))
    var = jnp.asarray(rng.uniform(0.3, 2.0, size=(T, d)))
    H = jnp.asarray(rng.normal(size=(d, k)))
    mask = jnp.asarray(rng.uniform(size=T) > 0.3)
    rebuilt = copy.copy(prior)  # Terms A-C, not the shortcut against q.prior itself

    def stats(**cov):
        q = LDSPosterior(prior, y, emission_matrix=H, mask=mask, **cov)
        return kl_divergence(q, prior), kl_divergence(q, rebuilt), q.variance, q.log_normalizer

    diag_cov = jax.vmap(jnp.diag)(var)
    for a, b in zip(stats(potential_var=var), stats(potential_cov=diag_cov), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for p in (prior, rebuilt):

        def kl(p=p, **cov):
            return kl_divergence(LDSPosterior(prior, y, emission_matrix=H, mask=mask, **cov), p)

        g_var = jax.jit(jax.grad(lambda v: kl(potential_var=v)))(var)
        g_cov = jax.jit(jax.grad(lambda c: kl(potential_cov=c)))(diag_cov)
        np.testing.assert_allclose(g_var, jnp.diagonal(g_cov, axis1=-2, axis2=-1), rtol=1e-10)
