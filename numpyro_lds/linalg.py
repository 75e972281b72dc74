"""Small, broadcasting linear-algebra helpers for Gaussian computations.

Every matrix product runs at ``Precision.HIGHEST`` so that TF32 or bf16 passes on
accelerators cannot break the symmetry or positive definiteness of a covariance.
Every helper broadcasts over leading (batch) dimensions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# Small matrices (k <= UNROLL_MAX_K) are factorized and solved with unrolled elementwise
# operations: XLA fuses them, and they are several times faster than LAPACK calls per step.
# Larger *batches* of larger matrices on CPU (the per-step algebra vectorized over time)
# use a fori_loop over columns (rows) of batched elementwise operations, again no LAPACK:
# on a 2-thread CPU, jaxlib 0.10's runtime deadlocks when it runs two batched LAPACK calls
# concurrently (seen with the KL gradient at k = 4, T = 3·10⁴ before unrolling, and with
# the KL at k = 64, T = 1 000 with LAPACK in chunks). A single matrix (a step inside a scan)
# uses LAPACK. On GPUs larger matrices use the vendor's batched solvers.
UNROLL_MAX_K = 8


@jax.custom_jvp
def _cholesky_loop(a):
    """Column-by-column Cholesky as a ``fori_loop`` of batched elementwise ops (no LAPACK)."""
    k = a.shape[-1]
    idx = jnp.arange(k)

    def column(j, L):
        e_j = (idx == j).astype(a.dtype)
        row_j = jnp.sum(L * e_j[:, None], -2)  # L[j, :], zero from column j on
        a_j = jnp.sum(a * e_j, -1)  # a[:, j]
        d = jnp.sqrt(jnp.sum(a_j * e_j, -1) - jnp.sum(row_j * row_j, -1))
        col = (a_j - jnp.sum(L * row_j[..., None, :], -1)) / d[..., None]
        col = jnp.where(idx > j, col, jnp.where(idx == j, d[..., None], 0.0))
        return L + col[..., :, None] * e_j

    return lax.fori_loop(0, k, column, jnp.zeros_like(a))


@_cholesky_loop.defjvp
def _cholesky_loop_jvp(primals, tangents):
    # dL = L Φ(L⁻¹ dA L⁻ᵀ), Φ: lower triangle with half the diagonal; no loop to differentiate.
    (a,), (da,) = primals, tangents
    L = _cholesky_loop(a)
    w = _solve_lower_loop(L, symmetrize(da))
    w = _solve_lower_loop(L, transpose(w))
    phi = jnp.tril(w) - 0.5 * jnp.eye(a.shape[-1], dtype=a.dtype) * w
    return L, matmul(L, phi)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _solve_lower_loop(chol, b, transpose_a=False):
    """Forward (or, for ``cholᵀ``, backward) substitution as a ``fori_loop`` (no LAPACK)."""
    k = chol.shape[-1]
    idx = jnp.arange(k)
    rows = transpose(chol) if transpose_a else chol
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)

    def row(n, x):
        i = k - 1 - n if transpose_a else n
        e_i = (idx == i).astype(b.dtype)
        r_i = jnp.sum(rows * e_i[:, None], -2)  # row i; unsolved entries of x are zero
        s = jnp.sum(b * e_i[:, None], -2) - jnp.sum(r_i[..., :, None] * x, -2)
        x_i = s / jnp.sum(diag * e_i, -1)[..., None]
        return x + e_i[:, None] * x_i[..., None, :]

    return lax.fori_loop(0, k, row, jnp.zeros_like(b))


@_solve_lower_loop.defjvp
def _solve_lower_loop_jvp(transpose_a, primals, tangents):
    # x = L⁻¹ b: dx = L⁻¹ (db − dL x); linear in the tangents, so reverse mode transposes a
    # loop that needs only L, not a stored trajectory.
    chol, b = primals
    d_chol, d_b = tangents
    x = _solve_lower_loop(chol, b, transpose_a)
    d_l = transpose(d_chol) if transpose_a else d_chol
    return x, _solve_lower_loop(chol, d_b - matmul(d_l, x), transpose_a)


def _cholesky_unrolled(a):
    k = a.shape[-1]
    L = [[None] * k for _ in range(k)]
    for j in range(k):
        d = jnp.sqrt(a[..., j, j] - sum((L[j][p] ** 2 for p in range(j)), 0.0))
        L[j][j] = d
        for i in range(j + 1, k):
            L[i][j] = (a[..., i, j] - sum((L[i][p] * L[j][p] for p in range(j)), 0.0)) / d
    zero = jnp.zeros_like(a[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(k)], -1) for i in range(k)]
    return jnp.stack(rows, -2)


def _solve_lower_unrolled(chol, b, transpose_a=False):
    """Forward (or, for ``cholᵀ``, backward) substitution; broadcasts batch dims."""
    k = chol.shape[-1]
    x = [None] * k
    order = reversed(range(k)) if transpose_a else range(k)
    for i in order:
        s = b[..., i, :]
        others = range(i + 1, k) if transpose_a else range(i)
        for j in others:
            coef = chol[..., j, i] if transpose_a else chol[..., i, j]
            s = s - coef[..., None] * x[j]
        x[i] = s / chol[..., i, i][..., None]
    return jnp.stack(x, -2)


def transpose(a):
    """Swap the last two axes."""
    return jnp.swapaxes(a, -1, -2)


def symmetrize(a):
    """Return ``(a + aᵀ) / 2``; removes round-off asymmetry of a covariance."""
    return 0.5 * (a + transpose(a))


def matmul(a, b):
    """Batched matrix product at highest precision.

    Up to ``UNROLL_MAX_K`` inner dimensions it is a broadcast product and a sum, which XLA
    fuses with the surrounding elementwise work: inside a scan over time a dot call per
    small product costs more in dispatch than the arithmetic.
    """
    if a.shape[-1] <= UNROLL_MAX_K:
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    return jnp.matmul(a, b, precision=HIGHEST)


def matvec(a, x):
    """Batched matrix-vector product ``a @ x`` at highest precision (fused for small k)."""
    if a.shape[-1] <= UNROLL_MAX_K:
        return jnp.sum(a * x[..., None, :], axis=-1)
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
    return _solve(chol, b, transpose_a=False)


def _solve(chol, b, transpose_a):
    if chol.shape[-1] <= UNROLL_MAX_K:
        return _solve_lower_unrolled(chol, b, transpose_a)
    chol, b = _broadcast_batch(chol, b, 2, 2)
    if jax.default_backend() == "cpu" and chol.ndim > 2:
        return _solve_lower_loop(chol, b, transpose_a)
    return _tri_solve(chol, b, transpose_a)


def _tri_solve(chol, b, transpose_a=False):
    return lax.linalg.triangular_solve(chol, b, left_side=True, lower=True, transpose_a=transpose_a)


def solve_lower_vec(chol, r):
    """Solve ``chol @ x = r`` for lower-triangular ``chol`` and vector ``r``."""
    return solve_lower(chol, r[..., None])[..., 0]


def cho_solve(chol, b):
    """Solve ``(chol @ cholᵀ) @ x = b`` for matrix ``b``."""
    return _solve(chol, _solve(chol, b, transpose_a=False), transpose_a=True)


def cholesky(a):
    """Lower Cholesky factor of the symmetrized ``a`` (NaN where ``a`` is not positive definite)."""
    a = symmetrize(a)
    if a.shape[-1] <= UNROLL_MAX_K:
        return _cholesky_unrolled(a)
    if jax.default_backend() == "cpu" and a.ndim > 2:
        return _cholesky_loop(a)
    return jnp.linalg.cholesky(a)


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
