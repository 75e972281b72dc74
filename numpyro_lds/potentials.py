"""Gaussian potentials ``φ_t(z_t) = N(mean_t; H_t z_t, cov_t)`` on the states of one sequence.

They are the guide's free parameters, an encoder's outputs, or observations. Their
covariances come in one of two forms, told apart by rank (:attr:`Potentials.diagonal`):
full (``cov [T, d, d]``) or diagonal (``cov [T, d]``, the variances), and every function
that takes potentials serves both.

Each public core function that takes potentials accepts them masked or not: it passes
them through :func:`masked_potentials` where it reads them, which sets neutral values at
masked steps. Masking is idempotent and costs one elementwise ``select`` per array,
nothing next to the recursions, so no function depends on its caller having masked.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from numpyro_lds.linalg import (
    matmul,
    matvec,
    quad_form,
    symmetrize,
    transpose,
)

__all__ = ["Potentials", "is_diagonal", "masked_potentials"]


class Potentials(NamedTuple):
    """Gaussian potentials ``N(mean_t; H_t z_t, cov_t)`` (time axis of ``H`` is ``T`` or 1).

    ``cov`` is ``[T, d, d]``, or ``[T, d]`` for diagonal covariances (their variances),
    which are then never stored, factorized or differentiated as ``d × d`` matrices.
    ``emission_matrix=None`` is the identity (``d = k``): no product with it is formed
    (XLA does not fold a product with an identity matrix; each was a dot call per step at
    ``k > 8``), and its gradient is ``None``.
    """

    #: ``[T, d]``, the potentials' means ``y_t``.
    mean: jnp.ndarray
    #: ``[T, d, d]``, the covariances ``R_t``, or ``[T, d]``, the variances of diagonal ones.
    cov: jnp.ndarray
    #: ``[T or 1, d, k]``, the emission matrices ``H_t`` (1 when shared by every step), or
    #: None for the identity (``d = k``).
    emission_matrix: jnp.ndarray | None
    #: ``[T]`` bool, False where there is no potential at that step.
    mask: jnp.ndarray

    @property
    def diagonal(self) -> bool:
        """Their form: True for variances (``cov [T, d]``), False for covariances."""
        return is_diagonal(self.cov, self.mean)


def is_diagonal(R, y):
    """Whether the potentials' covariances ``R`` are given by their diagonals (``[.., d]``).

    Args:
      R: the covariances ``[.., d, d]`` or variances ``[.., d]``.
      y: the potentials' means ``[.., d]``, with the same leading axes.

    Returns:
      True where ``R`` holds variances (the rank of ``y``), False for covariances.
    """
    return R.ndim == y.ndim


def masked_potentials(potentials: Potentials):
    """Neutral values at masked steps, so no NaN from unused inputs reaches a gradient.

    ``H`` keeps its time axis of 1 when shared; diagonal covariances stay diagonal.

    Args:
      potentials: :class:`Potentials` of one sequence.

    Returns:
      :class:`Potentials` of the same form: the means 0 at masked steps; the covariances
      symmetrized and the identity at masked steps, or the variances 1 there; the
      emission matrices and the mask as given.
    """
    mask = potentials.mask
    if potentials.diagonal:
        R = jnp.where(mask[:, None], potentials.cov, 1.0)
    else:
        eye = jnp.eye(potentials.mean.shape[-1], dtype=potentials.mean.dtype)
        R = jnp.where(mask[:, None, None], symmetrize(potentials.cov), eye)
    mean = jnp.where(mask[:, None], potentials.mean, 0.0)
    return Potentials(mean, R, potentials.emission_matrix, mask)


def emit(H, x):
    """``H x`` for states ``x [.., k]`` (``x`` itself where ``H`` is ``None``, the identity)."""
    return x if H is None else matvec(H, x)


def emit_transpose(H, v):
    """``Hᵀ v`` for ``v [.., d]``."""
    return v if H is None else matvec(transpose(H), v)


def emit_left(H, X):
    """``H X`` for ``X [.., k, n]``."""
    return X if H is None else matmul(H, X)


def emit_cov(H, P):
    """``H P Hᵀ`` (symmetrized)."""
    return symmetrize(P) if H is None else quad_form(H, P)
