"""Small, broadcasting linear-algebra helpers for Gaussian computations.

Every matrix product runs at ``Precision.HIGHEST`` so that TF32 or bf16 passes on
accelerators cannot break the symmetry or positive definiteness of a covariance.
Every helper broadcasts over leading (batch) dimensions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# Small matrices (k <= UNROLL_MAX_K) are factorized and solved with unrolled elementwise
# operations: XLA fuses them, where a LAPACK call per step is one library call each.
# Larger matrices use LAPACK (cuSolver on GPUs). On CPU a *batch* of them (the per-step
# algebra vectorized over time) is factorized matrix by matrix in a loop (`_per_matrix`),
# never in one batched LAPACK call: on a 2-thread CPU, jaxlib 0.10's runtime deadlocks when
# it runs two batched LAPACK calls concurrently (seen with the KL gradient at k = 4,
# T = 3·10⁴ before unrolling, and with the KL at k = 64, T = 1 000).
UNROLL_MAX_K = 8


def _per_matrix(fn, *arrays):
    """``fn`` of matrices, applied one matrix at a time (a loop of single LAPACK calls).

    ``fn``'s result has the shape of its last argument, and overwrites it matrix by matrix
    in the loop's buffer: the buffer starts as that argument, not as zeros, so XLA neither
    allocates it at the start of the program (where it placed the zero-filled outputs of
    every such loop, all alive at once) nor keeps the argument and the result both.
    """
    batch = arrays[-1].shape[:-2]
    *others, last = [x.reshape((-1,) + x.shape[-2:]) for x in arrays]
    if last.shape[0] == 0:  # an empty batch: nothing to factorize
        return arrays[-1]

    def body(i, out):
        return lax.dynamic_update_index_in_dim(out, fn(*(x[i] for x in others), out[i]), i, 0)

    out = lax.fori_loop(0, last.shape[0], body, last)
    return out.reshape(batch + out.shape[-2:])


def _cholesky_unrolled(a):
    k = a.shape[-1]
    reciprocal = _scalar_loop_body(a)
    L = [[None] * k for _ in range(k)]
    for j in range(k):
        pivot = a[..., j, j] - sum((L[j][p] ** 2 for p in range(j)), 0.0)
        if reciprocal:
            inv_d = lax.rsqrt(pivot)
            L[j][j] = jnp.where(pivot == 0, 0.0, pivot * inv_d)  # sqrt(pivot), also at 0
        else:
            L[j][j] = jnp.sqrt(pivot)
        for i in range(j + 1, k):
            r = a[..., i, j] - sum((L[i][p] * L[j][p] for p in range(j)), 0.0)
            L[i][j] = r * inv_d if reciprocal else r / L[j][j]
    zero = jnp.zeros_like(a[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(k)], -1) for i in range(k)]
    return jnp.stack(rows, -2)


def _solve_lower_unrolled(chol, b, transpose_a=False):
    """Forward (or, for ``cholᵀ``, backward) substitution; broadcasts batch dims."""
    k = chol.shape[-1]
    if _scalar_loop_body(chol):
        inv_diag = 1.0 / jnp.stack([chol[..., i, i] for i in range(k)], -1)
        pivot = lambda s, i: s * inv_diag[..., i, None]  # noqa: E731
    else:
        pivot = lambda s, i: s / chol[..., i, i][..., None]  # noqa: E731
    x = [None] * k
    order = reversed(range(k)) if transpose_a else range(k)
    for i in order:
        s = b[..., i, :]
        others = range(i + 1, k) if transpose_a else range(i)
        for j in others:
            coef = chol[..., j, i] if transpose_a else chol[..., i, j]
            s = s - coef[..., None] * x[j]
        x[i] = pivot(s, i)
    return jnp.stack(x, -2)


def _inverse_unrolled(a):
    """Gauss–Jordan elimination with partial pivoting, in unrolled elementwise operations.

    Each column's pivot is the largest entry on or below the diagonal (selected by
    ``argmax``, the rows swapped by ``where``): as LAPACK's ``getrf``, unchanged by a
    scaling of the columns, and without its per-matrix call in a scan's body.
    """
    k = a.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), a.shape)
    rows = [jnp.concatenate([a[..., i, :], eye[..., i, :]], -1) for i in range(k)]
    for j in range(k):
        below = jnp.stack([jnp.abs(rows[i][..., j]) for i in range(j, k)], -1)
        choice = jnp.argmax(below, axis=-1)
        picked = [(choice == i - j)[..., None] for i in range(j, k)]
        pivot_row = sum(
            (jnp.where(p, rows[i], 0.0) for p, i in zip(picked, range(j, k), strict=True)), 0.0
        )
        for p, i in zip(picked[1:], range(j + 1, k), strict=True):
            rows[i] = jnp.where(p, rows[j], rows[i])
        rows[j] = pivot_row / pivot_row[..., j, None]
        for i in range(k):
            if i != j:
                rows[i] = rows[i] - rows[i][..., j, None] * rows[j]
    return jnp.stack([r[..., k:] for r in rows], -2)


def _unrolled_or_library(unrolled, library, a):
    """``unrolled(a)`` for ``k <= UNROLL_MAX_K``, else ``library(a)``.

    The library's factorization (LAPACK, or the GPU's) runs one matrix at a time on CPU
    (:func:`_per_matrix`).
    """
    if a.shape[-1] <= UNROLL_MAX_K:
        return unrolled(a)
    if jax.default_backend() == "cpu" and a.ndim > 2:
        return _per_matrix(library, a)
    return library(a)


def inverse(a):
    """``a⁻¹`` for square, not necessarily symmetric ``a [..., k, k]``.

    By elimination with partial pivoting (unrolled for ``k <= UNROLL_MAX_K``, LAPACK above, one
    matrix at a time on CPU as :func:`cholesky`).
    """
    return _unrolled_or_library(_inverse_unrolled, jnp.linalg.inv, a)


def transpose(a):
    """Swap the last two axes."""
    return jnp.swapaxes(a, -1, -2)


def symmetrize(a):
    """Return ``(a + aᵀ) / 2``; removes round-off asymmetry of a covariance."""
    return 0.5 * (a + transpose(a))


class _TraceContext(threading.local):
    loop = 0  # > 0 while a scan body is traced
    batched = 0  # > 0 while code is traced under vmap or across blocks


_CONTEXT = _TraceContext()


@contextlib.contextmanager
def tracing(*, loop=False, batched=False):
    """Declare that the code traced inside is a scan body and/or batched.

    Only the *form* of the small-k products changes (see :func:`matmul`), never a value.
    """
    _CONTEXT.loop += int(loop)
    _CONTEXT.batched += int(batched)
    try:
        yield
    finally:
        _CONTEXT.loop -= int(loop)
        _CONTEXT.batched -= int(batched)


def tracing_state() -> tuple[int, int]:
    """The declarations of :func:`tracing` in force now, hashable.

    A custom VJP's rules are traced later than its call (the forward rule when JAX
    differentiates, the backward rule when it transposes), after the ``with`` blocks around
    the call have exited: pass this state to the custom VJP as a non-differentiable argument
    and trace both rules under :func:`traced_as` it. Lost, a vmapped sequence's scans take
    the single-matrix forms, whose reductions XLA hands to a library call one product at a
    time.
    """
    return (_CONTEXT.loop, _CONTEXT.batched)


@contextlib.contextmanager
def traced_as(state: tuple[int, int]):
    """Trace the code inside under the declarations ``state`` (from :func:`tracing_state`)."""
    saved = tracing_state()
    _CONTEXT.loop, _CONTEXT.batched = state
    try:
        yield
    finally:
        _CONTEXT.loop, _CONTEXT.batched = saved


def _elementwise_products(*arrays):
    """Whether small-k products are written as sums of elementwise products (see matmul)."""
    if jax.default_backend() != "cpu":
        return False
    unbatched = not _CONTEXT.batched and max(jnp.ndim(a) for a in arrays) <= 2
    return not (_CONTEXT.loop and unbatched)


def _scalar_loop_body(*arrays):
    """Whether single small matrices are factorized in a scan body on CPU.

    There a divide or square root ends a fused kernel (XLA does not duplicate an
    "expensive" operation into several consumers), and a kernel launch costs more than
    its arithmetic: the unrolled Cholesky takes one ``rsqrt`` per column and the
    triangular solves one reciprocal of the diagonal, then products (``k`` kernels instead
    of ``k (k + 1) / 2``). Vectorized code (batches, blocks) keeps the divides, which
    measured faster there (``docs/performance.md``, design notes).
    """
    return jax.default_backend() == "cpu" and not _elementwise_products(*arrays)


def _unrolled_sum(terms):
    """``t₁ + t₂ + …`` as elementwise adds: no reduction for XLA to hand to a library call."""
    return functools.reduce(jnp.add, terms)


def sum_last(x):
    """``x.sum(-1)``; for a short last axis in the form :func:`matmul` would choose."""
    n = x.shape[-1]
    if n <= UNROLL_MAX_K and _elementwise_products(x):
        return _unrolled_sum(x[..., p] for p in range(n))
    return jnp.sum(x, -1)


def matmul(a, b):
    """Batched matrix product at highest precision.

    Up to ``UNROLL_MAX_K`` inner dimensions it is elementwise work that XLA fuses with its
    surroundings (inside a scan over time a dot call per small product costs more in
    dispatch than the arithmetic), in one of two forms, chosen by measurement on CPU:

    - a sum of ``k`` elementwise products, wherever the operands are batched (under
      :func:`tracing` ``batched=True``, or with batch dims) or outside a scan body. A
      reduction instead would be handed by XLA's CPU backend to YNNPACK once it spans
      4 096 elements, one library call per product, slow inside a loop body;
    - a broadcast product and one reduction, for single matrices in a scan body (fuses
      into fewer kernels than the sum form), and
      on GPUs, where the reduction is what was measured (``benchmarks/gpu_check.py``).
    """
    k = a.shape[-1]
    if k <= UNROLL_MAX_K and _elementwise_products(a, b):
        return _unrolled_sum(a[..., :, p, None] * b[..., None, p, :] for p in range(k))
    if k <= UNROLL_MAX_K:
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    return jnp.matmul(a, b, precision=HIGHEST)


def matvec(a, x):
    """Batched matrix-vector product ``a @ x`` at highest precision (small k: see matmul)."""
    k = a.shape[-1]
    if k <= UNROLL_MAX_K and _elementwise_products(a, x):
        return _unrolled_sum(a[..., :, p] * x[..., p, None] for p in range(k))
    if k <= UNROLL_MAX_K:
        return jnp.sum(a * x[..., None, :], axis=-1)
    return jnp.einsum("...ij,...j->...i", a, x, precision=HIGHEST)


def outer_sum(a, b):
    """``Σ_t a_t b_tᵀ`` over the leading axis of ``a [n, i]`` and ``b [n, j]``: ``[1, i, j]``.

    One contraction over ``n`` (a library dot), never the ``[n, i, j]`` outer products.
    """
    return jnp.einsum("ti,tj->ij", a, b, precision=HIGHEST)[None]


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
    k = chol.shape[-1]
    if k <= UNROLL_MAX_K:
        return _solve_lower_unrolled(chol, b, transpose_a)
    if math.prod(chol.shape[:-2]) == 1 and b.ndim > 2:
        # One factor shared by a batch of right-hand sides: one solve with them as columns.
        cols = jnp.moveaxis(b, -2, 0)
        x = _tri_solve(chol.reshape(k, k), cols.reshape(k, -1), transpose_a)
        x = jnp.moveaxis(x.reshape(cols.shape), 0, -2)
        batch = jnp.broadcast_shapes(chol.shape[:-2], b.shape[:-2])
        return jnp.broadcast_to(x, batch + x.shape[-2:])
    chol, b = _broadcast_batch(chol, b, 2, 2)
    if jax.default_backend() == "cpu" and chol.ndim > 2:
        return _per_matrix(functools.partial(_tri_solve, transpose_a=transpose_a), chol, b)
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
    return _unrolled_or_library(_cholesky_unrolled, jnp.linalg.cholesky, symmetrize(a))


def logdet_from_chol(chol):
    """``log det(chol @ cholᵀ)``."""
    return 2.0 * sum_last(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))


def trace_solve(chol, m):
    """``tr((chol @ cholᵀ)⁻¹ m)`` for symmetric ``m``, as ``‖chol⁻¹ m chol⁻ᵀ‖`` trace."""
    w = solve_lower(chol, m)
    w = solve_lower(chol, transpose(w))
    return jnp.trace(w, axis1=-2, axis2=-1)


def mvn_log_prob(x, mean, chol):
    """``log N(x; mean, chol @ cholᵀ)``, broadcasting over leading dimensions."""
    k = x.shape[-1]
    w = solve_lower_vec(chol, x - mean)
    return -0.5 * (k * math.log(2 * math.pi) + logdet_from_chol(chol) + sum_last(w * w))


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


def sum_to_shape(x, shape):
    """Sum ``x`` over the axes that broadcasting added to an array of ``shape``."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    pairs = enumerate(zip(x.shape, shape, strict=True))
    axes = tuple(i for i, (n, s) in pairs if s == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def gaussian_energy(scatter, weight, cov):
    """``−tr(cov⁻¹ scatter)/2 − weight · log det(2π cov)/2``, broadcasting over batch dims.

    With ``scatter = w · E[(x − μ)(x − μ)ᵀ]`` this is ``w · E[log N(x; μ, cov)]``; every
    expected Gaussian log-density is affine in ``(w, scatter)``. Its gradient is closed-form,
    so reverse mode does not differentiate the Cholesky factorization of ``cov``:
    ``∂/∂scatter = −cov⁻¹/2``, ``∂/∂weight = −log det(2π cov)/2`` and
    ``∂/∂cov = (cov⁻¹ scatter cov⁻¹ − weight · cov⁻¹)/2`` (``cov`` symmetric).
    """
    return _gaussian_energy(scatter, weight, cholesky(cov))


def _log_det_2pi(chol):
    """``log det(2π chol cholᵀ)``."""
    return chol.shape[-1] * math.log(2 * math.pi) + logdet_from_chol(chol)


def _gaussian_energy(scatter, weight, chol):
    return -0.5 * (trace_solve(chol, scatter) + weight * _log_det_2pi(chol))


def _gaussian_energy_fwd(scatter, weight, cov):
    chol = cholesky(cov)
    return _gaussian_energy(scatter, weight, chol), (scatter, weight, chol)


def precision_from_chol(chol):
    """``(chol @ cholᵀ)⁻¹``, symmetric."""
    k = chol.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=chol.dtype), chol.shape)
    return symmetrize(cho_solve(chol, eye))


def gaussian_energy_cov_grad(precision, scatter, weight, g, cov_shape):
    """``Σ g · ∂ gaussian_energy / ∂cov`` summed to ``cov_shape``: ``(Λ G Λ − w̄ Λ)/2``.

    ``G = Σ g·scatter`` and ``w̄ = Σ g·weight`` are summed over the axes ``cov`` is shared
    along before the products, so a shared covariance costs two products in all.
    """
    k = cov_shape[-1]
    cov_batch = tuple(cov_shape[:-2])
    # One g per term: every term counts, also where g or the weight is shared.
    g = jnp.broadcast_to(g, jnp.broadcast_shapes(scatter.shape[:-2], jnp.shape(weight), cov_batch))
    g_scatter = sum_to_shape(g[..., None, None] * symmetrize(scatter), cov_batch + (k, k))
    g_weight = sum_to_shape(g * weight, cov_batch)
    d_cov = 0.5 * (
        matmul(precision, matmul(g_scatter, precision)) - g_weight[..., None, None] * precision
    )
    return sum_to_shape(d_cov, tuple(cov_shape))


def _gaussian_energy_bwd(res, g):
    scatter, weight, chol = res
    inv = precision_from_chol(chol)
    g = jnp.asarray(g)
    d_scatter = sum_to_shape(-0.5 * g[..., None, None] * inv, scatter.shape)
    d_weight = sum_to_shape(-0.5 * g * _log_det_2pi(chol), jnp.shape(weight))
    return d_scatter, d_weight, gaussian_energy_cov_grad(inv, scatter, weight, g, chol.shape)


gaussian_energy.defvjp(_gaussian_energy_fwd, _gaussian_energy_bwd)
