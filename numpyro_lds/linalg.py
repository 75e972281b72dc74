"""Small, broadcasting linear-algebra helpers for Gaussian computations.

Every matrix product runs at ``Precision.HIGHEST`` so that TF32 or bf16 passes on
accelerators cannot break the symmetry or positive definiteness of a covariance.
Every helper broadcasts over leading (batch) dimensions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# Small matrices (k <= UNROLL_MAX_K) are factorized and solved with unrolled elementwise
# operations: XLA fuses them, they are several times faster than LAPACK calls per step, and
# they avoid LAPACK custom calls, which on a 2-thread CPU deadlock (jaxlib 0.10) when XLA runs
# two batched calls concurrently (seen with the gradient of the KL at T = 3·10⁴). Larger
# matrices use LAPACK over at most LAPACK_CHUNK matrices per call, in sequence.
UNROLL_MAX_K = 8
LAPACK_CHUNK = 64


def _chunked(fn, *arrays, core_ndims):
    """Apply batched ``fn`` in chunks of at most ``LAPACK_CHUNK`` along the flattened batch."""
    batch = arrays[0].shape[: arrays[0].ndim - core_ndims[0]]
    size = math.prod(batch)
    # Only the CPU runtime needs it; on a GPU one batched call is much faster (at T = 10⁶ the
    # chunks would be 15 625 calls in sequence).
    if size <= LAPACK_CHUNK or jax.default_backend() != "cpu":
        return fn(*arrays)
    flat = [
        a.reshape((size,) + a.shape[a.ndim - nd :])
        for a, nd in zip(arrays, core_ndims, strict=True)
    ]
    pad = -size % LAPACK_CHUNK  # whole chunks only: no remainder call running beside the loop
    flat = [jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])]) for a in flat]
    chunks = [a.reshape((-1, LAPACK_CHUNK) + a.shape[1:]) for a in flat]
    out = lax.map(lambda xs: fn(*xs), tuple(chunks))
    return out.reshape((-1,) + out.shape[2:])[:size].reshape(batch + out.shape[2:])


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
    fn = _tri_solve_t if transpose_a else _tri_solve
    return _chunked(fn, chol, b, core_ndims=(2, 2))


def _tri_solve(chol, b, transpose_a=False):
    return lax.linalg.triangular_solve(chol, b, left_side=True, lower=True, transpose_a=transpose_a)


def _tri_solve_t(chol, b):
    return _tri_solve(chol, b, transpose_a=True)


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
    return _chunked(jnp.linalg.cholesky, a, core_ndims=(2,))


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
