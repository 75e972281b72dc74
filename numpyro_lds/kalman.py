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
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from numpyro_lds.linalg import (
    cho_solve,
    cholesky,
    expected_mvn_log_prob,
    matmul,
    matvec,
    mvn_entropy,
    mvn_log_prob,
    quad_form,
    symmetrize,
    transpose,
)

__all__ = [
    "FilterResult",
    "GaussMarkovChain",
    "Moments",
    "Posterior",
    "Potentials",
    "chain_entropy",
    "chain_log_prob",
    "chain_moments",
    "chain_sample",
    "condition_on_potentials",
    "expected_potential_log_prob",
    "expected_transition_log_prob",
    "kalman_filter",
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
    """Gaussian potentials ``N(mean_t; H_t z_t, cov_t)`` (time axis of ``H`` is ``T`` or 1)."""

    mean: jnp.ndarray  # [T, d]
    cov: jnp.ndarray  # [T, d, d]
    emission_matrix: jnp.ndarray  # [T or 1, d, k]
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


def _along_time(x, n):
    """Broadcast a leading time axis of length 1 (shared) to length ``n``."""
    return jnp.broadcast_to(x, (n,) + x.shape[1:])


def _transitions(chain, num_steps):
    n = num_steps - 1
    return (
        _along_time(chain.transition_matrix, n),
        _along_time(chain.transition_offset, n),
        _along_time(chain.transition_cov, n),
    )


def chain_moments(chain: GaussMarkovChain, num_steps: int) -> Moments:
    """Marginal means, covariances and lag-one cross-covariances of a chain."""

    def step(carry, x):
        m, P = carry
        F, c, S = x
        m_next = matvec(F, m) + c
        P_next = quad_form(F, P) + S
        return (m_next, P_next), (m_next, P_next, matmul(F, P))

    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    _, (ms, Ps, Cs) = lax.scan(step, (m0, P0), _transitions(chain, num_steps))
    return Moments(jnp.concatenate([m0[None], ms]), jnp.concatenate([P0[None], Ps]), Cs)


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


def chain_sample(chain: GaussMarkovChain, eps):
    """Reparametrized draw: maps standard normal ``eps [T, k]`` to a chain path ``[T, k]``."""
    num_steps = eps.shape[0]
    F, c, _ = _transitions(chain, num_steps)
    chol_S = _along_time(cholesky(chain.transition_cov), num_steps - 1)
    z0 = chain.initial_mean + matvec(cholesky(chain.initial_cov), eps[0])

    def step(z, x):
        F_t, c_t, L_t, e_t = x
        z = matvec(F_t, z) + c_t + matvec(L_t, e_t)
        return z, z

    _, zs = lax.scan(step, z0, (F, c, chol_S, eps[1:]))
    return jnp.concatenate([z0[None], zs])


def chain_entropy(chain: GaussMarkovChain, num_steps: int):
    """Joint entropy ``H(z_1) + Σ_t H(z_{t+1} | z_t)``."""
    h_steps = mvn_entropy(cholesky(chain.transition_cov))
    return mvn_entropy(cholesky(chain.initial_cov)) + jnp.sum(_along_time(h_steps, num_steps - 1))


def _condition(m, P, y, R, H, observed):
    """Condition ``N(m, P)`` on ``N(y; H z, R)``: Kalman update in Joseph form."""
    k = m.shape[-1]
    Hm = matvec(H, m)
    chol_S = cholesky(quad_form(H, P) + R)
    K = transpose(cho_solve(chol_S, matmul(H, P)))  # P Hᵀ S⁻¹
    I_KH = jnp.eye(k, dtype=m.dtype) - matmul(K, H)
    m_new = m + matvec(K, y - Hm)
    # Joseph form: a sum of two PSD terms, so P_new stays PSD under round-off.
    P_new = quad_form(I_KH, P) + quad_form(K, R)
    ll = mvn_log_prob(y, Hm, chol_S)
    return (
        jnp.where(observed, m_new, m),
        jnp.where(observed, P_new, P),
        jnp.where(observed, ll, 0.0),
    )


def _masked_potentials(potentials: Potentials, num_steps: int):
    """Neutral values at masked steps, so no NaN from unused inputs reaches a gradient."""
    d = potentials.mean.shape[-1]
    mask = potentials.mask
    eye = jnp.eye(d, dtype=potentials.mean.dtype)
    return (
        jnp.where(mask[:, None], potentials.mean, 0.0),
        jnp.where(mask[:, None, None], potentials.cov, eye),
        _along_time(potentials.emission_matrix, num_steps),
        mask,
    )


def kalman_filter(chain: GaussMarkovChain, potentials: Potentials) -> FilterResult:
    """Kalman filter of a forward chain against Gaussian potentials (Särkkä 2013, Thm 4.3)."""
    num_steps = potentials.mean.shape[0]
    y, R, H, mask = _masked_potentials(potentials, num_steps)
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    mf0, Pf0, ll0 = _condition(m0, P0, y[0], R[0], H[0], mask[0])

    def step(carry, x):
        m, P = carry
        F, c, S, y_t, R_t, H_t, o_t = x
        mp = matvec(F, m) + c
        Pp = quad_form(F, P) + S
        mf, Pf, ll = _condition(mp, Pp, y_t, R_t, H_t, o_t)
        return (mf, Pf), (mp, Pp, mf, Pf, ll)

    xs = _transitions(chain, num_steps) + (y[1:], R[1:], H[1:], mask[1:])
    _, (mp, Pp, mf, Pf, ll) = lax.scan(step, (mf0, Pf0), xs)
    cat = lambda a, b: jnp.concatenate([a[None], b])  # noqa: E731
    return FilterResult(cat(m0, mp), cat(P0, Pp), cat(mf0, mf), cat(Pf0, Pf), ll0 + jnp.sum(ll))


def smoother_chain(chain: GaussMarkovChain, filtered: FilterResult) -> GaussMarkovChain:
    """The smoothed posterior as a chain in reversed time (RTS backward kernels).

    ``z_t | z_{t+1} ~ N(G_t z_{t+1} + h_t, L_t)`` with ``G_t = P^f_t F_tᵀ (P^p_{t+1})⁻¹``,
    ``h_t = m^f_t − G_t m^p_{t+1}`` and ``L_t = P^f_t − G_t P^p_{t+1} G_tᵀ``, the latter in
    the Joseph form ``(I − G_t F_t) P^f_t (·)ᵀ + G_t S_t G_tᵀ``, PSD by construction.
    None of these depend on the backward pass, so they are computed for all t at once.
    """
    num_steps, k = filtered.filtered_means.shape
    F, _, S = _transitions(chain, num_steps)
    mf, Pf = filtered.filtered_means[:-1], filtered.filtered_covs[:-1]
    mp, Pp = filtered.predicted_means[1:], filtered.predicted_covs[1:]
    G = transpose(cho_solve(cholesky(Pp), matmul(F, Pf)))
    I_GF = jnp.eye(k, dtype=mf.dtype) - matmul(G, F)
    L = quad_form(I_GF, Pf) + quad_form(G, S)
    h = mf - matvec(G, mp)
    return GaussMarkovChain(
        filtered.filtered_means[-1],
        filtered.filtered_covs[-1],
        jnp.flip(G, 0),
        jnp.flip(h, 0),
        jnp.flip(L, 0),
    )


def condition_on_potentials(chain: GaussMarkovChain, potentials: Potentials) -> Posterior:
    """Kalman filter + RTS backward kernels: the posterior chain and ``log ∫ p · Π φ_t``."""
    filtered = kalman_filter(chain, potentials)
    return Posterior(smoother_chain(chain, filtered), filtered.log_normalizer)


def expected_transition_log_prob(moments: Moments, chain: GaussMarkovChain):
    """``Σ_t E[log N(z_{t+1}; F_t z_t + c_t, S_t)]`` under a Gaussian with ``moments``.

    With ``e_t = z_{t+1} − F_t z_t − c_t``: ``E[e_t] = m_{t+1} − F_t m_t − c_t`` and
    ``Cov(e_t) = P_{t+1} − C_t F_tᵀ − F_t C_tᵀ + F_t P_t F_tᵀ`` (``C_t = Cov(z_{t+1}, z_t)``).
    This is Term C of ``docs/derivation.md``.
    """
    num_steps = moments.means.shape[0]
    F, c, _ = _transitions(chain, num_steps)
    chol_S = _along_time(cholesky(chain.transition_cov), num_steps - 1)
    m_prev, m_next = moments.means[:-1], moments.means[1:]
    CFt = matmul(moments.cross_covs, transpose(F))
    V = moments.covs[1:] - CFt - transpose(CFt) + quad_form(F, moments.covs[:-1])
    pred = matvec(F, m_prev) + c
    return jnp.sum(expected_mvn_log_prob(m_next, symmetrize(V), pred, chol_S))


def expected_potential_log_prob(moments: Moments, potentials: Potentials):
    """``Σ_t mask_t E[log N(mean_t; H_t z_t, cov_t)]`` under a Gaussian with ``moments``."""
    num_steps = moments.means.shape[0]
    y, R, H, mask = _masked_potentials(potentials, num_steps)
    per_step = expected_mvn_log_prob(
        matvec(H, moments.means), quad_form(H, moments.covs), y, cholesky(R)
    )
    return jnp.sum(jnp.where(mask, per_step, 0.0))
