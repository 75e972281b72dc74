"""The floor recursions of ``benchmarks/cpu_floor.py`` compute what they stand for (float64).

The script bounds what an exact KL + gradient must cost from below by timing a Kalman
filter's covariance recursion and two-product affine recursions; the bound is only as good
as these being those recursions, in every form the helpers take (unrolled for ``k ≤ 8``,
LAPACK above; one sequence, and a batch as the package runs one).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from cpu_floor import affine_floor, batched, filter_floor

SIZES = [(3, 1), (12, 1), (3, 3), (12, 2)]


def _problem(k, T, batch, seed=0):
    rng = np.random.default_rng(seed)
    F = 0.9 * np.linalg.qr(rng.normal(size=(k, k)))[0]
    S = 0.1 * np.eye(k) + 0.01 * np.ones((k, k))
    P0 = np.eye(k)
    r = rng.uniform(0.5, 2.0, size=(batch, T, k))
    G = 0.5 * rng.normal(size=(batch, T, k, k)) / np.sqrt(k)
    L = np.broadcast_to(S, (batch, T, k, k))
    return F, S, P0, r, G, L


@pytest.mark.parametrize("k, batch", SIZES)
def test_filter_floor_is_the_kalman_covariance_recursion(k, batch):
    F, S, P0, r, _, _ = _problem(k, 6, batch)
    got = batched(filter_floor(jnp.asarray(F), jnp.asarray(S), jnp.asarray(P0)), 2)(r)
    expected = []
    for r_seq in r:
        P, out = P0, []
        for r_t in r_seq:
            Pp = F @ P @ F.T + S
            P = Pp - Pp @ np.linalg.solve(Pp + np.diag(r_t), Pp)  # P − P (P + R)⁻¹ P
            out.append(P)
        expected.append(out)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-10)


@pytest.mark.parametrize("k, batch", SIZES)
def test_affine_floor_is_the_two_product_recursion(k, batch):
    _, _, P0, _, G, L = _problem(k, 6, batch)
    got = batched(affine_floor(jnp.asarray(P0)), 3, 3)(G, L)
    expected = []
    for G_seq, L_seq in zip(G, L, strict=True):
        X, out = P0, []
        for G_t, L_t in zip(G_seq, L_seq, strict=True):
            X = G_t @ X @ G_t.T + L_t
            out.append(X)
        expected.append(out)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-10)
