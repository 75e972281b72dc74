r"""Conjugate-computation steps: the pieces they are made of.

Potentials in square-root information form, and the likelihood's expected gradient and
curvature per time step.

A free potential of :class:`~numpyro_lds.AutoLDSGuide` is an unnormalized Gaussian factor

.. math::

    \phi_t(z_t) = \exp\!\big(-\tfrac12 \lVert y_t - G_t z_t \rVert^2\big)
    \propto \exp\!\big(h_t^\top z_t - \tfrac12 z_t^\top \Lambda_t z_t\big),
    \qquad \Lambda_t = G_t^\top G_t,\quad h_t = G_t^\top y_t,

with ``y = potential_obs`` and ``G = potential_root``: a pseudo-observation of ``G_t z_t``
with unit noise. ``(h_t, Λ_t)`` are the potential's natural parameters; any positive
semi-definite ``Λ_t`` is held, zero precision (a step or a direction the likelihood says
nothing about) included, and the Kalman filter only ever factorizes ``G P Gᵀ + I``.

The conjugate-computation step (Khan & Lin 2017; Chang et al. 2020) sets the natural
parameters from the gradient of the expected log-likelihood with respect to the marginals'
mean parameters: with ``g_t = E_q[∇_{z_t} f]`` and ``H_t = E_q[∇²_{z_t} f]``,

.. math::

    \Lambda_t \leftarrow (1-\beta)\Lambda_t + \beta\,[-H_t]_+,\qquad
    h_t \leftarrow (1-\beta) h_t + \beta\,(g_t + [-H_t]_+\, m_t),

where ``[·]_+`` is the positive semi-definite part taken by :func:`modified_ldl` and ``m_t``
the marginal mean (``docs/derivation.md``, section 10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "information_from_potential",
    "likelihood_curvature",
    "modified_ldl",
    "natural_step",
    "potential_from_information",
    "potential_root",
]


def _diag_embed(x):
    return x[..., :, None] * jnp.eye(x.shape[-1], dtype=x.dtype)


def modified_ldl(precision):
    """``LDLᵀ`` of symmetric ``precision [..., k, k]`` with non-positive pivots set to zero.

    A pivot that is not positive (a direction of zero or negative curvature) is set to zero
    together with the rest of its column of ``L``: a modified Cholesky factorization
    (Gill & Murray 1974). ``L D Lᵀ`` is the matrix itself where it is positive
    semi-definite, zero-precision directions included, and a positive semi-definite
    projection of it (along the factorization's order) where it is not. A pivot counts as
    zero below ``k · eps`` times the largest diagonal entry, the round-off of the
    elimination itself. Elementwise code: no LAPACK call.

    Returns:
      ``(unit_lower, pivots)``: ``L [..., k, k]`` unit lower-triangular and ``D [..., k] ≥ 0``.
    """
    a = 0.5 * (precision + jnp.swapaxes(precision, -1, -2))
    k = a.shape[-1]
    tol = k * jnp.finfo(a.dtype).eps * jnp.max(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)), -1)
    L = [[None] * k for _ in range(k)]
    d = [None] * k
    for j in range(k):
        pivot = a[..., j, j] - sum((L[j][p] ** 2 * d[p] for p in range(j)), 0.0)
        keep = pivot > tol
        d[j] = jnp.where(keep, pivot, 0.0)
        safe = jnp.where(keep, pivot, 1.0)
        L[j][j] = jnp.ones_like(pivot)
        for i in range(j + 1, k):
            off = a[..., i, j] - sum((L[i][p] * L[j][p] * d[p] for p in range(j)), 0.0)
            L[i][j] = jnp.where(keep, off / safe, 0.0)
    zero = jnp.zeros_like(a[..., 0, 0])
    unit_lower = jnp.stack(
        [jnp.stack([L[i][j] if j <= i else zero for j in range(k)], -1) for i in range(k)], -2
    )
    return unit_lower, jnp.stack(d, -1)


def potential_root(root_diag, root_upper=None):
    """``G = diag(root_diag) (I + U)``, ``U`` the strict upper triangle of ``root_upper``.

    Without ``root_upper`` the root is diagonal and returned as its diagonal, ``root_diag``.
    """
    if root_upper is None:
        return root_diag
    k = root_diag.shape[-1]
    return root_diag[..., :, None] * (jnp.eye(k, dtype=root_diag.dtype) + jnp.triu(root_upper, 1))


def information_from_potential(obs, root_diag, root_upper=None):
    """Natural parameters ``(h, Λ) = (Gᵀy, GᵀG)`` of a potential ``(y, G)``."""
    root = potential_root(root_diag, root_upper)
    if root_upper is None:
        return root * obs, _diag_embed(root**2)
    h = jnp.einsum("...ij,...i->...j", root, obs)
    return h, jnp.einsum("...ij,...ik->...jk", root, root)


def potential_from_information(information, precision, diagonal=False):
    """``(obs, root_diag, root_upper)`` of natural parameters ``(h, Λ)``, ``Λ`` projected.

    ``[Λ]_+ = L D Lᵀ`` (:func:`modified_ldl`) gives ``G = D^{1/2} Lᵀ``, so ``root_diag =
    D^{1/2}`` and ``root_upper = Lᵀ``, and ``y = D^{-1/2} L^{-1} h`` solves ``Gᵀy = h``; ``h``
    is taken on the range of ``[Λ]_+`` (``y`` is zero where a pivot is): a component along a
    direction of zero precision has no Gaussian factor to belong to. With ``diagonal``,
    ``Λ``'s diagonal alone is used (negative entries set to zero) and ``root_upper`` is None.
    """
    if diagonal:
        pivots = jnp.maximum(jnp.diagonal(precision, axis1=-2, axis2=-1), 0.0)
        w, unit_lower = information, None
    else:
        unit_lower, pivots = modified_ldl(precision)
        k = precision.shape[-1]
        w = []  # L w = h: forward substitution with the unit lower L
        for i in range(k):
            w.append(
                information[..., i] - sum((unit_lower[..., i, p] * w[p] for p in range(i)), 0.0)
            )
        w = jnp.stack(w, -1)
    keep = pivots > 0
    root_diag = jnp.sqrt(pivots)
    obs = jnp.where(keep, w / jnp.where(keep, root_diag, 1.0), 0.0)
    root_upper = None if unit_lower is None else jnp.swapaxes(unit_lower, -1, -2)
    return obs, root_diag, root_upper


def likelihood_curvature(fn, values):
    """Gradient and per-step Hessian blocks of ``fn`` at ``values``.

    ``fn`` maps ``{site: z [..., T, k]}`` to a scalar whose Hessian is block diagonal over
    the time steps (and sequences) of each site: every factor involves one ``z_t`` of a
    site. The ``k`` columns of every block come from ``k`` Hessian-vector products, each in
    the direction ``e_j`` at every step at once, so the cost does not grow with ``T``.

    Returns:
      ``(grads, hessians)``: ``{site: [..., T, k]}`` and ``{site: [..., T, k, k]}``.
    """
    grad_fn = jax.grad(fn)
    grads = grad_fn(values)
    hessians = {}
    for name, z in values.items():
        k = z.shape[-1]
        eye = jnp.eye(k, dtype=z.dtype)

        def column(e, name=name, z=z):
            direction = {n: jnp.zeros_like(v) for n, v in values.items()}
            direction[name] = jnp.broadcast_to(e, z.shape)
            return jax.jvp(grad_fn, (values,), (direction,))[1][name]

        cols = jax.vmap(column)(eye)  # [k (j), ..., T, k (i)]: d²f / dz_i dz_j
        hess = jnp.moveaxis(cols, 0, -1)
        hessians[name] = 0.5 * (hess + jnp.swapaxes(hess, -1, -2))
    return grads, hessians


def natural_step(information, precision, mean, grad, hessian, step_size, diagonal=False):
    """One damped conjugate-computation step of a potential's natural parameters.

    Args:
      information: ``h [..., T, k]``.
      precision: ``Λ [..., T, k, k]``.
      mean: the marginal means ``m [..., T, k]`` where ``grad`` and ``hessian`` were taken.
      grad: ``E_q[∇f] [..., T, k]``.
      hessian: ``E_q[∇²f] [..., T, k, k]``.
      step_size: ``β`` in ``(0, 1]``.
      diagonal: keep ``Λ`` diagonal (the likelihood's curvature is replaced by its diagonal,
        the natural gradient within diagonal potentials).

    Returns:
      ``(h, Λ, clipped)``: the new natural parameters and, per step, whether the curvature
      had a direction of negative precision that was set to zero precision.
    """
    minus_h = -hessian
    if diagonal:
        lam = jnp.diagonal(minus_h, axis1=-2, axis2=-1)
        clipped = jnp.any(lam < 0, axis=-1)
        lam_lik = _diag_embed(jnp.maximum(lam, 0.0))
    else:
        unit_lower, pivots = modified_ldl(minus_h)
        lam_lik = jnp.einsum("...ij,...j,...kj->...ik", unit_lower, pivots, unit_lower)
        scale = jnp.max(jnp.abs(jnp.diagonal(minus_h, axis1=-2, axis2=-1)), -1)
        tol = 100 * minus_h.shape[-1] * jnp.finfo(minus_h.dtype).eps * scale
        # the projection moved the curvature by more than round-off: negative curvature
        clipped = jnp.max(jnp.abs(lam_lik - minus_h), axis=(-2, -1)) > tol
    h_lik = grad + jnp.einsum("...ij,...j->...i", lam_lik, mean)
    h_new = (1 - step_size) * information + step_size * h_lik
    lam_new = (1 - step_size) * precision + step_size * lam_lik
    return h_new, lam_new, clipped
