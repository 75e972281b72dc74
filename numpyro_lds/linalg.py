"""Small, broadcasting linear-algebra helpers for Gaussian computations.

Every matrix product runs at ``Precision.HIGHEST`` so that TF32 or bf16 passes on
accelerators cannot break the symmetry or positive definiteness of a covariance.
Every helper broadcasts over leading (batch) dimensions.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def transpose(a):
    """Swap the last two axes."""
    return jnp.swapaxes(a, -1, -2)


def symmetrize(a):
    """Return ``(a + aᵀ) / 2``; removes round-off asymmetry of a covariance."""
    return 0.5 * (a + transpose(a))


def matmul(a, b):
    """Batched matrix product at highest precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def matvec(a, x):
    """Batched matrix-vector product ``a @ x`` at highest precision."""
    return jnp.einsum("...ij,...j->...i", a, x, precision=HIGHEST)


def quad_form(a, b):
    """Return ``a @ b @ aᵀ`` (symmetrized), the covariance of ``a x`` when ``Cov(x) = b``."""
    return symmetrize(matmul(matmul(a, b), transpose(a)))


def _broadcast_batch(a, b, a_core: int, b_core: int):
    batch = jnp.broadcast_shapes(a.shape[:-a_core], b.shape[:-b_core])
    return (
        jnp.broadcast_to(a, batch + a.shape[-a_core:]),
        jnp.broadcast_to(b, batch + b.shape[-b_core:]),
    )


def solve_lower(chol, b):
    """Solve ``chol @ x = b`` for lower-triangular ``chol`` and matrix ``b``."""
    chol, b = _broadcast_batch(chol, b, 2, 2)
    return lax.linalg.triangular_solve(chol, b, left_side=True, lower=True)


def solve_lower_vec(chol, r):
    """Solve ``chol @ x = r`` for lower-triangular ``chol`` and vector ``r``."""
    return solve_lower(chol, r[..., None])[..., 0]


def cho_solve(chol, b):
    """Solve ``(chol @ cholᵀ) @ x = b`` for matrix ``b``."""
    chol, b = _broadcast_batch(chol, b, 2, 2)
    y = lax.linalg.triangular_solve(chol, b, left_side=True, lower=True)
    return lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)


def cholesky(a):
    """Lower Cholesky factor of the symmetrized ``a`` (NaN where ``a`` is not positive definite)."""
    return jnp.linalg.cholesky(symmetrize(a))


def logdet_from_chol(chol):
    """``log det(chol @ cholᵀ)``."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def trace_solve(chol, m):
    """``tr((chol @ cholᵀ)⁻¹ m)`` for symmetric ``m``, as ``‖chol⁻¹ m chol⁻ᵀ‖`` trace."""
    w = solve_lower(chol, m)
    w = solve_lower(chol, transpose(w))
    return jnp.trace(w, axis1=-2, axis2=-1)


def mvn_log_prob(x, mean, chol):
    """``log N(x; mean, chol @ cholᵀ)``, broadcasting over leading dimensions."""
    k = x.shape[-1]
    w = solve_lower_vec(chol, x - mean)
    return -0.5 * (k * math.log(2 * math.pi) + logdet_from_chol(chol) + jnp.sum(w * w, -1))


def expected_mvn_log_prob(m, cov, mean, chol):
    """``E_{x ~ N(m, cov)}[log N(x; mean, chol @ cholᵀ)]``.

    Equal to ``log N(m; mean, S) − tr(S⁻¹ cov) / 2`` with ``S = chol @ cholᵀ``.
    """
    return mvn_log_prob(m, mean, chol) - 0.5 * trace_solve(chol, cov)


def mvn_entropy(chol):
    """Entropy of ``N(·, chol @ cholᵀ)``: ``(k log(2πe) + log det) / 2``."""
    k = chol.shape[-1]
    return 0.5 * (k * math.log(2 * math.pi * math.e) + logdet_from_chol(chol))


def mvn_kl(m_q, chol_q, m_p, chol_p):
    """``KL(N(m_q, L_q L_qᵀ) ‖ N(m_p, L_p L_pᵀ))``."""
    k = m_q.shape[-1]
    a = solve_lower(chol_p, chol_q)
    r = solve_lower_vec(chol_p, m_p - m_q)
    return 0.5 * (
        jnp.sum(a * a, (-2, -1))
        + jnp.sum(r * r, -1)
        - k
        + logdet_from_chol(chol_p)
        - logdet_from_chol(chol_q)
    )
