"""Directional derivatives of the filter's and the smoother's moments, written out.

The posterior statistics' VJP (:mod:`numpyro_lds.posterior`) needs the derivative of the
smoothed moments along one direction of the inputs. Those tangents obey linear
recursions whose coefficients come from the forward pass (``docs/derivation.md``,
section 8); each runs as an affine recursion on the forward pass's schedule.
"""

from __future__ import annotations

import jax.numpy as jnp

from numpyro_lds.chains import (
    GaussMarkovChain,
    Moments,
    affine_recursion,
    chain_moments,
    transitions,
)
from numpyro_lds.kalman import FilterResult, kalman_update, rts_gain
from numpyro_lds.linalg import (
    cho_solve,
    matmul,
    matvec,
    quad_form,
    transpose,
)
from numpyro_lds.potentials import emit, emit_transpose, masked_potentials
from numpyro_lds.schedules import cat_first


def filter_tangent(
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
    y, R, H, mask = masked_potentials(potentials)
    F, _, _ = transitions(chain)
    mp, Pp = filtered.predicted_means, filtered.predicted_covs
    mf, Pf = filtered.filtered_means, filtered.filtered_covs
    # The update's residual map and innovation factor, for all steps at once; the updated
    # moments it also returns are unused (and dropped by XLA).
    update = kalman_update(mp, Pp, y, R, H, mask)
    A = update.residual_map
    M = matmul(A[1:], F)
    zeros = jnp.zeros_like(mf)
    if means_only:
        node_mean = matvec(Pf, node_information)
        covs_dot, Pp_dot = jnp.zeros_like(Pf), jnp.zeros_like(Pf[1:])
        offset = node_mean[1:]
    else:
        S_inv_r = cho_solve(update.chol_innovation, (y - emit(H, mp))[..., None])[..., 0]
        v = jnp.where(mask[:, None], emit_transpose(H, S_inv_r), 0.0)
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
    means_dot = affine_recursion(node_mean[0], M, offset, schedule)
    mp_dot = matvec(F, means_dot[:-1])
    if not means_only:
        mp_dot = mp_dot + pred_mean
    return FilterResult(
        cat_first(zeros[0], mp_dot),
        cat_first(jnp.zeros_like(Pf[0]), Pp_dot),
        means_dot,
        covs_dot,
        jnp.zeros_like(filtered.log_normalizer),
    )


def smoothed_tangent(
    chain, filtered, filtered_dot, F_dot, moments, schedule, means_only=False
) -> Moments:
    """Directional derivative of the smoothed moments, written out (derivation, section 8).

    Given the filter's tangent (:func:`filter_tangent`), the transition matrices' tangent
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
    F, _, _ = transitions(chain)
    Pf = filtered.filtered_covs[:-1]
    mp, Pp = filtered.predicted_means[1:], filtered.predicted_covs[1:]
    mf_dot, Pf_dot = filtered_dot.filtered_means, filtered_dot.filtered_covs
    mp_dot, Pp_dot = filtered_dot.predicted_means[1:], filtered_dot.predicted_covs[1:]
    G, chol_Pp = rts_gain(F, Pf, Pp)
    if means_only:
        # m′_t = G_t m′_{t+1} + h′_t backward from m′_T = m^f′_T: flipped, a forward one.
        h_dot = mf_dot[:-1] - matvec(G, mp_dot)
        flipped = affine_recursion(mf_dot[-1], jnp.flip(G, 0), jnp.flip(h_dot, 0), schedule)
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
