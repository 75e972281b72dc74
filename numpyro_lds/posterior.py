"""A chain conditioned on potentials: its moments, draws and log-density, with their VJPs.

No gradient here runs reverse mode through the filter's and the smoother's scans
(``docs/derivation.md``, section 8): :func:`posterior_stats` and
:func:`posterior_log_prob` have custom VJPs, each ``defvjp`` right after its backward
pass, and :func:`posterior_sample` is a prior path (an affine recursion, differentiated
by reverse mode) plus a smoothed mean, whose gradient is :func:`posterior_stats`'.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from numpyro_lds.chains import (
    GaussMarkovChain,
    Moments,
    chain_log_prob,
    chain_moments,
    chain_sample,
    time_reversed,
    transitions,
)
from numpyro_lds.expectations import (
    expected_log_joint_along_grad,
    outer_product,
)
from numpyro_lds.kalman import (
    FilterResult,
    condition_on_potentials,
    kalman_filter,
    rts_gain,
    rts_kernels,
)
from numpyro_lds.linalg import (
    cho_solve,
    cholesky,
    matmul,
    matvec,
    mvn_log_prob,
    sum_last,
    traced_as,
    tracing_state,
    transpose,
)
from numpyro_lds.potentials import Potentials, emit, emit_cov, masked_potentials
from numpyro_lds.schedules import cat_last, require_schedule
from numpyro_lds.tangents import filter_tangent, smoothed_tangent

__all__ = ["PosteriorStats", "posterior_log_prob", "posterior_sample", "posterior_stats"]


class PosteriorStats(NamedTuple):
    """Smoothed moments (forward time) and log-normalizer of a conditioned chain.

    ``potential_residuals [T, d]``: ``y_t − H_t m_t`` (``m_t`` the smoothed mean),
    accurate to its own size (``_smoothed_residuals``). Where a potential is far more
    precise than the prior's prediction, ``H_t m_t`` equals ``y_t`` up to rounding and
    the plain difference is rounding error alone, which the potential's precision then
    multiplies. Their cotangent is not used: the expectations that take them
    differentiate ``y − H m`` itself.
    """

    #: The smoothed :class:`~numpyro_lds.chains.Moments` in forward time (``means [T, k]``,
    #: ``covs [T, k, k]``, ``cross_covs [T − 1, k, k]``).
    moments: Moments
    #: ``[]``, ``log Z = log ∫ chain · Π φ_t``.
    log_normalizer: jnp.ndarray
    #: ``[T, d]``, ``y_t − H_t m_t`` for the smoothed means ``m_t``, 0 at masked steps.
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

    Args:
      chain: the forward chain (the prior), transitions ``[T − 1 or 1, ...]``.
      potentials: the :class:`~numpyro_lds.potentials.Potentials` it is conditioned on
        (``mean [T, d]``), masked or not.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      :class:`PosteriorStats`: smoothed ``means [T, k]``, ``covs [T, k, k]`` and
      ``cross_covs [T − 1, k, k]``, the log-normalizer (a scalar) and the potentials'
      residuals ``[T, d]``.
    """
    require_schedule(schedule)
    return _posterior_stats_custom(chain, potentials, schedule, tracing_state())


def _posterior_stats(chain, potentials, schedule):
    # The forward pass's value (its residuals are dropped by XLA).
    return _posterior_stats_fwd_traced(chain, potentials, schedule)[0]


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
    filtered = kalman_filter(chain, potentials, schedule)
    moments = _smoothed_moments(chain, filtered, schedule)
    residuals = _smoothed_residuals(chain, potentials, filtered, moments.means)
    stats = _batched_with(
        PosteriorStats(moments, filtered.log_normalizer, residuals), (chain, potentials)
    )
    # The filter is kept for the backward pass (two [T, k, k] arrays more than the
    # moments), which would otherwise run it again.
    return stats, (chain, potentials, moments, filtered, stats.potential_residuals)


def _smoothed_moments(chain, filtered: FilterResult, schedule) -> Moments:
    num_steps = filtered.filtered_means.shape[0]
    return chain_moments(rts_kernels(chain, filtered), num_steps, schedule, reverse=True)


def _smoothed_residuals(chain, potentials, filtered: FilterResult, smoothed_means):
    """``PosteriorStats.potential_residuals``: ``y_t − H_t m_t`` for the smoothed means ``m_t``.

    Accurate to its own size (derivation, section 11), 0 at masked steps.

    The filtered residual is a ratio, ``y − H m^f = (I − H K)(y − H m^p) = R S⁻¹ (y − H
    m^p)``, and the smoother adds ``−H_t G_t (m_{t+1} − m^p_{t+1})``, whose gain rows along a
    precise potential are as small as its covariance: neither subtracts numbers that
    agree to many digits.
    """
    y, R, H, mask = masked_potentials(potentials)
    mp, Pp = filtered.predicted_means, filtered.predicted_covs
    diagonal = potentials.diagonal
    R_full = R[..., None] * jnp.eye(y.shape[-1], dtype=R.dtype) if diagonal else R
    chol_innovation = cholesky(emit_cov(H, Pp) + R_full)
    S_inv_r = cho_solve(chol_innovation, (y - emit(H, mp))[..., None])[..., 0]
    e = R * S_inv_r if diagonal else matvec(R, S_inv_r)
    F, _, _ = transitions(chain)
    G, _ = rts_gain(F, filtered.filtered_covs[:-1], Pp[1:])
    step = matvec(G, smoothed_means[1:] - mp[1:])
    H_rest = None if H is None else (H if H.shape[0] == 1 else H[:-1])
    e = e.at[:-1].add(-emit(H_rest, step))
    return jnp.where(mask[:, None], e, 0.0)


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


def _moments_from_natural(means, second, cross_second):
    """``(E z, E zzᵀ, E z_{t+1}z_tᵀ) ↦ Moments`` (central second moments)."""
    return Moments(
        means,
        second - outer_product(means, means),
        cross_second - outer_product(means[1:], means[:-1]),
    )


def _natural_from_moments(moments: Moments):
    """The inverse of ``_moments_from_natural``."""
    m = moments.means
    return (
        m,
        moments.covs + outer_product(m, m),
        moments.cross_covs + outer_product(m[1:], m[:-1]),
    )


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
        grads = expected_log_joint_along_grad(
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
    F, c, S = transitions(chain)
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
    G, _ = rts_gain(F, filtered.filtered_covs[:-1], filtered.predicted_covs[1:])
    filtered_minus_smoothed = cat_last(
        -matvec(G, moments.means[1:] - mp[1:]), jnp.zeros_like(mf[0])
    )
    node_information = (
        (d_lin_rest + matvec(d_quad + transpose(d_quad), filtered_minus_smoothed))
        .at[:-1]
        .add(matvec(transpose(d_cross), c) + matvec(KtF + transpose(KtF), mf[:-1]))
    )
    filtered_dot = filter_tangent(
        chain, potentials, filtered, F_dot, J_dot, node_information, schedule, means_only
    )
    moments_dot = smoothed_tangent(
        chain, filtered, filtered_dot, F_dot, moments, schedule, means_only
    )
    moments_dot = jax.lax.stop_gradient(moments_dot)
    return expected_log_joint_along_grad(
        moments, moments_dot, weight, chain, potentials, residuals=residuals
    )


_posterior_stats_custom.defvjp(_posterior_stats_fwd, _posterior_stats_bwd, symbolic_zeros=True)


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

    Args:
      chain: the forward chain (the prior), transitions ``[T − 1 or 1, ...]``.
      potentials: the :class:`~numpyro_lds.potentials.Potentials` it is conditioned on
        (``mean [T, d]``), masked or not.
      eps: standard normals ``[T, k + d]``.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      The draw ``z [T, k]``.
    """
    k = chain.initial_mean.shape[-1]
    eps_z, eps_y = eps[..., :k], eps[..., k:]
    prior_path = chain_sample(chain, eps_z, schedule)
    y, R, H, _ = masked_potentials(potentials)
    if potentials.diagonal:
        noise = jnp.sqrt(R) * eps_y
    else:
        noise = matvec(cholesky(R), eps_y)
    pseudo = emit(H, prior_path) + noise
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

    Args:
      chain: the forward chain (the prior), transitions ``[T − 1 or 1, ...]``.
      potentials: the :class:`~numpyro_lds.potentials.Potentials` it is conditioned on
        (``mean [T, d]``), masked or not.
      z: paths ``[..., T, k]``, in forward time.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      ``[...]``, one log-density per path.
    """
    require_schedule(schedule)
    return _posterior_log_prob(chain, potentials, z, schedule, tracing_state())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _posterior_log_prob(chain, potentials, z, schedule, state):
    backward = condition_on_potentials(chain, potentials, schedule).backward_chain
    return chain_log_prob(backward, jnp.flip(z, -2))


def _posterior_log_prob_fwd(chain, potentials, z, schedule, state):
    with traced_as(state):
        filtered = kalman_filter(chain, potentials, schedule)
        kernels = rts_kernels(chain, filtered)
        moments = chain_moments(kernels, z.shape[-2], schedule, reverse=True)
        log_prob = chain_log_prob(time_reversed(kernels), jnp.flip(z, -2))
        return log_prob, (chain, potentials, z, moments)


def _joint_log_density(chain, potentials, z):
    """``log prior(z) + Σ_t mask_t log N(mean_t; H_t z_t, cov_t)`` for ``z [..., T, k]``."""
    y, R, H, mask = masked_potentials(potentials)
    residual = y - emit(H, z)
    if potentials.diagonal:
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
    z_chain, z_potentials = expected_log_joint_along_grad(moments, None, 1.0, chain, potentials)
    g_sum = jnp.sum(g)

    def minus(a, b):
        return a if a.dtype == jax.dtypes.float0 else a - g_sum * b

    return (
        jax.tree.map(minus, g_chain, z_chain),
        jax.tree.map(minus, g_potentials, z_potentials),
        g_z,
    )


_posterior_log_prob.defvjp(_posterior_log_prob_fwd, _posterior_log_prob_bwd)
