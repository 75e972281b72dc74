"""Pure functions over one sequence: Gauss–Markov chains, Kalman filter, RTS smoother.

Everything here acts on a single sequence (states ``[T, k]``); the distribution classes
batch these functions with one helper (``numpyro_lds._batch.batch_map``).

A Gauss–Markov chain is stored as :class:`GaussMarkovChain`,

.. math::

    z_1 \\sim \\mathcal N(\\mathrm{initial\\_mean}, \\mathrm{initial\\_cov}), \\qquad
    z_{t+1} \\mid z_t \\sim \\mathcal N(F_t z_t + c_t, S_t),

with ``F, c, S`` the ``transition_matrix``, ``transition_offset`` and ``transition_cov``
(time axis of length ``T - 1``, or 1 when shared over time). The LDS prior is such a chain
running forward in time; the smoothed posterior is such a chain running *backward* in
time (Särkkä 2013, Thm 8.2: ``z_t | z_{t+1}, x_{1:T} ~ N(G_t z_{t+1} + h_t, L_t)``), so one
set of functions (moments, log-density, sampling, entropy) serves both.

The three recursions over time (filter, chain moments, sampling) take a ``schedule``:

- ``"sequential"``: one ``lax.scan`` step per time step (Joseph-form Kalman updates).
- ``"parallel"``: per-step elements (Särkkä & García-Fernández 2021) combined by
  recursive doubling, in blocks of :data:`PARALLEL_BLOCK` steps and then across the
  block totals: ``O(log T)`` depth, and each operator traced three times whatever ``T``,
  so compile time does not grow with ``T``: for GPUs and long sequences.
- ``"blocked"``: the same associative elements combined in a two-level scan: ``≈√T``
  blocks scanned side by side, then the block totals carried across blocks. ``O(√T)``
  sequential steps of vectorized work, cheap to compile: for CPUs. It applies to the
  filter; the affine recursions (chain moments, sampling, the gradient's tangents) run
  as plain scans under it, since composing two affine maps is a matrix product where
  applying one is a matrix-vector product (KL + gradient at ``T = 10⁴``, ``k = 4``:
  37 → 26 ms).

All three compute the same quantities; one driver (:func:`prefix_scan`) serves every
recursion, so each recursion is written once as an associative operator.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from numpyro_lds.linalg import (
    HIGHEST,
    cho_solve,
    cholesky,
    gaussian_energy,
    gaussian_energy_cov_grad,
    inverse,
    logdet_from_chol,
    matmul,
    matvec,
    mvn_entropy,
    mvn_log_prob,
    outer_sum,
    precision_from_chol,
    quad_form,
    solve_lower,
    solve_lower_vec,
    sum_last,
    sum_to_shape,
    symmetrize,
    traced_as,
    tracing,
    tracing_state,
    transpose,
)

__all__ = [
    "PARALLEL_BLOCK",
    "SCHEDULES",
    "FilterResult",
    "GaussMarkovChain",
    "Moments",
    "Posterior",
    "Potentials",
    "chain_entropy",
    "check_schedule",
    "chain_log_prob",
    "chain_moments",
    "chain_sample",
    "condition_on_potentials",
    "PosteriorStats",
    "expected_log_joint",
    "expected_potential_log_prob",
    "expected_transition_log_prob",
    "forward_transition_residuals",
    "kalman_filter",
    "posterior_log_prob",
    "posterior_sample",
    "posterior_stats",
    "prefix_scan",
    "resolve_schedule",
    "reverse_moments",
    "smoother_chain",
]


class GaussMarkovChain(NamedTuple):
    """A Gaussian Markov chain over ``[T, k]`` states (time axis ``n`` is ``T - 1`` or 1)."""

    initial_mean: jnp.ndarray  # [k]
    initial_cov: jnp.ndarray  # [k, k]
    transition_matrix: jnp.ndarray  # [n, k, k]
    transition_offset: jnp.ndarray  # [n, k]
    transition_cov: jnp.ndarray  # [n, k, k]


class Potentials(NamedTuple):
    """Gaussian potentials ``N(mean_t; H_t z_t, cov_t)`` (time axis of ``H`` is ``T`` or 1).

    ``cov`` is ``[T, d, d]``, or ``[T, d]`` for diagonal covariances (their variances),
    which are then never stored, factorized or differentiated as ``d × d`` matrices.
    ``emission_matrix=None`` is the identity (``d = k``): no product with it is formed
    (XLA does not fold a product with an identity matrix; each was a dot call per step at
    ``k > 8``), and its gradient is ``None``.
    """

    mean: jnp.ndarray  # [T, d]
    cov: jnp.ndarray  # [T, d, d], or [T, d]: diagonal
    emission_matrix: jnp.ndarray | None  # [T or 1, d, k]; None: the identity
    mask: jnp.ndarray  # [T] bool; False: no potential at that step


class Moments(NamedTuple):
    """Marginal moments of a chain in forward time."""

    means: jnp.ndarray  # [T, k]
    covs: jnp.ndarray  # [T, k, k]
    cross_covs: jnp.ndarray  # [T-1, k, k], Cov(z_{t+1}, z_t)


class FilterResult(NamedTuple):
    """Kalman filter output: one-step predictions, filtered moments, log-normalizer."""

    predicted_means: jnp.ndarray  # [T, k], E[z_t | x_{1:t-1}]
    predicted_covs: jnp.ndarray  # [T, k, k]
    filtered_means: jnp.ndarray  # [T, k], E[z_t | x_{1:t}]
    filtered_covs: jnp.ndarray  # [T, k, k]
    log_normalizer: jnp.ndarray  # [], log p(x_{1:T})


class Posterior(NamedTuple):
    """The conditioned chain, in reversed time, and its log-normalizer."""

    backward_chain: GaussMarkovChain
    log_normalizer: jnp.ndarray


#: The values ``schedule=`` takes (None picks one by backend: :func:`resolve_schedule`).
SCHEDULES = ("sequential", "blocked", "parallel")

#: Block length of the ``"parallel"`` schedule (see :func:`prefix_scan`).
PARALLEL_BLOCK = 16


def check_schedule(schedule):
    """Return ``schedule`` if it is None or one of :data:`SCHEDULES`, else raise ValueError."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {schedule!r}")
    return schedule


def resolve_schedule(schedule):
    """The schedule to run: ``schedule`` itself, or the default for JAX's default backend.

    The default is ``"sequential"`` on CPU and ``"parallel"`` on GPU/TPU, chosen by the
    measurements in ``benchmarks/results/`` (README, "Speed").
    """
    if check_schedule(schedule) is not None:
        return schedule
    return "sequential" if jax.default_backend() == "cpu" else "parallel"


def prefix_scan(op, elems, schedule):
    """Inclusive prefix ``e_1, e_1∘e_2, …, e_1∘…∘e_n`` of an associative ``op``.

    Args:
      op: associative ``op(a, b)`` (``a`` earlier in time) on pytrees whose leaves carry
        any leading batch axes.
      elems: pytree of arrays with a leading axis of length ``n``.
      schedule: ``"sequential"`` (one scan step per element), ``"parallel"`` (blocks of
        :data:`PARALLEL_BLOCK` elements, then the block totals, each by recursive
        doubling) or ``"blocked"`` (two-level scan), see module docs.

    Returns:
      The prefixes, with the structure and shapes of ``elems``.
    """
    if check_schedule(schedule) is None:
        raise ValueError("prefix_scan needs an explicit schedule")
    n = jax.tree.leaves(elems)[0].shape[0]
    if schedule == "parallel":
        if n <= PARALLEL_BLOCK:
            return _doubling_prefix_scan(op, elems)
        return _two_level_prefix_scan(
            op, elems, n, PARALLEL_BLOCK, _doubling_prefix_scan, _doubling_prefix_scan
        )
    if schedule == "blocked" and n >= 16:
        size = -(-n // math.isqrt(n))
        return _two_level_prefix_scan(op, elems, n, size, _sequential_in_blocks, _sequential)

    def step(carry, e):
        carry = op(carry, e)
        return carry, carry

    first = jax.tree.map(lambda x: x[0], elems)
    _, rest = _scan(step, first, jax.tree.map(lambda x: x[1:], elems), n - 1)
    return _cat_first(first, rest)


def _scan(step, init, xs, length, reverse=False):
    """``lax.scan`` of ``length`` steps, its body traced as a loop body (``linalg.matmul``).

    A leaf of ``xs`` with a time axis of length 1 is shared by every step: it is closed
    over, never broadcast along time (a ``[T, k, k]`` copy per shared matrix, and its
    reverse-mode cotangent accumulated in ``[1, k, k]``).
    """
    leaves, treedef = jax.tree.flatten(xs)
    shared = [x.shape[0] == 1 != length for x in leaves]
    scanned = [x for x, s in zip(leaves, shared, strict=True) if not s]
    fixed = [x[0] for x, s in zip(leaves, shared, strict=True) if s]

    def body(carry, xs_t):
        it_t, it_fixed = iter(xs_t), iter(fixed)
        x = [next(it_fixed) if s else next(it_t) for s in shared]
        with tracing(loop=True):
            return step(carry, jax.tree.unflatten(treedef, x))

    return lax.scan(body, init, scanned, length=length, reverse=reverse)


def _from_start(step_x, num_steps):
    """Scan inputs for a recursion whose outputs start at ``t = 1`` (the filter).

    ``step_x`` are inputs of the steps ``t → t + 1`` (time axis ``T − 1``, or 1 when
    shared); they gain a placeholder (zeros) at the front, so that step ``t`` of a scan
    over all ``T`` steps reads step ``t − 1 → t``; the flag it gets first says ``t = 1``,
    where the step starts from the initial value instead. The scan then writes all ``T``
    outputs itself: no concatenation with the first element, which is a second
    ``[T, k, k]`` buffer per output.
    """

    def pad(x):
        return (
            x
            if x.shape[0] == 1
            else jnp.concatenate([jnp.zeros_like(x, shape=(1,) + x.shape[1:]), x])
        )

    return (jnp.arange(num_steps) == 0,) + jax.tree.map(pad, step_x)


def _doubling_prefix_scan(op, elems):
    """Prefixes along the leading axis by recursive doubling (Hillis & Steele 1986).

    Round ``r`` combines each element with the one ``2ʳ`` places earlier, ``⌈log₂ n⌉``
    rounds in a ``fori_loop`` over arrays of one fixed shape, so ``op`` is traced once,
    whatever ``n``; ``lax.associative_scan`` traces it ``≈ 2 log₂ n`` times over shrinking
    shapes, which is what its compile time grew with. The work is ``n log₂ n`` combinations
    instead of ``≈ 2n``: :func:`prefix_scan` runs it on short blocks, then on block totals.
    The first ``2ʳ`` elements keep their value; their combination with the rolled-around
    end of the sequence (valid elements too, so finite) is computed and discarded.
    """
    n = jax.tree.leaves(elems)[0].shape[0]
    position = jnp.arange(n)

    def round_(r, x):
        shift = jnp.left_shift(1, r)
        earlier = jax.tree.map(lambda a: jnp.roll(a, shift, axis=0), x)
        later = position >= shift

        def keep(combined, a):
            return jnp.where(later.reshape((n,) + (1,) * (a.ndim - 1)), combined, a)

        return jax.tree.map(keep, op(earlier, x), x)

    return lax.fori_loop(0, max(n - 1, 0).bit_length(), round_, elems)


def _sequential(op, elems):
    return prefix_scan(op, elems, "sequential")


def _sequential_in_blocks(op, elems):
    """One scan over the leading axis, vectorized across the blocks of the next one."""
    with tracing(batched=True):
        return _sequential(op, elems)


def _two_level_prefix_scan(op, elems, n, size, scan_within, scan_across):
    """Prefixes of ``n`` elements in blocks of ``size``: ``scan_within`` (a prefix scan
    along the leading axis) in every block at once, ``scan_across`` over the block totals,
    then each block's prefixes combined with the total of the blocks before it."""
    num_blocks = -(-n // size)
    pad = num_blocks * size - n

    def to_blocks(x):
        # Padded at the end with copies of a valid element: no prefix up to n includes them.
        x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
        return jnp.swapaxes(x.reshape((num_blocks, size) + x.shape[1:]), 0, 1)

    tree = jax.tree
    within = scan_within(op, tree.map(to_blocks, elems))  # [size, blocks]
    carried = scan_across(op, tree.map(lambda x: x[-1], within))  # [blocks]
    later = tree.map(lambda x: x[:, 1:], within)
    before = tree.map(lambda c, w: jnp.broadcast_to(c[:-1], w.shape), carried, later)
    first_block = tree.map(lambda x: x[:, :1], within)
    out = tree.map(lambda a, b: jnp.concatenate([a, b], 1), first_block, op(before, later))
    return tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])[:n], out)


class _Affine(NamedTuple):
    """``z ↦ N(F z + c, S)`` (``S`` None: deterministic), an associative-scan element."""

    F: jnp.ndarray
    c: jnp.ndarray
    S: jnp.ndarray | None


def _compose_affine(e1, e2):
    """``e2 ∘ e1``: first ``e1``, then ``e2``."""
    S = None if e1.S is None else quad_form(e2.F, e1.S) + e2.S
    return _Affine(matmul(e2.F, e1.F), matvec(e2.F, e1.c) + e2.c, S)


def _cat_first(first, rest):
    """Prepend ``first`` to ``rest`` along the leading (time) axis, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _cat_last(rest, last):
    """Append ``last`` to ``rest`` along the leading (time) axis, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), rest, last)


def _along_time(x, n):
    """Broadcast a leading time axis of length 1 (shared) to length ``n``."""
    return jnp.broadcast_to(x, (n,) + x.shape[1:])


def _transitions(chain):
    """``F, c, S`` with their time axes as stored: ``T − 1``, or 1 when shared.

    Shared ones are not broadcast along time: every product broadcasts them, and
    :func:`_scan` closes over them.
    """
    # Covariances enter only through their symmetric part, here as in every Cholesky
    # factor, so that gradients are the same whichever way they are computed.
    return chain.transition_matrix, chain.transition_offset, symmetrize(chain.transition_cov)


def _transitions_along_time(chain, num_steps):
    """``F, c, S`` broadcast to ``T − 1`` steps: the associative elements need each step."""
    return tuple(_along_time(x, num_steps - 1) for x in _transitions(chain))


def chain_moments(
    chain: GaussMarkovChain, num_steps: int, schedule="sequential", reverse=False
) -> Moments:
    """Marginal means, covariances and lag-one cross-covariances of a chain.

    ``reverse=True``: the chain runs backward in time (the RTS smoother's kernels): its
    initial state is ``z_T`` and its transition ``t`` gives ``z_t`` from ``z_{t+1}``, each
    array indexed by forward time. The moments come in forward time either way
    (``cross_covs[t] = Cov(z_{t+1}, z_t)``); sequentially the scan itself runs backward,
    so no array is flipped (on the parallel schedule the chain is).
    """
    if reverse and schedule == "parallel":
        return reverse_moments(chain_moments(_time_reversed(chain), num_steps, schedule))
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    F, c, S = _transitions(chain)
    if schedule != "parallel":

        def step(carry, x):
            m, P = carry
            F_t, c_t, S_t = x
            m_next = matvec(F_t, m) + c_t
            P_next = quad_form(F_t, P) + S_t
            return (m_next, P_next), (m_next, P_next)

        _, (ms, Ps) = _scan(step, (m0, P0), (F, c, S), num_steps - 1, reverse=reverse)
        if reverse:
            ms, Ps = _cat_last((ms, Ps), (m0, P0))
        else:
            ms, Ps = _cat_first((m0, P0), (ms, Ps))
    else:
        # z_t = (e_t ∘ … ∘ e_1)(·), e_1 = N(m0, P0) and e_t = N(F_{t-1} z + c_{t-1}, S_{t-1}).
        first = _Affine(jnp.zeros_like(P0), m0, P0)
        steps = _Affine(*_transitions_along_time(chain, num_steps))
        marginals = prefix_scan(_compose_affine, _cat_first(first, steps), schedule)
        ms, Ps = marginals.c, marginals.S
    # Cov(z_{t+1}, z_t) = F_t P_t; backward, Cov(z_t, z_{t+1}) = G_t P_{t+1}, transposed.
    cross = matmul(Ps[1:], transpose(F)) if reverse else matmul(F, Ps[:-1])
    return Moments(ms, Ps, cross)


def reverse_moments(moments: Moments) -> Moments:
    """Moments of the time-reversed chain (``Cov(z_t, z_{t+1})`` becomes the cross term)."""
    return Moments(
        jnp.flip(moments.means, 0),
        jnp.flip(moments.covs, 0),
        jnp.flip(transpose(moments.cross_covs), 0),
    )


def chain_log_prob(chain: GaussMarkovChain, z):
    """``log p(z)`` for ``z`` of shape ``[..., T, k]``; broadcasts over leading dims."""
    lp = mvn_log_prob(z[..., 0, :], chain.initial_mean, cholesky(chain.initial_cov))
    pred = matvec(chain.transition_matrix, z[..., :-1, :]) + chain.transition_offset
    lp_steps = mvn_log_prob(z[..., 1:, :], pred, cholesky(chain.transition_cov))
    return lp + jnp.sum(lp_steps, -1)


def chain_sample(chain: GaussMarkovChain, eps, schedule="sequential"):
    """Reparametrized draw: maps standard normal ``eps [T, k]`` to a chain path ``[T, k]``."""
    F, c, _ = _transitions(chain)
    z0 = chain.initial_mean + matvec(cholesky(chain.initial_cov), eps[0])
    return _affine_recursion(z0, F, c + matvec(cholesky(chain.transition_cov), eps[1:]), schedule)


def _affine_recursion(x0, F, c, schedule):
    """The path ``x_1 = x0``, ``x_{t+1} = F_t x_t + c_t`` (``c``: ``T − 1`` steps; ``F`` too,
    or 1 when shared)."""
    num_steps = c.shape[0] + 1
    if schedule == "parallel":
        first = _Affine(jnp.zeros(F.shape[1:], F.dtype), x0, None)
        steps = _Affine(_along_time(F, num_steps - 1), c, None)
        return prefix_scan(_compose_affine, _cat_first(first, steps), schedule).c

    def step(x, inputs):
        F_t, c_t = inputs
        x = matvec(F_t, x) + c_t
        return x, x

    _, xs = _scan(step, x0, (F, c), num_steps - 1)
    return _cat_first(x0, xs)


def chain_entropy(chain: GaussMarkovChain, num_steps: int):
    """Joint entropy ``H(z_1) + Σ_t H(z_{t+1} | z_t)``."""
    h_steps = mvn_entropy(cholesky(chain.transition_cov))
    return mvn_entropy(cholesky(chain.initial_cov)) + jnp.sum(_along_time(h_steps, num_steps - 1))


class _Update(NamedTuple):
    mean: jnp.ndarray
    cov: jnp.ndarray
    log_lik: jnp.ndarray  # log N(y; H m, S), 0 where unobserved
    gain: jnp.ndarray  # K = P Hᵀ S⁻¹
    chol_S: jnp.ndarray  # S = H P Hᵀ + R
    residual_map: jnp.ndarray  # I − K H (the identity where unobserved)


def _is_diagonal(R, y):
    """Whether the potentials' covariances ``R`` are given by their diagonals (``[.., d]``)."""
    return R.ndim == y.ndim


def _emit(H, x):
    """``H x`` for states ``x [.., k]`` (``x`` itself where ``H`` is ``None``, the identity)."""
    return x if H is None else matvec(H, x)


def _emit_transpose(H, v):
    """``Hᵀ v`` for ``v [.., d]``."""
    return v if H is None else matvec(transpose(H), v)


def _emit_left(H, X):
    """``H X`` for ``X [.., k, n]``."""
    return X if H is None else matmul(H, X)


def _emit_right(X, H):
    """``X H`` for ``X [.., n, d]``."""
    return X if H is None else matmul(X, H)


def _emit_cov(H, P):
    """``H P Hᵀ`` (symmetrized)."""
    return symmetrize(P) if H is None else quad_form(H, P)


def _condition(m, P, y, R, H, observed) -> _Update:
    """Condition ``N(m, P)`` on ``N(y; H z, R)``: Kalman update in Joseph form.

    ``R`` is ``[.., d, d]``, or ``[.., d]`` (the variances of a diagonal ``R``).
    """
    k, d = m.shape[-1], y.shape[-1]
    Hm = _emit(H, m)
    diagonal = _is_diagonal(R, y)
    R_full = R[..., None] * jnp.eye(d, dtype=R.dtype) if diagonal else R
    chol_S = cholesky(_emit_cov(H, P) + R_full)
    K, I_KH = _gain_and_residual_map(P, R, H, chol_S, diagonal)
    m_new = m + matvec(K, y - Hm)
    # Joseph form: a sum of two PSD terms, so P_new stays PSD under round-off.
    K_R_Kt = symmetrize(matmul(K * R[..., None, :], transpose(K))) if diagonal else quad_form(K, R)
    P_new = quad_form(I_KH, P) + K_R_Kt
    ll = mvn_log_prob(y, Hm, chol_S)
    o_vec, o_mat = observed[..., None], observed[..., None, None]
    return _Update(
        jnp.where(o_vec, m_new, m),
        jnp.where(o_mat, P_new, P),
        jnp.where(observed, ll, 0.0),
        jnp.where(o_mat, K, 0.0),
        chol_S,
        jnp.where(o_mat, I_KH, jnp.eye(k, dtype=m.dtype)),
    )


def _gain_and_residual_map(P, R, H, chol_S, diagonal):
    """The gain ``K = P Hᵀ S⁻¹`` and ``I − K H``, accurate however much more (or less)
    precise a potential is than ``P`` along each axis (derivation, section 11).

    Formed directly, ``I − K H`` loses every digit in the directions where
    ``H P Hᵀ ≫ R``: there it is ``O(R / H P Hᵀ)``, a difference of numbers near 1.
    Instead ``I − K H = (I + P Λ)⁻¹`` with ``Λ = Hᵀ R⁻¹ H`` the potential's precision
    (Woodbury); for the identity ``H`` that is the ratio ``R S⁻¹`` (as ``S = P + R``),
    otherwise an LU solve: elimination with partial pivoting does not see a scaling of
    the columns, so a precision of ``10³⁰`` along an axis costs no digits
    (:func:`~numpyro_lds.linalg.inverse`).

    The gain's rows are taken from whichever of two exact forms is accurate for their
    state component: ``P Hᵀ S⁻¹`` where the potential is the less precise
    (``(P Λ)_ii < 1``), and ``(I − K H) P Hᵀ R⁻¹`` (the updated covariance times
    ``Hᵀ R⁻¹``; ``I − R S⁻¹`` for the identity) where it is the more precise: there
    ``P Hᵀ S⁻¹`` loses the entries that vanish with ``R``. For a square ``H`` the choice
    is made per entry (below).
    """
    k = P.shape[-1]
    eye = jnp.eye(k, dtype=P.dtype)
    if H is None:
        S_inv = cho_solve(chol_S, jnp.broadcast_to(eye, chol_S.shape))
        I_KH = R[..., :, None] * S_inv if diagonal else matmul(R, S_inv)
        K_direct, K_precise = matmul(P, S_inv), eye - I_KH
        R_diag = R if diagonal else jnp.diagonal(R, axis1=-2, axis2=-1)
        precise = R_diag <= jnp.diagonal(P, axis1=-2, axis2=-1)
    else:
        K_direct = transpose(cho_solve(chol_S, _emit_left(H, P)))
        R_inv_H = H / R[..., :, None] if diagonal else cho_solve(cholesky(R), H)
        P_lam = matmul(P, symmetrize(matmul(transpose(H), R_inv_H)))
        I_KH = inverse(eye + P_lam)
        K_precise = matmul(matmul(I_KH, P), transpose(R_inv_H))
        dominance = jnp.diagonal(P_lam, axis1=-2, axis2=-1)  # (P Λ)_ii
        precise = dominance >= 1
        if H.shape[-2] == k:
            # Entry (i, j) of (I − K H) P Hᵀ R⁻¹ sums terms that cancel where component j
            # is the more precise one (as P Hᵀ S⁻¹'s do where i is): each entry from the
            # form that is accurate for it, reading potential j as component j (exact for
            # a diagonal H, the axis-aligned case).
            precise = precise[..., :, None] & (dominance[..., :, None] >= dominance[..., None, :])
            return jnp.where(precise, K_precise, K_direct), I_KH
    return jnp.where(precise[..., :, None], K_precise, K_direct), I_KH


class _FilterElement(NamedTuple):
    """``p(z_b | z_a, x) = N(A z_a + b, C)`` and ``log p(x | z_a) = −½zᵀJz + ηᵀz + log_c``.

    The element of the parallel Kalman filter (Särkkä & García-Fernández 2021, Lemma 7),
    with the log-normalizer carried along (``log_c``).
    """

    A: jnp.ndarray
    b: jnp.ndarray
    C: jnp.ndarray
    J: jnp.ndarray
    eta: jnp.ndarray
    log_c: jnp.ndarray


def _combine_filter(e1, e2):
    """``e1`` then ``e2``; every inverse goes through ``M = I + Uᵀ J₂ U`` (``C₁ = U Uᵀ``).

    ``M ⪰ I`` is always well conditioned, and ``W = U M⁻¹ Uᵀ = (I + C₁J₂)⁻¹C₁`` is formed
    as ``XᵀX`` so it stays symmetric PSD in float32.
    """
    k = e1.b.shape[-1]
    eye = jnp.eye(k, dtype=e1.b.dtype)
    U = cholesky(e1.C)
    chol_M = cholesky(eye + quad_form(transpose(U), e2.J))
    X = solve_lower(chol_M, transpose(U))
    W = matmul(transpose(X), X)
    I_WJ = eye - matmul(W, e2.J)  # (I + C₁J₂)⁻¹
    r = e2.eta - matvec(e2.J, e1.b)
    Wr = matvec(W, r)
    return _FilterElement(
        A=matmul(e2.A, matmul(I_WJ, e1.A)),
        b=matvec(e2.A, e1.b + Wr) + e2.b,
        C=quad_form(e2.A, W) + e2.C,
        J=quad_form(transpose(e1.A), e2.J - quad_form(e2.J, W)) + e1.J,
        eta=matvec(transpose(e1.A), r - matvec(e2.J, Wr)) + e1.eta,
        log_c=e1.log_c
        + e2.log_c
        - 0.5 * logdet_from_chol(chol_M)
        + sum_last(e1.b * (e2.eta - 0.5 * matvec(e2.J, e1.b)))
        + 0.5 * sum_last(r * Wr),
    )


def _filter_elements(chain, y, R, H, mask) -> _FilterElement:
    num_steps = y.shape[0]
    F, c, S = _transitions_along_time(chain, num_steps)
    if H is None:  # the identity
        H_first = H_rest = None
    else:
        H = _along_time(H, num_steps)
        H_first, H_rest = H[0], H[1:]
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    u0 = _condition(m0, P0, y[0], R[0], H_first, mask[0])
    # Step t ≥ 2, given z_{t-1}: the prediction N(F z + c, S) conditioned on potential t.
    u = _condition(c, S, y[1:], R[1:], H_rest, mask[1:])
    V = solve_lower(u.chol_S, _emit_left(H_rest, F))  # S^{-1/2} H F, so J = VᵀV is PSD
    w = solve_lower_vec(u.chol_S, y[1:] - _emit(H_rest, c))
    o_vec, o_mat = mask[1:, None], mask[1:, None, None]
    steps = _FilterElement(
        matmul(u.residual_map, F),
        u.mean,
        u.cov,
        jnp.where(o_mat, matmul(transpose(V), V), 0.0),
        jnp.where(o_vec, matvec(transpose(V), w), 0.0),
        u.log_lik,
    )
    first = _FilterElement(
        jnp.zeros_like(P0), u0.mean, u0.cov, jnp.zeros_like(P0), jnp.zeros_like(m0), u0.log_lik
    )
    return _cat_first(first, steps)


def _masked_potentials(potentials: Potentials):
    """Neutral values at masked steps, so no NaN from unused inputs reaches a gradient.

    ``H`` keeps its time axis of 1 when shared; diagonal covariances stay diagonal.
    """
    mask = potentials.mask
    if _is_diagonal(potentials.cov, potentials.mean):
        R = jnp.where(mask[:, None], potentials.cov, 1.0)
    else:
        eye = jnp.eye(potentials.mean.shape[-1], dtype=potentials.mean.dtype)
        R = jnp.where(mask[:, None, None], symmetrize(potentials.cov), eye)
    return (jnp.where(mask[:, None], potentials.mean, 0.0), R, potentials.emission_matrix, mask)


def kalman_filter(
    chain: GaussMarkovChain, potentials: Potentials, schedule="sequential"
) -> FilterResult:
    """Kalman filter of a forward chain against Gaussian potentials (Särkkä 2013, Thm 4.3)."""
    return _filter(chain, potentials, schedule)


def _filter(chain, potentials, schedule) -> FilterResult:
    y, R, H, mask = _masked_potentials(potentials)
    if schedule == "sequential":
        mf, Pf, log_normalizer = _sequential_filter(chain, y, R, H, mask)
    else:
        elements = _filter_elements(chain, y, R, H, mask)
        filtered = prefix_scan(_combine_filter, elements, schedule)
        mf, Pf, log_normalizer = filtered.b, filtered.C, filtered.log_c[-1]
    # The one-step predictions, for all steps at once also after the sequential scan: each
    # output of its body is one more kernel per step (KL at k = 4, T = 10⁴ 4-7% faster
    # than with the predictions among the outputs).
    F, c, S = _transitions(chain)
    mp = _cat_first(chain.initial_mean, matvec(F, mf[:-1]) + c)
    Pp = _cat_first(symmetrize(chain.initial_cov), quad_form(F, Pf[:-1]) + S)
    return FilterResult(mp, Pp, mf, Pf, log_normalizer)


def _sequential_filter(chain, y, R, H, mask):
    """Filtered means and covariances by one scan, and the log-normalizer."""
    num_steps = y.shape[0]
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)

    def step(carry, x):
        m, P = carry
        first, F, c, S, y_t, R_t, H_t, o_t = x
        mp = jnp.where(first, m0, matvec(F, m) + c)
        Pp = jnp.where(first, P0, quad_form(F, P) + S)
        u = _condition(mp, Pp, y_t, R_t, H_t, o_t)
        return (u.mean, u.cov), (u.mean, u.cov, u.log_lik)

    xs = _from_start(_transitions(chain), num_steps) + (y, R, H, mask)
    _, (mf, Pf, ll) = _scan(step, (m0, P0), xs, num_steps)
    return mf, Pf, jnp.sum(ll)


def smoother_chain(chain: GaussMarkovChain, filtered: FilterResult) -> GaussMarkovChain:
    """The smoothed posterior as a chain in reversed time (RTS backward kernels).

    ``z_t | z_{t+1} ~ N(G_t z_{t+1} + h_t, L_t)`` with ``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹``,
    ``h_t = m^f_t − G_t m^p_{t+1}`` and ``L_t = P^f_t − G_t P^p_{t+1} G_tᵀ``, the latter in
    the Joseph form ``(I − G_t F_t) P^f_t (·)ᵀ + G_t S_t G_tᵀ``, PSD by construction.
    None of these depend on the backward pass, so they are computed for all t at once.
    """
    return _time_reversed(_rts_kernels(chain, filtered))


def _time_reversed(kernels: GaussMarkovChain) -> GaussMarkovChain:
    """A backward chain's kernels indexed by forward time (:func:`_rts_kernels`) as a chain
    in reversed time: each transition array flipped (shared ones are unchanged)."""
    return GaussMarkovChain(
        kernels.initial_mean, kernels.initial_cov, *(jnp.flip(x, 0) for x in _transitions(kernels))
    )


def _rts_kernels(chain: GaussMarkovChain, filtered: FilterResult) -> GaussMarkovChain:
    """:func:`smoother_chain` with its kernels indexed by forward time (``G_t, h_t, L_t``
    at entry ``t``), as :func:`chain_moments` takes a chain with ``reverse=True``."""
    k = filtered.filtered_means.shape[-1]
    F, _, S = _transitions(chain)
    mf, Pf = filtered.filtered_means[:-1], filtered.filtered_covs[:-1]
    mp, Pp = filtered.predicted_means[1:], filtered.predicted_covs[1:]
    G, _ = _rts_gain(F, Pf, Pp)
    I_GF = jnp.eye(k, dtype=mf.dtype) - matmul(G, F)
    L = quad_form(I_GF, Pf) + quad_form(G, S)
    h = mf - matvec(G, mp)
    return GaussMarkovChain(filtered.filtered_means[-1], filtered.filtered_covs[-1], G, h, L)


def _rts_gain(F, Pf, Pp):
    """``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹`` for all steps, and the factors of ``P^p_{t+1}``."""
    chol_Pp = cholesky(Pp)
    return transpose(cho_solve(chol_Pp, matmul(F, Pf))), chol_Pp


def _filter_tangent(
    chain, potentials, filtered, F_dot, J_dot, node_information, schedule, means_only=False
) -> FilterResult:
    """Directional derivative of the filter's moments, written out (derivation, section 8).

    The direction: the transition matrices gain ``ε F_dot`` (``[T-1, k, k]``) and each
    step's filtered density is multiplied by ``exp(ε(−½zᵀJ_dot z + h_dotᵀz))``
    (``J_dot [T, k, k]`` symmetric, ``h_dot [T, k]``), given as ``J_dot`` and
    ``node_information = h_dot − J_dot m^f`` (``[T, k]``, formed by the caller without
    cancellation); ``filtered`` is the filter at ``ε = 0``. With ``K_t`` the gain,
    ``A_t = I − K_t H_t`` and
    ``v_t = H_tᵀ S_t⁻¹ (y_t − H_t m^p_t)``, the Joseph-form update differentiates to

    - ``m^f′ = A (m^p′ + P^p′ v) + P^f (h_dot − J_dot m^f)``,
    - ``P^f′ = A P^p′ Aᵀ − P^f J_dot P^f`` (the gain's own derivative drops out),

    and the prediction to ``m^p′ = F m^f′ + F_dot m^f``,
    ``P^p′ = F P^f′ Fᵀ + F_dot P^f Fᵀ + F P^f F_dotᵀ``. Both are linear recursions in the
    tangents, with every coefficient computed from ``filtered`` for all steps at once; they
    run as two affine recursions (covariances, then means) on ``schedule``. This replaces
    ``jax.jvp`` through the filter, which differentiates every Cholesky factorization and
    solve inside the scan and cost 3-4 forward passes. The log-normalizer's tangent is not
    computed (returned as 0). ``means_only``: ``F_dot`` and ``J_dot`` are zero, so are the
    covariances' tangents, and their recursion is not run.
    """
    num_steps, k = filtered.filtered_means.shape
    y, R, H, mask = _masked_potentials(potentials)
    F, _, _ = _transitions(chain)
    mp, Pp = filtered.predicted_means, filtered.predicted_covs
    mf, Pf = filtered.filtered_means, filtered.filtered_covs
    # The update's residual map and innovation factor, for all steps at once; the updated
    # moments it also returns are unused (and dropped by XLA).
    update = _condition(mp, Pp, y, R, H, mask)
    A = update.residual_map
    M = matmul(A[1:], F)
    zeros = jnp.zeros_like(mf)
    if means_only:
        node_mean = matvec(Pf, node_information)
        covs_dot, Pp_dot = jnp.zeros_like(Pf), jnp.zeros_like(Pf[1:])
        offset = node_mean[1:]
    else:
        S_inv_r = cho_solve(update.chol_S, (y - _emit(H, mp))[..., None])[..., 0]
        v = jnp.where(mask[:, None], _emit_transpose(H, S_inv_r), 0.0)
        node_mean = matvec(Pf, node_information)
        node_cov = quad_form(Pf, J_dot)
        # Step t-1 → t: the terms of the prediction's tangent that F_dot adds.
        pred_mean = matvec(F_dot, mf[:-1])
        X = matmul(matmul(F_dot, Pf[:-1]), transpose(F))
        pred_cov = X + transpose(X)
        covs_dot = chain_moments(
            GaussMarkovChain(
                zeros[0], -node_cov[0], M, zeros[1:], quad_form(A[1:], pred_cov) - node_cov[1:]
            ),
            num_steps,
            schedule,
        ).covs
        Pp_dot = quad_form(F, covs_dot[:-1]) + pred_cov
        offset = matvec(A[1:], pred_mean + matvec(Pp_dot, v[1:])) + node_mean[1:]
    means_dot = _affine_recursion(node_mean[0], M, offset, schedule)
    mp_dot = matvec(F, means_dot[:-1])
    if not means_only:
        mp_dot = mp_dot + pred_mean
    return FilterResult(
        _cat_first(zeros[0], mp_dot),
        _cat_first(jnp.zeros_like(Pf[0]), Pp_dot),
        means_dot,
        covs_dot,
        jnp.zeros_like(filtered.log_normalizer),
    )


def _smoothed_tangent(
    chain, filtered, filtered_dot, F_dot, moments, schedule, means_only=False
) -> Moments:
    """Directional derivative of the smoothed moments, written out (derivation, section 8).

    Given the filter's tangent (:func:`_filter_tangent`), the transition matrices' tangent
    ``F_dot`` and the smoothed ``moments``: the RTS kernels ``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹``,
    ``h_t = m^f_t − G_t m^p_{t+1}``, ``L_t = P^f_t − G_t P^p_{t+1} G_tᵀ`` differentiate to

    - ``G′ = (P^f′ Fᵀ + P^f F_dotᵀ − G P^p′) (P^p)⁻¹``,
    - ``h′ = m^f′ − G′ m^p − G m^p′``,
    - ``L′ = P^f′ − G′ F P^f − (G′ F P^f)ᵀ − G P^p′ Gᵀ`` (using ``G P^p = P^f Fᵀ``),

    all steps at once, and the backward recursion ``m_t = G_t m_{t+1} + h_t``,
    ``P_t = G_t P_{t+1} G_tᵀ + L_t`` to one affine recursion in the tangents, on
    ``schedule``. Replaces ``jax.jvp`` through the smoother, which cost 4-10 forward passes.
    ``means_only`` (the filter's covariance tangents and ``F_dot`` zero): ``G′ = L′ = 0``,
    only the means' recursion runs, and the covariances' tangents are zero.
    """
    num_steps = filtered.filtered_means.shape[0]
    F, _, _ = _transitions(chain)
    Pf = filtered.filtered_covs[:-1]
    mp, Pp = filtered.predicted_means[1:], filtered.predicted_covs[1:]
    mf_dot, Pf_dot = filtered_dot.filtered_means, filtered_dot.filtered_covs
    mp_dot, Pp_dot = filtered_dot.predicted_means[1:], filtered_dot.predicted_covs[1:]
    G, chol_Pp = _rts_gain(F, Pf, Pp)
    if means_only:
        # m′_t = G_t m′_{t+1} + h′_t backward from m′_T = m^f′_T: flipped, a forward one.
        h_dot = mf_dot[:-1] - matvec(G, mp_dot)
        flipped = _affine_recursion(mf_dot[-1], jnp.flip(G, 0), jnp.flip(h_dot, 0), schedule)
        zeros = jnp.zeros_like(moments.covs)
        return Moments(jnp.flip(flipped, 0), zeros, zeros[1:])
    X = matmul(Pf_dot[:-1], transpose(F)) + matmul(Pf, transpose(F_dot)) - matmul(G, Pp_dot)
    G_dot = transpose(cho_solve(chol_Pp, transpose(X)))  # X (P^p)⁻¹, P^p symmetric
    h_dot = mf_dot[:-1] - matvec(G_dot, mp) - matvec(G, mp_dot)
    Y = matmul(matmul(G_dot, F), Pf)
    L_dot = Pf_dot[:-1] - Y - transpose(Y) - quad_form(G, Pp_dot)
    ms, Ps = moments.means[1:], moments.covs[1:]  # the smoothed z_{t+1}
    Z = matmul(matmul(G_dot, Ps), transpose(G))
    tangent_chain = GaussMarkovChain(
        mf_dot[-1], Pf_dot[-1], G, matvec(G_dot, ms) + h_dot, Z + transpose(Z) + L_dot
    )
    backward = chain_moments(tangent_chain, num_steps, schedule, reverse=True)
    means_dot, covs_dot = backward.means, backward.covs
    cross_dot = matmul(covs_dot[1:], transpose(G)) + matmul(Ps, transpose(G_dot))
    return Moments(means_dot, covs_dot, cross_dot)


def condition_on_potentials(
    chain: GaussMarkovChain, potentials: Potentials, schedule="sequential"
) -> Posterior:
    """Kalman filter + RTS backward kernels: the posterior chain and ``log ∫ p · Π φ_t``."""
    filtered = kalman_filter(chain, potentials, schedule)
    return Posterior(smoother_chain(chain, filtered), filtered.log_normalizer)


def _along(weight, x, x_dot):
    """``w x + ẋ`` (just ``x`` without a tangent): a statistic along a line of moments."""
    return x if x_dot is None else weight * x + x_dot


def _scatter(weight, e, e_dot, V, outer=None):
    """``V + w e eᵀ (+ ė eᵀ + e ėᵀ)``: the scatter of a residual ``e`` with tangent ``ė``.

    ``outer``: how ``a bᵀ`` is formed, per step by default; :func:`~numpyro_lds.linalg.
    outer_sum` sums it over the steps, for a ``V`` that is a sum (see
    :func:`_transition_scatter`).
    """
    outer = _outer if outer is None else outer
    ee = outer(e, e)
    if e_dot is None:
        return V + ee
    cross = outer(e_dot, e)
    return V + weight * ee + cross + transpose(cross)


def _scatter_diagonal(weight, e, e_dot, diag_V):
    """The diagonal of :func:`_scatter`, from the diagonal of ``V``."""
    return diag_V + weight * e * e if e_dot is None else diag_V + (weight * e + 2 * e_dot) * e


def _initial_residual(moments, chain, tangent, weight):
    """The initial-state term's ``e = m_1 − m_0``, ``ė`` and ``V_w`` (see below)."""
    e = moments.means[0] - chain.initial_mean
    e_dot = None if tangent is None else tangent.means[0]
    V = _along(weight, moments.covs[0], None if tangent is None else tangent.covs[0])
    return e, e_dot, V


def _shared_dynamics(chain):
    """Whether ``F`` and ``S`` are the same at every step (stored with a time axis of 1)."""
    return chain.transition_matrix.shape[0] == 1 and chain.transition_cov.shape[0] == 1


def _transition_residuals(moments, chain, tangent, weight, transition=None):
    """The transition terms' ``F``, ``C_w``, ``F P_w`` (for the gradient) and ``e, ė, V_w``.

    ``e_t = m_{t+1} − F_t m_t − c_t``, ``ė_t = ṁ_{t+1} − F_t ṁ_t`` and
    ``V_t = P_{t+1} − C_t F_tᵀ − F_t C_tᵀ + F_t P_t F_tᵀ``, at ``w ω + ω̇`` along a tangent.

    With shared dynamics (:func:`_shared_dynamics`) every term is affine in the sums over
    the steps, ``Σ V_t = Σ P_{t+1} − (Σ C_t) Fᵀ − F (Σ C_t)ᵀ + F (Σ P_t) Fᵀ``: ``C_w``,
    ``F P_w`` and ``V_w`` are then those sums (time axis 1). No ``k × k`` product is formed
    per step, and no ``[T, k, k]`` temporary (three per transition term otherwise).
    ``transition``: ``(e, V)`` from :func:`forward_transition_residuals`, whose values
    replace these (without a tangent only).
    """
    F, c, _ = _transitions(chain)
    m = moments.means
    P = _along(weight, moments.covs, None if tangent is None else tangent.covs)
    C = _along(weight, moments.cross_covs, None if tangent is None else tangent.cross_covs)
    if _shared_dynamics(chain):
        # Sums of whole arrays: no [T − 1, k, k] slice of P is stored to be summed.
        P_sum, C = jnp.sum(P, axis=0, keepdims=True), jnp.sum(C, axis=0, keepdims=True)
        P_next, P_prev = P_sum - P[:1], P_sum - P[-1:]
    else:
        P_next, P_prev = P[1:], P[:-1]
    F_P = matmul(F, P_prev)
    CFt = matmul(C, transpose(F))
    V = P_next - CFt - transpose(CFt) + symmetrize(matmul(F_P, transpose(F)))
    e = m[1:] - matvec(F, m[:-1]) - c
    e_dot = None if tangent is None else tangent.means[1:] - matvec(F, tangent.means[:-1])
    if transition is not None:  # values without cancellation: forward_transition_residuals
        e, V = transition
    return F, C, F_P, e, e_dot, V


def _node_residuals(moments, potentials, tangent, weight, residuals=None):
    """The potentials' ``P_w`` (for the gradient) and ``e = y − H m``, ``ė``, ``V_w``.

    ``V_w = H P_w Hᵀ``; for diagonal covariances only its diagonal ``[T, d]``.
    ``residuals`` (``[T, d]``, from :func:`posterior_stats`) replace the value of
    ``y − H m``, which has lost its digits where a potential pins ``H m`` to ``y``; the
    derivative is still that of ``y − H m``.
    """
    y, R, H, _ = _masked_potentials(potentials)
    P = _along(weight, moments.covs, None if tangent is None else tangent.covs)
    e = y - _emit(H, moments.means)
    if residuals is not None:
        # The value of ``residuals`` exactly, the derivative of ``e``.
        e = residuals + (e - lax.stop_gradient(e))
    e_dot = None if tangent is None else -_emit(H, tangent.means)
    V = _emission_diagonal(H, P) if _is_diagonal(R, y) else _emit_cov(H, P)
    return P, e, e_dot, V


def _emission_diagonal(H, P):
    """``diag(H_t P_t H_tᵀ)``, ``[T, d]``: ``Σ_jl H_ij H_il P_jl``.

    With ``H`` shared by every step, one contraction of ``P`` (as ``[T, k²]``) with the
    ``[k², d]`` products ``H_ij H_il``: no ``[T, d, k]`` product ``H P`` is formed.
    """
    if H is None:
        return jnp.diagonal(P, axis1=-2, axis2=-1)
    if H.shape[0] != 1:
        return jnp.sum(matmul(H, P) * H, axis=-1)
    d, k = H.shape[-2:]
    H_H = (H[0, :, :, None] * H[0, :, None, :]).reshape(d, k * k)
    return jnp.einsum("tj,ij->ti", P.reshape(-1, k * k), H_H, precision=HIGHEST)


def _initial_energy(moments, chain, tangent=None, weight=1.0):
    """``E[log N(z_1; m_0, P_0)]`` (weighted, plus its tangent: see _expected_log_joint_along)."""
    scatter = _scatter(weight, *_initial_residual(moments, chain, tangent, weight))
    return gaussian_energy(scatter, weight, symmetrize(chain.initial_cov))


def _transition_energies(moments, chain, tangent=None, weight=1.0, transition=None):
    """``E[log N(z_{t+1}; F_t z_t + c_t, S_t)]`` per step (weighted, plus tangent)."""
    *_, e, e_dot, V = _transition_residuals(moments, chain, tangent, weight, transition)
    # The covariance keeps its time axis of 1 when shared: factored once.
    scatter, scatter_weight = _transition_scatter(chain, weight, e, e_dot, V)
    return gaussian_energy(scatter, scatter_weight, symmetrize(chain.transition_cov))


def _transition_scatter(chain, weight, e, e_dot, V):
    """The transition terms' scatter and its weight: per step, ``w``; with shared dynamics
    summed over the steps (as ``V`` is, :func:`_transition_residuals`), of weight
    ``(T − 1) w``: one energy for all steps, as every term is affine in the scatter."""
    if not _shared_dynamics(chain):
        return _scatter(weight, e, e_dot, V), weight
    return _scatter(weight, e, e_dot, V, outer_sum), weight * e.shape[0]


def _node_energies(moments, potentials, tangent=None, weight=1.0, residuals=None):
    """``mask_t E[log N(mean_t; H_t z_t, cov_t)]`` per step (weighted, plus tangent)."""
    y, R, _, mask = _masked_potentials(potentials)
    _, e, e_dot, V = _node_residuals(moments, potentials, tangent, weight, residuals)
    if _is_diagonal(R, y):
        # Only the scatter's diagonal enters: −Σ_i S_ii / r_i / 2 − w Σ_i log(2π r_i) / 2.
        energy = -0.5 * sum_last(
            _over_variance(_scatter_diagonal(weight, e, e_dot, V), R)
            + weight * jnp.log(2 * math.pi * R)
        )
    else:
        energy = gaussian_energy(_scatter(weight, e, e_dot, V), weight, R)
    return jnp.where(mask, energy, 0.0)


@jax.custom_jvp
def _over_variance(x, r):
    """``x / r``, whose derivative in ``r`` is ``−(x / r) / r``: reverse mode's ``−x / r²``
    overflows (float32) for ``r`` below about ``1e-19``, where ``x / r`` is still ``O(1)``."""
    return x / r


@_over_variance.defjvp
def _over_variance_jvp(primals, tangents):
    x, r = primals
    x_dot, r_dot = tangents
    ratio = x / r
    return ratio, (x_dot - ratio * r_dot) / r


def expected_transition_log_prob(moments: Moments, chain: GaussMarkovChain, transition=None):
    """``Σ_t E[log N(z_{t+1}; F_t z_t + c_t, S_t)]`` under a Gaussian with ``moments``.

    With ``e_t = z_{t+1} − F_t z_t − c_t``: ``E[e_t] = m_{t+1} − F_t m_t − c_t`` and
    ``Cov(e_t) = P_{t+1} − C_t F_tᵀ − F_t C_tᵀ + F_t P_t F_tᵀ`` (``C_t = Cov(z_{t+1}, z_t)``).
    This is Term C of ``docs/derivation.md``. Its gradient is written out (see
    :func:`_expected_log_density`). ``transition``: :func:`forward_transition_residuals`
    of the chain the moments are of, when it runs forward (``None``: from the moments).
    """
    return _expected_log_density(moments, chain, None, None, transition, False)


def forward_transition_residuals(q_chain: GaussMarkovChain, moments: Moments, chain):
    """``E[e_t]`` and ``Cov(e_t)`` of ``e_t = z_{t+1} − F_t z_t − c_t`` under a forward
    chain ``q_chain`` with ``moments``, without cancellation (derivation, section 11).

    From the moments, ``Cov(e_t) = P_{t+1} − C_t Fᵀ − F C_tᵀ + F P_t Fᵀ`` is a difference
    of terms of the size of ``P``, which in a near-unit-root chain exceeds the result by
    the joint condition number; under ``q``'s own transition it is
    ``(F_q − F) P_t (F_q − F)ᵀ + S_q`` and ``E[e_t] = (F_q − F) m_t + c_q − c``: sums of
    terms no larger than the result where ``q`` and ``chain`` are alike. ``V`` is summed
    over the steps where ``chain``'s dynamics are shared (see
    :func:`_transition_residuals`).
    """
    F_q, c_q, S_q = _transitions(q_chain)
    F, c, _ = _transitions(chain)
    D = F_q - F
    m, P = moments.means[:-1], moments.covs[:-1]
    e = matvec(D, m) + c_q - c
    V = jnp.broadcast_to(quad_form(D, P) + symmetrize(S_q), P.shape)
    if _shared_dynamics(chain):
        V = jnp.sum(V, axis=0, keepdims=True)
    return e, V


def expected_potential_log_prob(moments: Moments, potentials: Potentials, residuals=None):
    """``Σ_t mask_t E[log N(mean_t; H_t z_t, cov_t)]`` under a Gaussian with ``moments``.

    ``residuals``: :attr:`PosteriorStats.potential_residuals` when ``moments`` are a
    posterior's (``None``: the residuals ``y − H m`` as they are).
    """
    return jnp.sum(_node_energies(moments, potentials, residuals=residuals))


def expected_log_joint(
    moments: Moments, chain: GaussMarkovChain, potentials: Potentials, residuals=None
):
    """``E[log prior(z) + Σ_t log φ_t(z_t)]`` under a Gaussian with ``moments``.

    Affine in the expected sufficient statistics ``E[z_t], E[z_t z_tᵀ], E[z_{t+1} z_tᵀ]``.
    For the posterior's own moments, ``expected_log_joint − log Z = −H(q)``. Its gradient
    is written out (see :func:`_expected_log_density`). ``residuals`` as in
    :func:`expected_potential_log_prob`.
    """
    return _expected_log_density(moments, chain, potentials, residuals, None, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expected_log_density(moments, chain, potentials, residuals, transition, initial):
    """The transition terms, plus the initial term if ``initial`` and the potentials' if given.

    Its VJP is :func:`_expected_log_joint_along_grad` with the moments' gradient: every
    term is affine in the covariances and quadratic in the means, so each gradient is one
    product per step (for shared dynamics ``∂/∂C_t = Λ F`` and ``∂/∂P_t ∋ −Fᵀ Λ F/2`` are
    the same matrix at every step), where reverse mode would transpose and store every
    product of the value.
    """
    return _expected_log_joint_along(
        moments,
        None,
        1.0,
        chain,
        potentials,
        initial=initial,
        residuals=residuals,
        transition=transition,
    )


def _expected_log_density_fwd(moments, chain, potentials, residuals, transition, initial):
    value = _expected_log_density(moments, chain, potentials, residuals, transition, initial)
    return value, (moments, chain, potentials, residuals, transition)


def _expected_log_density_bwd(initial, res, g):
    moments, chain, potentials, residuals, transition = res
    grads = _expected_log_joint_along_grad(
        moments,
        None,
        1.0,
        chain,
        potentials,
        initial=initial,
        moments_grad=True,
        residuals=residuals,
        transition=transition,
    )
    # Every gradient of the value is g times its gradient at g = 1. The residuals only
    # give the value of y − H m, whose derivative is in the others' gradients.
    grads = jax.tree.map(lambda x: x if x.dtype == jax.dtypes.float0 else g * x, grads)
    zeros = jax.tree.map(jnp.zeros_like, (residuals, transition))
    return (*grads, *zeros)


_expected_log_density.defvjp(_expected_log_density_fwd, _expected_log_density_bwd)


def _expected_log_joint_along(
    moments, tangent, weight, chain, potentials, initial=True, residuals=None, transition=None
):
    """``w · expected_log_joint(moments) + (its derivative along tangent)``, in one pass.

    Every term is ``E[log N(x; μ, Σ)] = −tr(Σ⁻¹ (V + e eᵀ))/2 − log det(2πΣ)/2`` with
    ``e = E[x] − μ`` and ``V = Cov(x)``, affine in ``V`` and quadratic in ``e``: the
    weighted value plus tangent is :func:`~numpyro_lds.linalg.gaussian_energy` of the
    scatter ``w V + V̇ + w e eᵀ + ė eᵀ + e ėᵀ``, whose gradient w.r.t. ``Σ`` is
    closed-form; the custom VJP's backward pass uses the gradient written out,
    :func:`_expected_log_joint_along_grad`. ``tangent=None`` is the plain value (the
    weight is then 1); without ``initial`` or ``potentials`` those terms are left out.
    """
    weight = jnp.asarray(weight, moments.means.dtype)
    value = jnp.sum(_transition_energies(moments, chain, tangent, weight, transition))
    if initial:
        value = value + _initial_energy(moments, chain, tangent, weight)
    if potentials is not None:
        value = value + jnp.sum(_node_energies(moments, potentials, tangent, weight, residuals))
    return value


class PosteriorStats(NamedTuple):
    """Smoothed moments (forward time) and log-normalizer of a conditioned chain.

    ``potential_residuals [T, d]``: ``y_t − H_t m_t`` (``m_t`` the smoothed mean),
    accurate to its own size (:func:`_smoothed_residuals`). Where a potential is far more
    precise than the prior's prediction, ``H_t m_t`` equals ``y_t`` up to rounding and
    the plain difference is rounding error alone, which the potential's precision then
    multiplies. Their cotangent is not used: the expectations that take them
    differentiate ``y − H m`` itself.
    """

    moments: Moments
    log_normalizer: jnp.ndarray
    potential_residuals: jnp.ndarray


def posterior_stats(chain: GaussMarkovChain, potentials: Potentials, schedule="sequential"):
    """Filter, smoother and smoothed moments: :class:`PosteriorStats`.

    Its gradient is a custom VJP that does not run reverse mode through the scans (which
    costs 3–8 forward passes): the posterior is an exponential family with natural
    parameters ``η(θ)`` and log-partition ``log Z``, so

    - ``∇_θ log Z = ∇_θ E_q[log prior(z; θ) + Σ log φ_t(z_t; θ)]`` at fixed moments
      (the Fisher identity), and
    - the moments' VJP for a cotangent ``δη`` (in natural coordinates) is
      ``(∂η/∂θ)ᵀ Cov_q(s) δη``, where ``Cov_q(s) δη`` is the directional derivative of
      the moments when ``log q`` gains ``ε⟨δη, s(z)⟩``. Its tangents obey linear
      recursions with coefficients from the forward pass, written out
      (``docs/derivation.md``, section 8): three affine recursions and vectorized algebra,
      no differentiation through a Cholesky factorization inside a loop.

    Both are exact for every input (dynamics, initial state, potentials, emission
    matrices), not an approximation. The recursions run on the schedule of the forward
    pass, so the parallel schedule stays parallel.
    """
    check_schedule(schedule)
    return _posterior_stats_custom(chain, potentials, schedule, tracing_state())


def _posterior_stats(chain, potentials, schedule):
    # The forward pass's value (its residuals are dropped by XLA).
    return _posterior_stats_fwd_traced(chain, potentials, schedule)[0]


def _batched_with(outputs, inputs):
    """``outputs`` plus an exact zero that depends on every leaf of ``inputs``.

    Under ``vmap``, JAX batches a custom-VJP function's outputs by data dependence, and
    hands the cotangent of an unbatched output, already summed over the batch, to every
    member's backward pass, whose gradients for unbatched inputs it then sums again. The
    covariances do not depend on the potentials' means: for a batch that shares its
    dynamics and potential variances and differs only in the means (``vmap`` over the
    data, or ``LDSPosterior`` with a shared ``potential_var``), every gradient through
    them was counted once per sequence (``tests/test_batching.py``). With the zero, every
    output is batched whenever any input is, and each member's cotangent is its own. It is
    an empty sum, folded away by XLA.
    """
    zero = sum(jnp.sum(jnp.ravel(x)[:0].astype(jnp.float32)) for x in jax.tree.leaves(inputs))
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), outputs)


def _smoothed_moments(chain, filtered: FilterResult, schedule) -> Moments:
    num_steps = filtered.filtered_means.shape[0]
    return chain_moments(_rts_kernels(chain, filtered), num_steps, schedule, reverse=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _posterior_stats_custom(chain, potentials, schedule, state):
    # ``state``: the tracing declarations at the call, for the rules (linalg.tracing_state).
    return _posterior_stats(chain, potentials, schedule)


def _posterior_stats_fwd(chain, potentials, schedule, state):
    # symbolic_zeros=True: every leaf comes as a CustomVJPPrimal (value, perturbed).
    chain, potentials = jax.tree.map(lambda x: x.value, (chain, potentials))
    with traced_as(state):
        return _posterior_stats_fwd_traced(chain, potentials, schedule)


def _posterior_stats_fwd_traced(chain, potentials, schedule):
    filtered = _filter(chain, potentials, schedule)
    moments = _smoothed_moments(chain, filtered, schedule)
    residuals = _smoothed_residuals(chain, potentials, filtered, moments.means)
    stats = _batched_with(
        PosteriorStats(moments, filtered.log_normalizer, residuals), (chain, potentials)
    )
    # The filter is kept for the backward pass (two [T, k, k] arrays more than the
    # moments), which would otherwise run it again.
    return stats, (chain, potentials, moments, filtered, stats.potential_residuals)


def _smoothed_residuals(chain, potentials, filtered: FilterResult, smoothed_means):
    """:attr:`PosteriorStats.potential_residuals`: ``y_t − H_t m_t`` for the smoothed
    means ``m_t``, accurate to its own size (derivation, section 11), 0 at masked steps.

    The filtered residual is a ratio, ``y − H m^f = (I − H K)(y − H m^p) = R S⁻¹ (y − H
    m^p)``, and the smoother adds ``−H_t G_t (m_{t+1} − m^p_{t+1})``, whose gain rows along a
    precise potential are as small as its covariance: neither subtracts numbers that
    agree to many digits.
    """
    y, R, H, mask = _masked_potentials(potentials)
    mp, Pp = filtered.predicted_means, filtered.predicted_covs
    diagonal = _is_diagonal(R, y)
    R_full = R[..., None] * jnp.eye(y.shape[-1], dtype=R.dtype) if diagonal else R
    chol_S = cholesky(_emit_cov(H, Pp) + R_full)
    S_inv_r = cho_solve(chol_S, (y - _emit(H, mp))[..., None])[..., 0]
    e = R * S_inv_r if diagonal else matvec(R, S_inv_r)
    F, _, _ = _transitions(chain)
    G, _ = _rts_gain(F, filtered.filtered_covs[:-1], Pp[1:])
    step = matvec(G, smoothed_means[1:] - mp[1:])
    H_rest = None if H is None else (H if H.shape[0] == 1 else H[:-1])
    e = e.at[:-1].add(-_emit(H_rest, step))
    return jnp.where(mask[:, None], e, 0.0)


def posterior_sample(chain: GaussMarkovChain, potentials: Potentials, eps, schedule="sequential"):
    """Reparametrized draw from the chain conditioned on the potentials (Durbin & Koopman 2002).

    ``eps [T, k + d]``: standard normals, ``[:, :k]`` for a path of the prior chain ``z⁺``
    and ``[:, k:]`` for pseudo-potentials ``y⁺_t = H_t z⁺_t + R_t^{1/2} ε_t``. Then

    ``z = z⁺ + E[z | y − y⁺]``, the mean under the same chain with zero initial mean and
    offsets, has the posterior's law: ``E[z | y] − E[z | y⁺]`` is linear in ``y − y⁺``, and
    ``z⁺ − E[z⁺ | y⁺]`` is independent of ``y⁺`` with the posterior's covariance.

    It is a smoothed mean plus a prior path, so its gradient is :func:`posterior_stats`'
    written-out VJP and an affine recursion's, exact for every input; reverse mode through
    the backward kernels of forward-filtering backward-sampling cost 5–19 draws (measured
    on CPU, k = 4 and 16, T = 100 … 1 000). Masked steps' noise is drawn and unused. See
    ``docs/derivation.md``, section 8.
    """
    k = chain.initial_mean.shape[-1]
    eps_z, eps_y = eps[..., :k], eps[..., k:]
    prior_path = chain_sample(chain, eps_z, schedule)
    y, R, H, _ = _masked_potentials(potentials)
    if _is_diagonal(R, y):
        noise = jnp.sqrt(R) * eps_y
    else:
        noise = matvec(cholesky(R), eps_y)
    pseudo = _emit(H, prior_path) + noise
    centred = chain._replace(
        initial_mean=jnp.zeros_like(chain.initial_mean),
        transition_offset=jnp.zeros_like(chain.transition_offset),
    )
    shifted = potentials._replace(mean=y - pseudo)
    return prior_path + posterior_stats(centred, shifted, schedule).moments.means


def posterior_log_prob(chain: GaussMarkovChain, potentials: Potentials, z, schedule="sequential"):
    """``log q(z)`` for paths ``z [..., T, k]`` of the chain conditioned on the potentials.

    The value is the backward chain's log-density (RTS kernels). Its gradient uses
    ``log q(z) = log prior(z) + Σ_t log φ_t(z_t) − log Z``: the first two terms are explicit
    (vectorized over time, no scan), and ``∇ log Z`` is the expected gradient of the same
    two terms under ``q`` (the Fisher identity, as in :func:`posterior_stats`). Exact for
    every input, including ``z`` (``log Z`` does not depend on it). Reverse mode through
    the filter's scan instead cost 8-10 times the value (CPU, ``k = 4`` and 16). The value
    keeps the backward form: the identity's sum of large terms that cancel loses more
    digits in float32.
    """
    check_schedule(schedule)
    return _posterior_log_prob(chain, potentials, z, schedule, tracing_state())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _posterior_log_prob(chain, potentials, z, schedule, state):
    backward = condition_on_potentials(chain, potentials, schedule).backward_chain
    return chain_log_prob(backward, jnp.flip(z, -2))


def _posterior_log_prob_fwd(chain, potentials, z, schedule, state):
    with traced_as(state):
        filtered = _filter(chain, potentials, schedule)
        kernels = _rts_kernels(chain, filtered)
        moments = chain_moments(kernels, z.shape[-2], schedule, reverse=True)
        log_prob = chain_log_prob(_time_reversed(kernels), jnp.flip(z, -2))
        return log_prob, (chain, potentials, z, moments)


def _joint_log_density(chain, potentials, z):
    """``log prior(z) + Σ_t mask_t log N(mean_t; H_t z_t, cov_t)`` for ``z [..., T, k]``."""
    y, R, H, mask = _masked_potentials(potentials)
    residual = y - _emit(H, z)
    if _is_diagonal(R, y):
        node = -0.5 * sum_last(residual * residual / R + jnp.log(2 * math.pi * R))
    else:
        node = mvn_log_prob(residual, jnp.zeros_like(residual), cholesky(R))
    return chain_log_prob(chain, z) + jnp.sum(jnp.where(mask, node, 0.0), -1)


def _posterior_log_prob_bwd(schedule, state, res, g):
    with traced_as(state):
        return _posterior_log_prob_bwd_traced(res, g)


def _posterior_log_prob_bwd_traced(res, g):
    chain, potentials, z, moments = res
    _, joint_vjp = jax.vjp(_joint_log_density, chain, potentials, z)
    g_chain, g_potentials, g_z = joint_vjp(g)
    # ∇ log Z = E_q ∇(log prior + Σ log φ), the same for every path: weighted by Σ g.
    z_chain, z_potentials = _expected_log_joint_along_grad(moments, None, 1.0, chain, potentials)
    g_sum = jnp.sum(g)

    def minus(a, b):
        return a if a.dtype == jax.dtypes.float0 else a - g_sum * b

    return (
        jax.tree.map(minus, g_chain, z_chain),
        jax.tree.map(minus, g_potentials, z_potentials),
        g_z,
    )


_posterior_log_prob.defvjp(_posterior_log_prob_fwd, _posterior_log_prob_bwd)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _moments_from_natural(means, second, cross_second):
    """``(E z, E zzᵀ, E z_{t+1}z_tᵀ) ↦ Moments`` (central second moments)."""
    return Moments(
        means, second - _outer(means, means), cross_second - _outer(means[1:], means[:-1])
    )


def _natural_from_moments(moments: Moments):
    """The inverse of :func:`_moments_from_natural`."""
    m = moments.means
    return (m, moments.covs + _outer(m, m), moments.cross_covs + _outer(m[1:], m[:-1]))


def _posterior_stats_bwd(schedule, state, res, cotangent):
    with traced_as(state):
        return _posterior_stats_bwd_traced(schedule, res, cotangent)


def _is_zero(x):
    return isinstance(x, SymbolicZero)


def _posterior_stats_bwd_traced(schedule, res, cotangent):
    chain, potentials, moments, filtered, residuals = res
    # The residuals' cotangent is dropped: their users differentiate y − H m itself.
    moments_bar, log_z_bar, _ = cotangent
    # Outputs that the caller does not differentiate come as symbolic zeros. Without a
    # moments' cotangent (log Z alone: a marginal likelihood) the gradient is the Fisher
    # identity's alone; without the covariances' (a draw, the means), the direction has no
    # quadratic part and the covariances' tangents are zero: neither is computed.
    weight = jnp.zeros((), moments.means.dtype) if _is_zero(log_z_bar) else log_z_bar
    if all(_is_zero(x) for x in moments_bar):
        grads = _expected_log_joint_along_grad(
            moments, None, 1.0, chain, potentials, residuals=residuals
        )
        return jax.tree.map(lambda x: x if x.dtype == jax.dtypes.float0 else weight * x, grads)
    means_only = _is_zero(moments_bar.covs) and _is_zero(moments_bar.cross_covs)
    pairs = zip(moments_bar, moments, strict=True)
    moments_bar = Moments(*(jnp.zeros_like(x) if _is_zero(b) else b for b, x in pairs))
    natural = _natural_from_moments(moments)
    # The cotangent as a direction in natural coordinates: log q gains
    # ε (d_lin·z_t + z_tᵀ d_quad z_t + z_{t+1}ᵀ d_cross z_t), with
    # d_lin = d_lin_rest − (d_quad + d_quadᵀ) m_t: the VJP is linear, and its part from the
    # covariances' cotangent is that product alone (d_quad is that cotangent).
    without_covs = moments_bar._replace(covs=jnp.zeros_like(moments_bar.covs))
    d_lin_rest, _, d_cross = jax.vjp(_moments_from_natural, *natural)[1](without_covs)
    d_quad = moments_bar.covs
    F, c, S = _transitions(chain)
    # The pairwise term enters as F → F + ε S d_cross, which adds ε z_{t+1}ᵀ d_cross z_t;
    # the node terms J, h cancel what that change adds on z_t alone.
    F_dot = matmul(S, d_cross)
    KtF = matmul(transpose(d_cross), F)
    J_dot = (-(d_quad + transpose(d_quad))).at[:-1].add(-(KtF + transpose(KtF)))
    # h_dot − J_dot m^f, with m^f − m = −G (m_{t+1} − m^p_{t+1}) from the smoother's gains:
    # formed as h_dot − J_dot m^f it is a difference of terms of size ‖d_quad m‖ (the
    # precision of a potential times the mean), which cancel where a precise potential
    # pins m^f and m to the same value (derivation, section 11).
    mf, mp = filtered.filtered_means, filtered.predicted_means
    G, _ = _rts_gain(F, filtered.filtered_covs[:-1], filtered.predicted_covs[1:])
    filtered_minus_smoothed = _cat_last(
        -matvec(G, moments.means[1:] - mp[1:]), jnp.zeros_like(mf[0])
    )
    node_information = (
        (d_lin_rest + matvec(d_quad + transpose(d_quad), filtered_minus_smoothed))
        .at[:-1]
        .add(matvec(transpose(d_cross), c) + matvec(KtF + transpose(KtF), mf[:-1]))
    )
    filtered_dot = _filter_tangent(
        chain, potentials, filtered, F_dot, J_dot, node_information, schedule, means_only
    )
    moments_dot = _smoothed_tangent(
        chain, filtered, filtered_dot, F_dot, moments, schedule, means_only
    )
    moments_dot = jax.lax.stop_gradient(moments_dot)
    return _expected_log_joint_along_grad(
        moments, moments_dot, weight, chain, potentials, residuals=residuals
    )


def _expected_log_joint_along_grad(
    moments,
    tangent,
    weight,
    chain,
    potentials,
    initial=True,
    moments_grad=False,
    residuals=None,
    transition=None,
):
    """Gradient of :func:`_expected_log_joint_along` w.r.t. ``chain`` and ``potentials``
    (``None``: left out), and with ``moments_grad`` (only without a tangent) w.r.t. the
    ``moments`` first.

    Written out (``docs/derivation.md``, section 8): for a term ``−tr(Λ S)/2 − w log
    det(2πΣ)/2`` with ``Λ = Σ⁻¹`` and scatter ``S = V_w + w e eᵀ + ė eᵀ + e ėᵀ``,
    ``∂/∂e = −r`` with ``r = Λ(w e + ė)``, ``∂/∂ė = −Λ e``, ``∂/∂V_w = −Λ/2`` and
    ``∂/∂Σ = (Λ S Λ − w Λ)/2``. Reverse mode of the same algebra transposes every small
    product into reductions that XLA's CPU backend hands to a library call one by one
    (2× slower at k = 4). ``e`` and ``V`` are linear in the moments: ``∂/∂E[x] = −Λ e``
    (pushed through ``e``'s linear map), and ``∂/∂V = −Λ/2`` likewise through ``V``'s.
    """
    dtype = moments.means.dtype
    weight = jnp.asarray(weight, dtype)
    m = moments.means
    m_dot = None if tangent is None else tangent.means
    num_steps, k = m.shape

    # Initial state.
    if initial:
        e, e_dot, V = _initial_residual(moments, chain, tangent, weight)
        lam_0 = precision_from_chol(cholesky(chain.initial_cov))
        g_initial_mean = matvec(lam_0, _along(weight, e, e_dot))
        scatter = _scatter(weight, e, e_dot, V)
        g_initial_cov = gaussian_energy_cov_grad(lam_0, scatter, weight, 1.0, lam_0.shape)
    else:
        g_initial_mean = jnp.zeros_like(chain.initial_mean)
        g_initial_cov = jnp.zeros_like(chain.initial_cov)

    # Transitions.
    F, C_w, F_P, e, e_dot, V = _transition_residuals(moments, chain, tangent, weight, transition)
    lam = precision_from_chol(cholesky(chain.transition_cov))
    r = matvec(lam, _along(weight, e, e_dot))
    # Per step, or summed over the steps with shared dynamics (C_w, F P_w are sums then).
    outer = outer_sum if _shared_dynamics(chain) else _outer
    g_F = outer(r, m[:-1]) + matmul(lam, C_w - F_P)
    if tangent is not None:
        g_F = g_F + outer(matvec(lam, e), m_dot[:-1])
    scatter, scatter_weight = _transition_scatter(chain, weight, e, e_dot, V)
    g_S = gaussian_energy_cov_grad(lam, scatter, scatter_weight, 1.0, chain.transition_cov.shape)
    g_chain = GaussMarkovChain(
        g_initial_mean,
        g_initial_cov,
        sum_to_shape(g_F, chain.transition_matrix.shape),
        sum_to_shape(r, chain.transition_offset.shape),
        g_S,
    )
    if moments_grad:
        # e_t = m_{t+1} − F m_t − c: ∂/∂m_{t+1} = −r, ∂/∂m_t = Fᵀ r. V_t = P_{t+1} − C Fᵀ −
        # F Cᵀ + F P_t Fᵀ: ∂/∂P_{t+1} = −Λ/2, ∂/∂P_t = −Fᵀ Λ F/2, ∂/∂C_t = Λ F.
        lam_F = matmul(lam, F)
        g_means = _on_steps(-r, 1, num_steps) + _on_steps(matvec(transpose(F), r), 0, num_steps)
        g_covs = -0.5 * (
            _on_steps(lam, 1, num_steps) + _on_steps(matmul(transpose(F), lam_F), 0, num_steps)
        )
        g_cross = jnp.broadcast_to(lam_F, (num_steps - 1, k, k))
        if initial:
            g_means = g_means - _on_steps(g_initial_mean[None], 0, num_steps, 1)
            g_covs = g_covs - 0.5 * _on_steps(lam_0[None], 0, num_steps, 1)
    if potentials is None:
        return (
            (Moments(g_means, g_covs, g_cross), g_chain, None) if moments_grad else (g_chain, None)
        )

    # Potentials; masked steps contribute nothing.
    y, R, H, mask = _masked_potentials(potentials)
    P_w, e, e_dot, V = _node_residuals(moments, potentials, tangent, weight, residuals)
    on = mask.astype(dtype)
    if _is_diagonal(R, y):
        # Λ = diag(1/r): every product with it is a scaling, (Λ S Λ − w Λ)_ii / 2 the gradient.
        lam = 1.0 / R
        lam_vec = functools.partial(jnp.multiply, lam)
        lam_mat = functools.partial(jnp.multiply, lam[..., None])
        scatter = _scatter_diagonal(weight, e, e_dot, V)
        g_R = 0.5 * on[:, None] * lam * (lam * scatter - weight)  # no λ² (overflows)
    else:
        lam = precision_from_chol(cholesky(R))
        lam_vec, lam_mat = functools.partial(matvec, lam), functools.partial(matmul, lam)
        g_R = gaussian_energy_cov_grad(lam, _scatter(weight, e, e_dot, V), weight, on, R.shape)
    r = lam_vec(_along(weight, e, e_dot))
    g_H = None
    if H is not None:
        g_H = _outer(r, m) - lam_mat(matmul(H, P_w))
        if tangent is not None:
            g_H = g_H + _outer(lam_vec(e), m_dot)
        g_H = sum_to_shape(on[:, None, None] * g_H, H.shape)
    g_potentials = Potentials(
        on[:, None] * -r, g_R, g_H, np.zeros(mask.shape, dtype=jax.dtypes.float0)
    )
    if not moments_grad:
        return g_chain, g_potentials
    # e = y − H m_t: ∂/∂m_t = Hᵀ r; V = H P_t Hᵀ: ∂/∂P_t = −Hᵀ Λ H/2.
    g_means = g_means + on[:, None] * _emit_transpose(H, r)
    if H is None:  # Λ itself
        lam_H = lam_mat(jnp.eye(y.shape[-1], dtype=dtype)) if _is_diagonal(R, y) else lam
    else:
        lam_H = symmetrize(matmul(transpose(H), lam_mat(H)))
    g_covs = g_covs - 0.5 * on[:, None, None] * lam_H
    return Moments(g_means, g_covs, g_cross), g_chain, g_potentials


def _on_steps(x, start, num_steps, length=None):
    """``[T, ...]``: ``x`` on steps ``start … start + length − 1`` (``length`` is ``T − 1``
    unless given), zeros elsewhere. ``x`` has that time axis, or 1 when the same at every
    step: then it is selected by step, never padded or updated in place, so XLA fuses it
    into its consumer instead of storing a ``[T, ...]`` array of copies from the start."""
    length = num_steps - 1 if length is None else length
    if x.shape[0] == 1:
        t = jnp.arange(num_steps).reshape((num_steps,) + (1,) * (x.ndim - 1))
        return jnp.where((t >= start) & (t < start + length), x, 0)
    before = jnp.zeros((start,) + x.shape[1:], x.dtype)
    after = jnp.zeros((num_steps - start - length,) + x.shape[1:], x.dtype)
    return jnp.concatenate([before, x, after])


_posterior_stats_custom.defvjp(_posterior_stats_fwd, _posterior_stats_bwd, symbolic_zeros=True)
