"""The conjugate-computation algebra (``numpyro_lds.conjugate``): the modified LDL
projection, potentials and natural parameters, the likelihood's curvature.

Float64 against plain linear algebra and ``jax.hessian``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_lds.conjugate import (
    information_from_potential,
    likelihood_curvature,
    modified_ldl,
    potential_from_information,
)

T, K, D = 5, 2, 3


# --------------------------------------------------------------------------- algebra


@pytest.mark.parametrize("rank", [3, 2, 0])
def test_modified_ldl_reproduces_positive_semidefinite_matrices(rank):
    rng = np.random.default_rng(rank)
    a = rng.normal(size=(3, rank))
    lam = a @ a.T
    L, d = modified_ldl(jnp.asarray(lam))
    np.testing.assert_array_equal(np.diag(np.asarray(L)), 1.0)
    np.testing.assert_allclose(np.triu(np.asarray(L), 1), 0.0)
    assert np.all(np.asarray(d) >= 0)
    np.testing.assert_allclose(np.asarray(L) * np.asarray(d) @ np.asarray(L).T, lam, atol=1e-12)


def test_modified_ldl_projects_an_indefinite_matrix_and_never_increases_it():
    lam = np.array([[2.0, 1.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.5, 1.0]])
    L, d = (np.asarray(x) for x in modified_ldl(jnp.asarray(lam)))
    proj = L * d @ L.T
    assert np.all(np.linalg.eigvalsh(proj) >= -1e-12)
    assert d[1] == 0.0  # the negative pivot, set to zero with its column
    np.testing.assert_allclose(proj[0, 0], 2.0)


@pytest.mark.parametrize("diagonal", [False, True])
def test_potentials_and_natural_parameters_round_trip(diagonal):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(T, K, K))
    lam = np.einsum("tij,tkj->tik", a, a)
    lam[2] = np.outer([1.0, 2.0], [1.0, 2.0])  # rank one: a direction of zero precision
    lam[3] = 0.0  # no potential at this step
    if diagonal:
        lam = lam * np.eye(K)
    h = np.einsum("tij,tj->ti", lam, rng.normal(size=(T, K)))  # on the range of Λ
    params = potential_from_information(jnp.asarray(h), jnp.asarray(lam), diagonal=diagonal)
    h2, lam2 = information_from_potential(*params)
    np.testing.assert_allclose(lam2, lam, atol=1e-12)
    np.testing.assert_allclose(h2, h, atol=1e-12)


def test_likelihood_curvature_gives_the_hessian_blocks():
    rng = np.random.default_rng(1)
    C = jnp.asarray(rng.normal(size=(4, K)))
    y = jnp.asarray(rng.poisson(2.0, size=(2, T, 4)).astype(float))

    def fn(values):
        rate = jnp.exp(values["z"] @ C.T)
        return jnp.sum(y * jnp.log(rate) - rate)

    z = {"z": jnp.asarray(0.3 * rng.normal(size=(2, T, K)))}
    grads, hessians = likelihood_curvature(fn, z)
    dense = jax.hessian(lambda v: fn({"z": v.reshape(2, T, K)}))(z["z"].ravel())
    dense = np.asarray(dense).reshape(2, T, K, 2, T, K)
    for b in range(2):
        for t in range(T):
            np.testing.assert_allclose(hessians["z"][b, t], dense[b, t, :, b, t, :], rtol=1e-12)
    np.testing.assert_allclose(grads["z"], jax.grad(fn)(z)["z"], rtol=1e-12)
