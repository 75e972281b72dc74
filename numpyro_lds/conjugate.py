r"""Conjugate-computation pieces: potentials in square-root information form, and the
likelihood's expected gradient and curvature per time step.

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

where ``[·]_+`` is the positive semi-definite part taken by :func:`psd_root` and ``m_t``
the marginal mean (``docs/derivation.md``, section 9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "information_from_root",
    "likelihood_curvature",
    "natural_step",
    "psd_root",
    "root_from_information",
]


def _diag_embed(x):
    return x[..., :, None] * jnp.eye(x.shape[-1], dtype=x.dtype)


def psd_root(precision):
    """A square root ``G`` with ``GᵀG = [precision]_+`` for symmetric ``precision [..., k, k]``.

    The root is ``D^{1/2} Lᵀ`` from an ``LDLᵀ`` factorization in which a pivot that is not
    positive (a direction of zero or negative curvature) is set to zero together with its
    column: a modified Cholesky factorization, so the root of a positive semi-definite
    matrix is exact, zero rows included, and an indefinite one is projected onto the
    positive semi-definite cone along the factorization's order (Gill & Murray 1974).
    A pivot counts as zero below ``k · eps`` times the largest diagonal entry, the
    round-off of the elimination itself.

    Returns:
      ``(root, unit_lower, pivots)``: ``root [..., k, k]``, the unit lower-triangular ``L``
      and the clipped pivots ``D [..., k]``.
    """
    a = 0.5 * (precision + jnp.swapaxes(precision, -1, -2))
    k = a.shape[-1]
    eps = jnp.finfo(a.dtype).eps
    scale = jnp.max(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)), axis=-1)
    tol = k * eps * scale
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
    pivots = jnp.stack(d, -1)
    root = jnp.sqrt(pivots)[..., :, None] * jnp.swapaxes(unit_lower, -1, -2)
    return root, unit_lower, pivots


def information_from_root(obs, root):
    """Natural parameters ``(h, Λ) = (Gᵀy, GᵀG)`` of potentials ``(y, G)``.

    ``root`` is ``[..., k, k]``, or ``[..., k]`` for a diagonal ``G``.
    """
    if root.ndim == obs.ndim:
        return root * obs, _diag_embed(root**2)
    h = jnp.einsum("...ij,...i->...j", root, obs)
    return h, jnp.einsum("...ij,...ik->...jk", root, root)


def root_from_information(information, precision, diagonal=False):
    """Potentials ``(y, G)`` with ``GᵀG = [Λ]_+`` and ``Gᵀy = h``.

    ``h`` is taken on the range of ``[Λ]_+``: a component of ``h`` along a direction of
    zero precision has no Gaussian factor to belong to and is dropped. With ``diagonal``,
    ``Λ``'s diagonal alone is used (negative entries clipped to zero) and ``G`` is
    ``[..., k]``.
    """
    if diagonal:
        lam = jnp.diagonal(precision, axis1=-2, axis2=-1)
        keep = lam > 0
        root = jnp.sqrt(jnp.where(keep, lam, 0.0))
        return jnp.where(keep, information / jnp.where(keep, root, 1.0), 0.0), root
    root, unit_lower, pivots = psd_root(precision)
    k = precision.shape[-1]
    # Gᵀ y = L D^{1/2} y = h: forward substitution with the unit lower L, then D^{-1/2}.
    w = []
    for i in range(k):
        w.append(information[..., i] - sum((unit_lower[..., i, p] * w[p] for p in range(i)), 0.0))
    w = jnp.stack(w, -1)
    keep = pivots > 0
    obs = jnp.where(keep, w / jnp.sqrt(jnp.where(keep, pivots, 1.0)), 0.0)
    return obs, root


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


def natural_step(obs, root, mean, grad, hessian, step_size):
    """One damped conjugate-computation step of potentials ``(y, G)`` in place of ``(y, G)``.

    Args:
      obs: ``y [..., T, k]``.
      root: ``G [..., T, k, k]``, or ``[..., T, k]`` (diagonal).
      mean: the marginal means ``m [..., T, k]`` where ``grad`` and ``hessian`` were taken.
      grad: ``E_q[∇f] [..., T, k]``.
      hessian: ``E_q[∇²f] [..., T, k, k]``.
      step_size: ``β`` in ``(0, 1]``.

    Returns:
      ``(obs, root, clipped)``: the new potentials and, per step, whether the curvature
      had a direction of negative precision that was set to zero.
    """
    diagonal = root.ndim == obs.ndim
    minus_h = -hessian
    if diagonal:
        lam = jnp.diagonal(minus_h, axis1=-2, axis2=-1)
        clipped = jnp.any(lam < 0, axis=-1)
        lam_lik = _diag_embed(jnp.maximum(lam, 0.0))
    else:
        lik_root, _, _ = psd_root(minus_h)
        lam_lik = jnp.einsum("...ij,...ik->...jk", lik_root, lik_root)
        scale = jnp.max(jnp.abs(jnp.diagonal(minus_h, axis1=-2, axis2=-1)), axis=-1)
        resid = jnp.max(jnp.abs(lam_lik - minus_h), axis=(-2, -1))
        clipped = resid > 1e3 * jnp.finfo(obs.dtype).eps * jnp.maximum(scale, 1.0)
    h_lik = grad + jnp.einsum("...ij,...j->...i", lam_lik, mean)
    h_old, lam_old = information_from_root(obs, root)
    h_new = (1 - step_size) * h_old + step_size * h_lik
    lam_new = (1 - step_size) * lam_old + step_size * lam_lik
    new_obs, new_root = root_from_information(h_new, lam_new, diagonal=diagonal)
    return new_obs, new_root, clipped
