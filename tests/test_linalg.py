"""The linear-algebra helpers against NumPy, in every form they can take (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from numpyro_lds import linalg

RTOL = 1e-12
# The declarations a helper can be traced under (linalg.tracing): its form depends on them.
CONTEXTS = {"plain": {}, "loop": {"loop": True}, "batched_loop": {"loop": True, "batched": True}}


def _spd(rng, shape, k):
    x = rng.normal(size=shape + (k, k))
    return x @ np.swapaxes(x, -1, -2) + k * np.eye(k)


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_small_products_are_the_same_in_every_form(k, context):
    # The form (sum of elementwise products, or broadcast product and reduction) depends on
    # where the code is traced; the value must not.
    rng = np.random.default_rng(0)
    a, b, x = rng.normal(size=(3, k, k)), rng.normal(size=(k, k)), rng.normal(size=(k,))

    def products(a, b, x):
        with linalg.tracing(**CONTEXTS[context]):
            return (
                linalg.matmul(a, b),
                linalg.matmul(b, b),
                linalg.matvec(a, x),
                linalg.matvec(b, x),
                linalg.sum_last(a),
            )

    got = jax.jit(products)(a, b, x)
    want = (a @ b, b @ b, a @ x, b @ x, a.sum(-1))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batch"])
def test_unrolled_factorization_and_solves_are_the_same_in_every_form(k, context, batch):
    # Single matrices in a scan body take one rsqrt per column and one reciprocal of the
    # diagonal; elsewhere the entries are divided. Both against NumPy.
    rng = np.random.default_rng(3)
    a, b = _spd(rng, batch, k), rng.normal(size=batch + (k, 2))

    def algebra(a, b):
        with linalg.tracing(**CONTEXTS[context]):
            chol = linalg.cholesky(a)
            return chol, linalg.solve_lower(chol, b), linalg.cho_solve(chol, b)

    chol, lower, cho = jax.jit(algebra)(a, b)
    want_chol = np.linalg.cholesky(a)
    np.testing.assert_allclose(chol, want_chol, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(lower, np.linalg.solve(want_chol, b), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(cho, np.linalg.solve(a, b), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("context", ["plain", "loop"])
def test_unrolled_factorization_of_a_singular_or_indefinite_matrix(context):
    # A zero last pivot gives a zero diagonal entry (as sqrt(0)), a negative one NaN, in
    # either form: never a finite factor of an indefinite matrix.

    def factor(a):
        with linalg.tracing(**CONTEXTS[context]):
            return linalg.cholesky(a)

    singular = jax.jit(factor)(np.array([[4.0, 2.0], [2.0, 1.0]]))
    np.testing.assert_array_equal(singular, [[2.0, 0.0], [1.0, 0.0]])
    indefinite = jax.jit(factor)(np.array([[1.0, 2.0], [2.0, 1.0]]))
    assert np.isnan(indefinite[1, 1])


@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("factor_batch", [(), (1,), (4,)])
def test_solves_with_shared_or_batched_factors(k, factor_batch):
    # k = 9 takes LAPACK: one solve with the right-hand sides as columns when the factor is
    # shared, a loop of single-matrix calls when it is batched.
    rng = np.random.default_rng(1)
    chol = np.linalg.cholesky(_spd(rng, factor_batch, k))
    b = rng.normal(size=(4, k, 2))
    r = rng.normal(size=(4, k))
    full = np.broadcast_to(chol, (4, k, k))
    want_lower = np.linalg.solve(full, b)
    want_cho = np.linalg.solve(full @ np.swapaxes(full, -1, -2), b)
    np.testing.assert_allclose(linalg.solve_lower(chol, b), want_lower, rtol=RTOL)
    np.testing.assert_allclose(linalg.cho_solve(chol, b), want_cho, rtol=1e-10)
    np.testing.assert_allclose(
        linalg.solve_lower_vec(chol, r), np.linalg.solve(full, r[..., None])[..., 0], rtol=RTOL
    )


@pytest.mark.parametrize("k", [3, 9])
def test_batched_cholesky_and_its_gradient(k):
    rng = np.random.default_rng(2)
    a = _spd(rng, (5,), k)
    np.testing.assert_allclose(linalg.cholesky(a), np.linalg.cholesky(a), rtol=1e-10)
    b = rng.normal(size=(5, k, 2))

    def f(a, b):
        return linalg.cho_solve(linalg.cholesky(a), b)

    check_grads(f, (jnp.asarray(a), jnp.asarray(b)), order=1, modes=("fwd", "rev"), rtol=1e-6)


@pytest.mark.parametrize("k", [3, 10])
@pytest.mark.parametrize("cov_shape", [(), (1,), (4,)], ids=["unbatched", "shared", "per_step"])
def test_gaussian_energy_value_and_closed_form_gradient(k, cov_shape):
    # Value: w·E[log N(x; μ, Σ)] for scatter = w·E[(x−μ)(x−μ)ᵀ], against NumPy; gradient:
    # the closed-form VJP against reverse mode through the Cholesky factorization.
    rng = np.random.default_rng(1)
    cov = _spd(rng, cov_shape, k)
    m, mu = rng.normal(size=(4, k)), rng.normal(size=(4, k))
    V = _spd(rng, (4,), k)
    w = 0.7
    scatter = w * (V + (m - mu)[:, :, None] * (m - mu)[:, None, :])
    got = linalg.gaussian_energy(scatter, w, cov)
    covs = np.broadcast_to(cov, (4, k, k))
    expected = [
        w
        * (
            -0.5 * np.trace(np.linalg.solve(c, v + np.outer(d, d)))
            - 0.5 * np.linalg.slogdet(2 * np.pi * c)[1]
        )
        for c, v, d in zip(covs, V, m - mu, strict=True)
    ]
    np.testing.assert_allclose(got, expected, rtol=RTOL)

    cot = rng.normal(size=4)

    def by_reverse_mode(scatter, weight, cov):
        return linalg._gaussian_energy(scatter, weight, linalg.cholesky(cov)) @ cot

    def closed_form(scatter, weight, cov):
        return linalg.gaussian_energy(scatter, weight, cov) @ cot

    args = (scatter, jnp.asarray(w), cov)
    want = jax.grad(by_reverse_mode, argnums=(0, 1, 2))(*args)
    have = jax.grad(closed_form, argnums=(0, 1, 2))(*args)
    for h, wnt in zip(have, want, strict=True):
        assert h.shape == wnt.shape
        np.testing.assert_allclose(h, wnt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["posterior_stats", "posterior_log_prob"])
def test_custom_vjp_rules_are_traced_under_the_declarations_of_the_call(fn, monkeypatch):
    # JAX traces a custom VJP's forward rule when it differentiates and its backward rule
    # when it transposes, after the caller's `tracing` block has exited: both must see the
    # declarations in force at the call (a vmapped sequence's scans otherwise take the
    # single-matrix forms, which cost 1.25-1.35x at batch 64).
    from numpyro_lds import posterior
    from numpyro_lds.chains import GaussMarkovChain
    from numpyro_lds.posterior import posterior_log_prob, posterior_stats
    from numpyro_lds.potentials import Potentials

    T, k = 5, 2
    chain = GaussMarkovChain(
        jnp.zeros(k), jnp.eye(k), 0.9 * jnp.eye(k)[None], jnp.zeros((1, k)), jnp.eye(k)[None]
    )
    seen = []
    # the forward rule's filter and the backward rule's gradient, as the rules see them
    for name in ("kalman_filter", "expected_log_joint_along_grad"):
        original = getattr(posterior, name)

        def recording(*args, _original=original, **kwargs):
            seen.append(linalg._CONTEXT.batched)
            return _original(*args, **kwargs)

        monkeypatch.setattr(posterior, name, recording)

    def single(y):
        potentials = Potentials(y, jnp.ones((T, k)), jnp.eye(k)[None], jnp.ones(T, bool))
        if fn == "posterior_stats":
            return jnp.sum(posterior_stats(chain, potentials).moments.means)
        return jnp.sum(posterior_log_prob(chain, potentials, y[None]))

    def batched(y):
        with linalg.tracing(batched=True):
            return jnp.sum(jax.vmap(single)(y))

    jax.grad(batched)(jnp.ones((3, T, k)))
    assert (linalg._CONTEXT.loop, linalg._CONTEXT.batched) == (0, 0)
    # Under grad, JAX traces the forward rule (which filters) and the backward rule (which
    # takes the expected log-joint's gradient), not the primal: both traced batched.
    assert len(seen) == 2 and all(seen), seen
