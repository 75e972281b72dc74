"""The expectations the KL needs (``numpyro_lds.expectations``): their written-out VJPs
against reverse mode of the same algebra, in float64, for shared and time-varying
dynamics and both forms of potential covariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _sym(a):
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def _random_log_joint_inputs(rng, shared, diagonal, T=9, k=3, d=2):
    """A chain, masked potentials (``d ≠ k``) and moments for the expected log-joint.

    The moments need not be consistent with anything: the expression is affine in them.
    """
    from numpyro_lds.chains import GaussMarkovChain, Moments
    from numpyro_lds.potentials import Potentials

    n = 1 if shared else T - 1

    def spd(*shape):
        x = rng.normal(size=shape + (shape[-1],))
        return jnp.asarray(x @ np.swapaxes(x, -1, -2) + shape[-1] * np.eye(shape[-1]))

    chain = GaussMarkovChain(
        jnp.asarray(rng.normal(size=k)),
        spd(k),
        jnp.asarray(rng.normal(size=(n, k, k))),
        jnp.asarray(rng.normal(size=(n, k))),
        spd(n, k),
    )
    pot = Potentials(
        jnp.asarray(rng.normal(size=(T, d))),
        jnp.asarray(rng.uniform(0.5, 2.0, size=(T, d))) if diagonal else spd(T, d),
        jnp.asarray(rng.normal(size=(1 if shared else T, d, k))),
        jnp.asarray(rng.uniform(size=T) > 0.3),
    )
    moments = Moments(jnp.asarray(rng.normal(size=(T, k))), spd(T, k), spd(T - 1, k))
    return chain, pot, moments


def _assert_trees_close(have, want):
    for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full_cov", "diagonal_cov"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "time_varying"])
def test_written_out_surrogate_gradient_equals_reverse_mode(shared, diagonal):
    """The custom VJP's last step, the gradient of ``w·E[log joint] + its tangent`` w.r.t.
    the dynamics and the potentials, is written out; against reverse mode of the same
    expression, with shared or per-step dynamics and emission matrices, d ≠ k, masks, and
    full or diagonal (variances ``[T, d]``) potential covariances."""
    from numpyro_lds.chains import Moments
    from numpyro_lds.expectations import expected_log_joint_along, expected_log_joint_along_grad
    from numpyro_lds.potentials import Potentials

    rng = np.random.default_rng(2)
    chain, pot, moments = _random_log_joint_inputs(rng, shared, diagonal)
    T, k = moments.means.shape
    tangent = Moments(
        jnp.asarray(rng.normal(size=(T, k))),
        jnp.asarray(_sym(rng.normal(size=(T, k, k)))),
        jnp.asarray(rng.normal(size=(T - 1, k, k))),
    )
    weight = -0.7

    def surrogate(chain, mean, cov, emission):
        pot_ = Potentials(mean, cov, emission, pot.mask)
        return expected_log_joint_along(moments, tangent, weight, chain, pot_)

    want_chain, *want_pot = jax.grad(surrogate, argnums=(0, 1, 2, 3))(
        chain, pot.mean, pot.cov, pot.emission_matrix
    )
    have_chain, have_pot = expected_log_joint_along_grad(moments, tangent, weight, chain, pot)
    _assert_trees_close((have_chain, list(have_pot[:3])), (want_chain, want_pot))


@pytest.mark.parametrize("terms", ["log_joint", "transitions"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["full_cov", "diagonal_cov"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "time_varying"])
def test_expected_log_density_vjp_equals_reverse_mode(shared, diagonal, terms):
    """``expected_log_joint`` and ``expected_transition_log_prob`` (Term C) have a written-out
    VJP, also w.r.t. the moments (which carry the KL's gradient into the posterior's custom
    VJP); against reverse mode of the plain expression, for every input, at a cotangent ≠ 1."""
    from numpyro_lds.expectations import (
        expected_log_joint,
        expected_log_joint_along,
        expected_transition_log_prob,
    )
    from numpyro_lds.potentials import Potentials

    rng = np.random.default_rng(3)
    chain, pot, moments = _random_log_joint_inputs(rng, shared, diagonal)

    def with_potentials(fn):
        def value(moments, chain, mean, cov, emission):
            return -1.3 * fn(moments, chain, Potentials(mean, cov, emission, pot.mask))

        return value

    if terms == "log_joint":
        have_fn = expected_log_joint
        want_fn = lambda m, c, p: expected_log_joint_along(m, None, 1.0, c, p)  # noqa: E731
    else:
        have_fn = lambda m, c, p: expected_transition_log_prob(m, c)  # noqa: E731
        want_fn = lambda m, c, p: expected_log_joint_along(m, None, 1.0, c, None, False)  # noqa: E731
    args = (moments, chain, pot.mean, pot.cov, pot.emission_matrix)
    have = jax.value_and_grad(with_potentials(have_fn), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.value_and_grad(with_potentials(want_fn), argnums=(0, 1, 2, 3, 4))(*args)
    _assert_trees_close(have, want)
