"""Expected log-densities under a Gaussian with given moments, with their gradients.

Every term is ``E[log N(x; μ, Σ)] = −tr(Σ⁻¹ (V + e eᵀ))/2 − log det(2πΣ)/2`` with
``e = E[x] − μ`` and ``V = Cov(x)``: affine in the moments' covariances and quadratic in
their means. Term C of the KL is :func:`expected_transition_log_prob`; the expected log
joint of prior and potentials gives Term B of a posterior and the Fisher identity's
gradient of ``log Z``. The gradients are written out (``docs/derivation.md``, section 8).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from numpyro_lds.chains import GaussMarkovChain, Moments, shared_dynamics, transitions
from numpyro_lds.linalg import (
    HIGHEST,
    cholesky,
    gaussian_energy,
    gaussian_energy_cov_grad,
    matmul,
    matvec,
    outer_sum,
    precision_from_chol,
    quad_form,
    sum_last,
    sum_to_shape,
    symmetrize,
    transpose,
)
from numpyro_lds.potentials import (
    Potentials,
    emit,
    emit_cov,
    emit_transpose,
    masked_potentials,
)

__all__ = [
    "expected_log_joint",
    "expected_potential_log_prob",
    "expected_transition_log_prob",
    "forward_transition_residuals",
]


def expected_transition_log_prob(moments: Moments, chain: GaussMarkovChain, transition=None):
    """``Σ_t E[log N(z_{t+1}; F_t z_t + c_t, S_t)]`` under a Gaussian with ``moments``.

    With ``e_t = z_{t+1} − F_t z_t − c_t``: ``E[e_t] = m_{t+1} − F_t m_t − c_t`` and
    ``Cov(e_t) = P_{t+1} − C_t F_tᵀ − F_t C_tᵀ + F_t P_t F_tᵀ`` (``C_t = Cov(z_{t+1}, z_t)``).
    This is Term C of ``docs/derivation.md``. Its gradient is written out (see
    ``_expected_log_density``). ``transition``: :func:`forward_transition_residuals`
    of the chain the moments are of, when it runs forward (``None``: from the moments).

    Args:
      moments: the Gaussian's :class:`~numpyro_lds.chains.Moments` (``means [T, k]``,
        ``covs [T, k, k]``, ``cross_covs [T − 1, k, k]``).
      chain: the chain whose transitions ``F, c, S`` (``[T − 1 or 1, ...]``) are scored.
      transition: ``None``, or ``(E[e_t] [T − 1, k], Cov(e_t))`` from
        :func:`forward_transition_residuals`, ``Cov(e_t)`` being ``[T − 1, k, k]``, or
        ``[1, k, k]`` summed over the steps where ``chain``'s dynamics are shared.

    Returns:
      A scalar.
    """
    return _expected_log_density(moments, chain, None, None, transition, False)


def forward_transition_residuals(q_chain: GaussMarkovChain, moments: Moments, chain):
    """``E[e_t]`` and ``Cov(e_t)`` of ``e_t = z_{t+1} − F_t z_t − c_t``, without cancellation.

    Under a forward chain ``q_chain`` with ``moments`` (derivation, section 11).

    From the moments, ``Cov(e_t) = P_{t+1} − C_t Fᵀ − F C_tᵀ + F P_t Fᵀ`` is a difference
    of terms of the size of ``P``, which in a near-unit-root chain exceeds the result by
    the joint condition number; under ``q``'s own transition it is
    ``(F_q − F) P_t (F_q − F)ᵀ + S_q`` and ``E[e_t] = (F_q − F) m_t + c_q − c``: sums of
    terms no larger than the result where ``q`` and ``chain`` are alike. ``V`` is summed
    over the steps where ``chain``'s dynamics are shared (see
    ``_transition_residuals``).

    Args:
      q_chain: the forward chain ``q`` (``F_q, c_q, S_q``), transitions
        ``[T − 1 or 1, ...]``.
      moments: ``q_chain``'s :class:`~numpyro_lds.chains.Moments` (``means [T, k]``,
        ``covs [T, k, k]``; the cross-covariances are not used).
      chain: the chain whose transitions ``F, c`` define ``e_t`` (``[T − 1 or 1, ...]``).

    Returns:
      A pair ``(e, V)``, with ``e = E[e_t]`` ``[T − 1, k]`` and ``V = Cov(e_t)``
      ``[T − 1, k, k]``, or ``[1, k, k]`` (the sum over the steps) when ``chain``'s ``F``
      and ``S`` are shared by every step.
    """
    F_q, c_q, S_q = transitions(q_chain)
    F, c, _ = transitions(chain)
    D = F_q - F
    m, P = moments.means[:-1], moments.covs[:-1]
    e = matvec(D, m) + c_q - c
    V = jnp.broadcast_to(quad_form(D, P) + symmetrize(S_q), P.shape)
    if shared_dynamics(chain):
        V = jnp.sum(V, axis=0, keepdims=True)
    return e, V


def expected_potential_log_prob(moments: Moments, potentials: Potentials, residuals=None):
    """``Σ_t mask_t E[log N(mean_t; H_t z_t, cov_t)]`` under a Gaussian with ``moments``.

    ``residuals``: the ``potential_residuals`` of
    :class:`~numpyro_lds.posterior.PosteriorStats` when ``moments`` are a posterior's
    (``None``: the residuals ``y − H m`` as they are).

    Args:
      moments: the Gaussian's :class:`~numpyro_lds.chains.Moments` (``means [T, k]``,
        ``covs [T, k, k]``; the cross-covariances are not used).
      potentials: the :class:`~numpyro_lds.potentials.Potentials` (``mean [T, d]``,
        ``cov [T, d, d]`` or ``[T, d]``, ``emission_matrix [T or 1, d, k]`` or None,
        ``mask [T]``).
      residuals: ``None``, or ``y_t − H_t m_t`` as ``[T, d]``
        (:class:`~numpyro_lds.posterior.PosteriorStats`' ``potential_residuals``).

    Returns:
      A scalar.
    """
    return jnp.sum(_node_energies(moments, potentials, residuals=residuals))


def expected_log_joint(
    moments: Moments, chain: GaussMarkovChain, potentials: Potentials, residuals=None
):
    """``E[log prior(z) + Σ_t log φ_t(z_t)]`` under a Gaussian with ``moments``.

    Affine in the expected sufficient statistics ``E[z_t], E[z_t z_tᵀ], E[z_{t+1} z_tᵀ]``.
    For the posterior's own moments, ``expected_log_joint − log Z = −H(q)``. Its gradient
    is written out (see ``_expected_log_density``). ``residuals`` as in
    :func:`expected_potential_log_prob`.

    Args:
      moments: the Gaussian's :class:`~numpyro_lds.chains.Moments` (``means [T, k]``,
        ``covs [T, k, k]``, ``cross_covs [T − 1, k, k]``).
      chain: the forward chain of the prior (``m_0 [k]``, ``P_0 [k, k]``, transitions
        ``[T − 1 or 1, ...]``).
      potentials: the :class:`~numpyro_lds.potentials.Potentials` ``φ_t``
        (``mean [T, d]``).
      residuals: ``None``, or ``y_t − H_t m_t`` as ``[T, d]``, as in
        :func:`expected_potential_log_prob`.

    Returns:
      A scalar.
    """
    return _expected_log_density(moments, chain, potentials, residuals, None, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expected_log_density(moments, chain, potentials, residuals, transition, initial):
    """The transition terms, plus the initial term if ``initial`` and the potentials' if given.

    Its VJP is :func:`expected_log_joint_along_grad` with the moments' gradient: every
    term is affine in the covariances and quadratic in the means, so each gradient is one
    product per step (for shared dynamics ``∂/∂C_t = Λ F`` and ``∂/∂P_t ∋ −Fᵀ Λ F/2`` are
    the same matrix at every step), where reverse mode would transpose and store every
    product of the value.
    """
    terms = {"initial": initial, "residuals": residuals, "transition": transition}
    return expected_log_joint_along(moments, None, 1.0, chain, potentials, **terms)


def _expected_log_density_fwd(moments, chain, potentials, residuals, transition, initial):
    value = _expected_log_density(moments, chain, potentials, residuals, transition, initial)
    return value, (moments, chain, potentials, residuals, transition)


def _expected_log_density_bwd(initial, res, g):
    moments, chain, potentials, residuals, transition = res
    terms = {"initial": initial, "residuals": residuals, "transition": transition}
    grads = expected_log_joint_along_grad(
        moments, None, 1.0, chain, potentials, moments_grad=True, **terms
    )
    # Every gradient of the value is g times its gradient at g = 1. The residuals only
    # give the value of y − H m, whose derivative is in the others' gradients.
    grads = jax.tree.map(lambda x: x if x.dtype == jax.dtypes.float0 else g * x, grads)
    zeros = jax.tree.map(jnp.zeros_like, (residuals, transition))
    return (*grads, *zeros)


_expected_log_density.defvjp(_expected_log_density_fwd, _expected_log_density_bwd)


def expected_log_joint_along(
    moments, tangent, weight, chain, potentials, initial=True, residuals=None, transition=None
):
    """``w · expected_log_joint(moments) + (its derivative along tangent)``, in one pass.

    Every term is ``E[log N(x; μ, Σ)] = −tr(Σ⁻¹ (V + e eᵀ))/2 − log det(2πΣ)/2`` with
    ``e = E[x] − μ`` and ``V = Cov(x)``, affine in ``V`` and quadratic in ``e``: the
    weighted value plus tangent is :func:`~numpyro_lds.linalg.gaussian_energy` of the
    scatter ``w V + V̇ + w e eᵀ + ė eᵀ + e ėᵀ``, whose gradient w.r.t. ``Σ`` is
    closed-form; the custom VJP's backward pass uses the gradient written out,
    :func:`expected_log_joint_along_grad`. ``tangent=None`` is the plain value (the
    weight is then 1); without ``initial`` or ``potentials`` those terms are left out.
    """
    weight = jnp.asarray(weight, moments.means.dtype)
    value = jnp.sum(_transition_energies(moments, chain, tangent, weight, transition))
    if initial:
        value = value + _initial_energy(moments, chain, tangent, weight)
    if potentials is not None:
        value = value + jnp.sum(_node_energies(moments, potentials, tangent, weight, residuals))
    return value


def expected_log_joint_along_grad(
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
    """Gradient of :func:`expected_log_joint_along`, written out.

    W.r.t. ``chain`` and ``potentials`` (``None``: left out), and with ``moments_grad`` (only
    without a tangent) w.r.t. the ``moments`` first.

    Written out (``docs/derivation.md``, section 8): for a term ``−tr(Λ S)/2 − w log
    det(2πΣ)/2`` with ``Λ = Σ⁻¹`` and scatter ``S = V_w + w e eᵀ + ė eᵀ + e ėᵀ``,
    ``∂/∂e = −r`` with ``r = Λ(w e + ė)``, ``∂/∂ė = −Λ e``, ``∂/∂V_w = −Λ/2`` and
    ``∂/∂Σ = (Λ S Λ − w Λ)/2``. Reverse mode of the same algebra transposes every small
    product into reductions that XLA's CPU backend hands to a library call one by one.
    ``e`` and ``V`` are linear in the moments: ``∂/∂E[x] = −Λ e``
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
    outer = outer_sum if shared_dynamics(chain) else outer_product
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
    y, R, H, mask = masked_potentials(potentials)
    P_w, e, e_dot, V = _node_residuals(moments, potentials, tangent, weight, residuals)
    on = mask.astype(dtype)
    if potentials.diagonal:
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
        g_H = outer_product(r, m) - lam_mat(matmul(H, P_w))
        if tangent is not None:
            g_H = g_H + outer_product(lam_vec(e), m_dot)
        g_H = sum_to_shape(on[:, None, None] * g_H, H.shape)
    g_potentials = Potentials(
        on[:, None] * -r, g_R, g_H, np.zeros(mask.shape, dtype=jax.dtypes.float0)
    )
    if not moments_grad:
        return g_chain, g_potentials
    # e = y − H m_t: ∂/∂m_t = Hᵀ r; V = H P_t Hᵀ: ∂/∂P_t = −Hᵀ Λ H/2.
    g_means = g_means + on[:, None] * emit_transpose(H, r)
    if H is None:  # Λ itself
        lam_H = lam_mat(jnp.eye(y.shape[-1], dtype=dtype)) if potentials.diagonal else lam
    else:
        lam_H = symmetrize(matmul(transpose(H), lam_mat(H)))
    g_covs = g_covs - 0.5 * on[:, None, None] * lam_H
    return Moments(g_means, g_covs, g_cross), g_chain, g_potentials


def _on_steps(x, start, num_steps, length=None):
    """``[T, ...]``: ``x`` on some steps, zeros elsewhere.

    ``x`` on steps ``start … start + length − 1`` (``length`` is ``T − 1`` unless given), zeros
    elsewhere. ``x`` has that time axis, or 1 when the same at every step: then it is selected by
    step, never padded or updated in place, so XLA fuses it into its consumer instead of storing a
    ``[T, ...]`` array of copies from the start.
    """
    length = num_steps - 1 if length is None else length
    if x.shape[0] == 1:
        t = jnp.arange(num_steps).reshape((num_steps,) + (1,) * (x.ndim - 1))
        return jnp.where((t >= start) & (t < start + length), x, 0)
    before = jnp.zeros((start,) + x.shape[1:], x.dtype)
    after = jnp.zeros((num_steps - start - length,) + x.shape[1:], x.dtype)
    return jnp.concatenate([before, x, after])


def _along(weight, x, x_dot):
    """``w x + ẋ`` (just ``x`` without a tangent): a statistic along a line of moments."""
    return x if x_dot is None else weight * x + x_dot


def _scatter(weight, e, e_dot, V, outer=None):
    """``V + w e eᵀ (+ ė eᵀ + e ėᵀ)``: the scatter of a residual ``e`` with tangent ``ė``.

    ``outer``: how ``a bᵀ`` is formed, per step by default;
    :func:`~numpyro_lds.linalg.outer_sum` sums it over the steps, for a ``V`` that is a sum (see
    ``_transition_scatter``).
    """
    outer = outer_product if outer is None else outer
    ee = outer(e, e)
    if e_dot is None:
        return V + ee
    cross = outer(e_dot, e)
    return V + weight * ee + cross + transpose(cross)


def _scatter_diagonal(weight, e, e_dot, diag_V):
    """The diagonal of ``_scatter``, from the diagonal of ``V``."""
    return diag_V + weight * e * e if e_dot is None else diag_V + (weight * e + 2 * e_dot) * e


def outer_product(a, b):
    return a[..., :, None] * b[..., None, :]


def _initial_residual(moments, chain, tangent, weight):
    """The initial-state term's ``e = m_1 − m_0``, ``ė`` and ``V_w`` (see below)."""
    e = moments.means[0] - chain.initial_mean
    e_dot = None if tangent is None else tangent.means[0]
    V = _along(weight, moments.covs[0], None if tangent is None else tangent.covs[0])
    return e, e_dot, V


def _transition_residuals(moments, chain, tangent, weight, transition=None):
    """The transition terms' ``F``, ``C_w``, ``F P_w`` (for the gradient) and ``e, ė, V_w``.

    ``e_t = m_{t+1} − F_t m_t − c_t``, ``ė_t = ṁ_{t+1} − F_t ṁ_t`` and
    ``V_t = P_{t+1} − C_t F_tᵀ − F_t C_tᵀ + F_t P_t F_tᵀ``, at ``w ω + ω̇`` along a tangent.

    With shared dynamics (:func:`shared_dynamics`) every term is affine in the sums over
    the steps, ``Σ V_t = Σ P_{t+1} − (Σ C_t) Fᵀ − F (Σ C_t)ᵀ + F (Σ P_t) Fᵀ``: ``C_w``,
    ``F P_w`` and ``V_w`` are then those sums (time axis 1). No ``k × k`` product is formed
    per step, and no ``[T, k, k]`` temporary (three per transition term otherwise).
    ``transition``: ``(e, V)`` from :func:`forward_transition_residuals`, whose values
    replace these (without a tangent only).
    """
    F, c, _ = transitions(chain)
    m = moments.means
    P = _along(weight, moments.covs, None if tangent is None else tangent.covs)
    C = _along(weight, moments.cross_covs, None if tangent is None else tangent.cross_covs)
    if shared_dynamics(chain):
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
    ``residuals`` (``[T, d]``, from :func:`~numpyro_lds.posterior.posterior_stats`)
    replace the value of ``y − H m``, which has lost its digits where a potential pins
    ``H m`` to ``y``; the derivative is still that of ``y − H m``.
    """
    y, R, H, _ = masked_potentials(potentials)
    P = _along(weight, moments.covs, None if tangent is None else tangent.covs)
    e = y - emit(H, moments.means)
    if residuals is not None:
        # The value of ``residuals`` exactly, the derivative of ``e``.
        e = residuals + (e - lax.stop_gradient(e))
    e_dot = None if tangent is None else -emit(H, tangent.means)
    V = _emission_diagonal(H, P) if potentials.diagonal else emit_cov(H, P)
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
    """``E[log N(z_1; m_0, P_0)]`` (weighted, plus its tangent: see expected_log_joint_along)."""
    scatter = _scatter(weight, *_initial_residual(moments, chain, tangent, weight))
    return gaussian_energy(scatter, weight, symmetrize(chain.initial_cov))


def _transition_energies(moments, chain, tangent=None, weight=1.0, transition=None):
    """``E[log N(z_{t+1}; F_t z_t + c_t, S_t)]`` per step (weighted, plus tangent)."""
    *_, e, e_dot, V = _transition_residuals(moments, chain, tangent, weight, transition)
    # The covariance keeps its time axis of 1 when shared: factored once.
    scatter, scatter_weight = _transition_scatter(chain, weight, e, e_dot, V)
    return gaussian_energy(scatter, scatter_weight, symmetrize(chain.transition_cov))


def _transition_scatter(chain, weight, e, e_dot, V):
    """The transition terms' scatter and its weight.

    Per step, of weight ``w``; with shared dynamics summed over the steps (as ``V`` is,
    ``_transition_residuals``), of weight ``(T − 1) w``: one energy for all steps, as
    every term is affine in the scatter.
    """
    if not shared_dynamics(chain):
        return _scatter(weight, e, e_dot, V), weight
    return _scatter(weight, e, e_dot, V, outer_sum), weight * e.shape[0]


def _node_energies(moments, potentials, tangent=None, weight=1.0, residuals=None):
    """``mask_t E[log N(mean_t; H_t z_t, cov_t)]`` per step (weighted, plus tangent)."""
    y, R, _, mask = masked_potentials(potentials)
    _, e, e_dot, V = _node_residuals(moments, potentials, tangent, weight, residuals)
    if potentials.diagonal:
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
    """``x / r``, whose derivative in ``r`` is ``−(x / r) / r``.

    Reverse mode's ``−x / r²`` overflows (float32) for ``r`` below about ``1e-19``, where ``x / r``
    is still ``O(1)``.
    """
    return x / r


@_over_variance.defjvp
def _over_variance_jvp(primals, tangents):
    x, r = primals
    x_dot, r_dot = tangents
    ratio = x / r
    return ratio, (x_dot - ratio * r_dot) / r
