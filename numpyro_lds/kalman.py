"""The Kalman filter and the RTS smoother of one sequence, on any schedule.

Everything in the core (:mod:`~numpyro_lds.schedules`, :mod:`~numpyro_lds.chains`,
:mod:`~numpyro_lds.potentials`, this module, :mod:`~numpyro_lds.tangents`,
:mod:`~numpyro_lds.expectations`, :mod:`~numpyro_lds.posterior`) acts on a single
sequence (states ``[T, k]``); the distribution classes batch it with one helper
(``numpyro_lds._batch.batch_map``). The symbols, in code and in ``docs/derivation.md``
(which keeps the source note's names for the dynamics):

=================================  ========================  ======================================
code                               derivation                meaning
=================================  ========================  ======================================
``F, c, S`` (``transition_*``)     ``A_t, b_t, Q_t``         ``z_t ~ N(A_t z_{t-1} + b_t, Q_t)``
``initial_mean, initial_cov``      ``m_0, P_0``              law of ``z_1``
``y, R, H`` (``Potentials``)       ``x_t, R_t, H_t``         potential ``N(y_t; H_t z_t, R_t)``
``mp, Pp``                         ``m_{t|t-1}, P_{t|t-1}``  one-step prediction
``mf, Pf``                         ``m_{t|t}, P_{t|t}``      filtered moments
``chol_innovation``                ``S_t`` (factored)        innovation covariance ``H Pp Hᵀ + R``
``K``, ``I − K H``                 ``K_t``, ``I − K_t H_t``  gain, residual map
``G, h, L``                        ``G_t``, …                RTS backward kernels
``means, covs, cross_covs``        ``m_t, Σ_t, C_t``         smoothed moments
=================================  ========================  ======================================
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from numpyro_lds.chains import GaussMarkovChain, time_reversed, transitions, transitions_along_time
from numpyro_lds.linalg import (
    cho_solve,
    cholesky,
    inverse,
    logdet_from_chol,
    matmul,
    matvec,
    mvn_log_prob,
    quad_form,
    solve_lower,
    solve_lower_vec,
    sum_last,
    symmetrize,
    transpose,
)
from numpyro_lds.potentials import (
    Potentials,
    emit,
    emit_cov,
    emit_left,
    is_diagonal,
    masked_potentials,
)
from numpyro_lds.schedules import (
    along_time,
    cat_first,
    from_start,
    prefix_scan,
    require_schedule,
    scan_steps,
)

__all__ = [
    "FilterResult",
    "Posterior",
    "condition_on_potentials",
    "kalman_filter",
    "rts_kernels",
    "smoother_chain",
]


class FilterResult(NamedTuple):
    """Kalman filter output: one-step predictions, filtered moments, log-normalizer."""

    #: ``[T, k]``, the predictions ``m_{t|t-1} = E[z_t | x_{1:t-1}]`` (``m_0`` at ``t = 1``).
    predicted_means: jnp.ndarray
    #: ``[T, k, k]``, their covariances ``P_{t|t-1}`` (``P_0`` at ``t = 1``).
    predicted_covs: jnp.ndarray
    #: ``[T, k]``, the filtered means ``m_{t|t} = E[z_t | x_{1:t}]``.
    filtered_means: jnp.ndarray
    #: ``[T, k, k]``, the filtered covariances ``P_{t|t}``.
    filtered_covs: jnp.ndarray
    #: ``[]``, ``log p(x_{1:T}) = log ∫ chain · Π φ_t``.
    log_normalizer: jnp.ndarray


class Posterior(NamedTuple):
    """The conditioned chain, in reversed time, and its log-normalizer."""

    #: The posterior as a :class:`~numpyro_lds.chains.GaussMarkovChain` in reversed time
    #: (:func:`smoother_chain`): initial state ``z_T`` (``[k]``, ``[k, k]``), transitions
    #: ``G, h, L`` (``[T − 1, k, k]``, ``[T − 1, k]``, ``[T − 1, k, k]``), last step first.
    backward_chain: GaussMarkovChain
    #: ``[]``, ``log ∫ chain · Π φ_t``, as :attr:`FilterResult.log_normalizer`.
    log_normalizer: jnp.ndarray


class KalmanUpdate(NamedTuple):
    mean: jnp.ndarray
    cov: jnp.ndarray
    log_lik: jnp.ndarray  # log N(y; H m, S), 0 where unobserved
    gain: jnp.ndarray  # K = P Hᵀ S⁻¹
    chol_innovation: jnp.ndarray  # of the innovation covariance H P Hᵀ + R
    residual_map: jnp.ndarray  # I − K H (the identity where unobserved)


def kalman_update(m, P, y, R, H, observed) -> KalmanUpdate:
    """Condition ``N(m, P)`` on ``N(y; H z, R)``: Kalman update in Joseph form.

    ``R`` is ``[.., d, d]``, or ``[.., d]`` (the variances of a diagonal ``R``).
    """
    k, d = m.shape[-1], y.shape[-1]
    Hm = emit(H, m)
    diagonal = is_diagonal(R, y)
    R_full = R[..., None] * jnp.eye(d, dtype=R.dtype) if diagonal else R
    chol_innovation = cholesky(emit_cov(H, P) + R_full)
    K, I_KH = _gain_and_residual_map(P, R, H, chol_innovation, diagonal)
    m_new = m + matvec(K, y - Hm)
    # Joseph form: a sum of two PSD terms, so P_new stays PSD under round-off.
    K_R_Kt = symmetrize(matmul(K * R[..., None, :], transpose(K))) if diagonal else quad_form(K, R)
    P_new = quad_form(I_KH, P) + K_R_Kt
    ll = mvn_log_prob(y, Hm, chol_innovation)
    o_vec, o_mat = observed[..., None], observed[..., None, None]
    return KalmanUpdate(
        jnp.where(o_vec, m_new, m),
        jnp.where(o_mat, P_new, P),
        jnp.where(observed, ll, 0.0),
        jnp.where(o_mat, K, 0.0),
        chol_innovation,
        jnp.where(o_mat, I_KH, jnp.eye(k, dtype=m.dtype)),
    )


def _gain_and_residual_map(P, R, H, chol_innovation, diagonal):
    """The gain ``K = P Hᵀ S⁻¹`` and ``I − K H``.

    Accurate however much more (or less) precise a potential is than ``P`` along each axis
    (derivation, section 11).

    Here ``S = H P Hᵀ + R`` is the innovation covariance, given by its Cholesky factor
    ``chol_innovation``.

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
        innovation_inv = cho_solve(chol_innovation, jnp.broadcast_to(eye, chol_innovation.shape))
        I_KH = R[..., :, None] * innovation_inv if diagonal else matmul(R, innovation_inv)
        K_direct, K_precise = matmul(P, innovation_inv), eye - I_KH
        R_diag = R if diagonal else jnp.diagonal(R, axis1=-2, axis2=-1)
        precise = R_diag <= jnp.diagonal(P, axis1=-2, axis2=-1)
    else:
        K_direct = transpose(cho_solve(chol_innovation, emit_left(H, P)))
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


def kalman_filter(
    chain: GaussMarkovChain, potentials: Potentials, schedule="sequential"
) -> FilterResult:
    """Kalman filter of a forward chain against Gaussian potentials (Särkkä 2013, Thm 4.3).

    Args:
      chain: the forward chain (the prior), transitions ``[T − 1 or 1, ...]``.
      potentials: the potentials (``mean [T, d]``), masked or not (masked steps are
        neutral here).
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      :class:`FilterResult`: predicted and filtered means ``[T, k]`` and covariances
      ``[T, k, k]``, and ``log ∫ chain · Π φ_t``, a scalar.
    """
    require_schedule(schedule)
    y, R, H, mask = masked_potentials(potentials)
    if schedule == "sequential":
        mf, Pf, log_normalizer = _sequential_filter(chain, y, R, H, mask)
    else:
        elements = _filter_elements(chain, y, R, H, mask)
        filtered = prefix_scan(_combine_filter, elements, schedule)
        mf, Pf, log_normalizer = filtered.b, filtered.C, filtered.log_c[-1]
    # The one-step predictions, for all steps at once also after the sequential scan: each
    # output of its body is one more kernel per step.
    F, c, S = transitions(chain)
    mp = cat_first(chain.initial_mean, matvec(F, mf[:-1]) + c)
    Pp = cat_first(symmetrize(chain.initial_cov), quad_form(F, Pf[:-1]) + S)
    return FilterResult(mp, Pp, mf, Pf, log_normalizer)


def _sequential_filter(chain, y, R, H, mask):
    """Filtered means and covariances by one scan, and the log-normalizer.

    Each step predicts and applies :func:`kalman_update` to the carried state, rather than
    folding the parallel filter's elements (:func:`_combine_filter`), which costs several
    ``k × k`` solves per step (``benchmarks/sequential_filter_fold.py``).
    """
    num_steps = y.shape[0]
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)

    def step(carry, x):
        m, P = carry
        first, F, c, S, y_t, R_t, H_t, o_t = x
        mp = jnp.where(first, m0, matvec(F, m) + c)
        Pp = jnp.where(first, P0, quad_form(F, P) + S)
        u = kalman_update(mp, Pp, y_t, R_t, H_t, o_t)
        return (u.mean, u.cov), (u.mean, u.cov, u.log_lik)

    xs = from_start(transitions(chain), num_steps) + (y, R, H, mask)
    _, (mf, Pf, ll) = scan_steps(step, (m0, P0), xs, num_steps)
    return mf, Pf, jnp.sum(ll)


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


def _filter_elements(chain, y, R, H, mask) -> _FilterElement:
    num_steps = y.shape[0]
    F, c, S = transitions_along_time(chain, num_steps)
    if H is None:  # the identity
        H_first = H_rest = None
    else:
        H = along_time(H, num_steps)
        H_first, H_rest = H[0], H[1:]
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    u0 = kalman_update(m0, P0, y[0], R[0], H_first, mask[0])
    # Step t ≥ 2, given z_{t-1}: the prediction N(F z + c, S) conditioned on potential t.
    u = kalman_update(c, S, y[1:], R[1:], H_rest, mask[1:])
    V = solve_lower(u.chol_innovation, emit_left(H_rest, F))  # S^{-1/2} H F, so J = VᵀV is PSD
    w = solve_lower_vec(u.chol_innovation, y[1:] - emit(H_rest, c))
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
    return cat_first(first, steps)


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


def smoother_chain(chain: GaussMarkovChain, filtered: FilterResult) -> GaussMarkovChain:
    """The smoothed posterior as a chain in reversed time (RTS backward kernels).

    ``z_t | z_{t+1} ~ N(G_t z_{t+1} + h_t, L_t)`` with ``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹``,
    ``h_t = m^f_t − G_t m^p_{t+1}`` and ``L_t = P^f_t − G_t P^p_{t+1} G_tᵀ``, the latter in
    the Joseph form ``(I − G_t F_t) P^f_t (·)ᵀ + G_t S_t G_tᵀ``, PSD by construction.
    None of these depend on the backward pass, so they are computed for all t at once.

    Args:
      chain: the forward chain that was filtered, transitions ``[T − 1 or 1, ...]``.
      filtered: its :class:`FilterResult` (means ``[T, k]``, covariances ``[T, k, k]``).

    Returns:
      :class:`~numpyro_lds.chains.GaussMarkovChain`: the posterior in reversed time, with
      initial state ``z_T ~ N(m^f_T, P^f_T)`` (``[k]``, ``[k, k]``), then ``G [T − 1, k, k]``,
      ``h [T − 1, k]`` and ``L [T − 1, k, k]``, entry ``i`` giving ``z_{T−1−i}`` from
      ``z_{T−i}`` (the last step first).
    """
    return time_reversed(rts_kernels(chain, filtered))


def rts_kernels(chain: GaussMarkovChain, filtered: FilterResult) -> GaussMarkovChain:
    """:func:`smoother_chain` with its kernels indexed by forward time.

    ``G_t, h_t, L_t`` at entry ``t``, as :func:`~numpyro_lds.chains.chain_moments` takes a
    chain with ``reverse=True``.

    Args:
      chain: the forward chain (the prior), transitions ``[T − 1 or 1, ...]``.
      filtered: :func:`kalman_filter`'s output for ``chain``.

    Returns:
      :class:`~numpyro_lds.chains.GaussMarkovChain`: initial state ``z_T``
      (``N(m_{T|T}, P_{T|T})``), transitions ``G [T − 1, k, k]``, ``h [T − 1, k]`` and
      ``L [T − 1, k, k]`` with ``z_t | z_{t+1} ~ N(G_t z_{t+1} + h_t, L_t)``.
    """
    k = filtered.filtered_means.shape[-1]
    F, _, S = transitions(chain)
    mf, Pf = filtered.filtered_means[:-1], filtered.filtered_covs[:-1]
    mp, Pp = filtered.predicted_means[1:], filtered.predicted_covs[1:]
    G, _ = rts_gain(F, Pf, Pp)
    I_GF = jnp.eye(k, dtype=mf.dtype) - matmul(G, F)
    L = quad_form(I_GF, Pf) + quad_form(G, S)
    h = mf - matvec(G, mp)
    return GaussMarkovChain(filtered.filtered_means[-1], filtered.filtered_covs[-1], G, h, L)


def rts_gain(F, Pf, Pp):
    """``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹`` for all steps, and the factors of ``P^p_{t+1}``."""
    chol_Pp = cholesky(Pp)
    return transpose(cho_solve(chol_Pp, matmul(F, Pf))), chol_Pp


def condition_on_potentials(
    chain: GaussMarkovChain, potentials: Potentials, schedule="sequential"
) -> Posterior:
    """Kalman filter + RTS backward kernels: the posterior chain and ``log ∫ p · Π φ_t``.

    Args:
      chain: the forward chain ``p`` (the prior), transitions ``[T − 1 or 1, ...]``.
      potentials: the potentials ``φ_t`` (``mean [T, d]``), masked or not.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      :class:`Posterior`: the backward chain of :func:`smoother_chain` (transitions
      ``[T − 1, ...]``) and the log-normalizer, a scalar.
    """
    filtered = kalman_filter(chain, potentials, schedule)
    return Posterior(smoother_chain(chain, filtered), filtered.log_normalizer)
