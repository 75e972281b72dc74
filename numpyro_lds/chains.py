r"""Gauss–Markov chains over one sequence: moments, log-density, paths, entropy.

A chain over states ``z_{1:T}`` (``[T, k]``) is stored as :class:`GaussMarkovChain`,

.. math::

    z_1 \sim \mathcal N(\mathrm{initial\_mean}, \mathrm{initial\_cov}), \qquad
    z_{t+1} \mid z_t \sim \mathcal N(F_t z_t + c_t, S_t),

with ``F, c, S`` the ``transition_matrix``, ``transition_offset`` and ``transition_cov``
(time axis of length ``T - 1``, or 1 when shared over time). The LDS prior is such a chain
running forward in time; the smoothed posterior is such a chain running *backward* in
time (Särkkä 2013, Thm 8.2: ``z_t | z_{t+1}, x_{1:T} ~ N(G_t z_{t+1} + h_t, L_t)``), so one
set of functions serves both. The symbols are tabled in :mod:`numpyro_lds.kalman`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from numpyro_lds.linalg import (
    cholesky,
    matmul,
    matvec,
    mvn_entropy,
    mvn_log_prob,
    quad_form,
    symmetrize,
    transpose,
)
from numpyro_lds.schedules import (
    along_time,
    cat_first,
    cat_last,
    prefix_scan,
    require_schedule,
    scan_steps,
)

__all__ = [
    "GaussMarkovChain",
    "Moments",
    "chain_entropy",
    "chain_log_prob",
    "chain_moments",
    "chain_sample",
    "reverse_moments",
]


class GaussMarkovChain(NamedTuple):
    """A Gaussian Markov chain over ``[T, k]`` states (time axis ``n`` is ``T - 1`` or 1).

    Each transition array has its own time axis: ``T − 1`` (entry ``t`` is the step
    ``t → t + 1``) or 1 when shared by every step. A chain running backward in time (the
    RTS smoother's, :func:`~numpyro_lds.kalman.smoother_chain`) has the same fields, with
    ``z_T`` as its initial state.
    """

    #: ``[k]``, the mean of ``z_1`` (``m_0``).
    initial_mean: jnp.ndarray
    #: ``[k, k]``, the covariance of ``z_1`` (``P_0``).
    initial_cov: jnp.ndarray
    #: ``[T − 1 or 1, k, k]``, the transition matrices ``F_t``.
    transition_matrix: jnp.ndarray
    #: ``[T − 1 or 1, k]``, the transition offsets ``c_t``.
    transition_offset: jnp.ndarray
    #: ``[T − 1 or 1, k, k]``, the transition noise covariances ``S_t``.
    transition_cov: jnp.ndarray


class Moments(NamedTuple):
    """Marginal moments of a chain in forward time."""

    #: ``[T, k]``, the means ``m_t = E[z_t]``.
    means: jnp.ndarray
    #: ``[T, k, k]``, the covariances ``Σ_t = Cov(z_t)``.
    covs: jnp.ndarray
    #: ``[T − 1, k, k]``, the lag-one cross-covariances ``C_t = Cov(z_{t+1}, z_t)``.
    cross_covs: jnp.ndarray


def transitions(chain):
    """``F, c, S`` with their time axes as stored: ``T − 1``, or 1 when shared.

    Shared ones are not broadcast along time: every product broadcasts them, and
    :func:`scan_steps` closes over them.
    """
    # Covariances enter only through their symmetric part, here as in every Cholesky
    # factor, so that gradients are the same whichever way they are computed.
    return chain.transition_matrix, chain.transition_offset, symmetrize(chain.transition_cov)


def transitions_along_time(chain, num_steps):
    """``F, c, S`` broadcast to ``T − 1`` steps: the associative elements need each step."""
    return tuple(along_time(x, num_steps - 1) for x in transitions(chain))


def shared_dynamics(chain):
    """Whether ``F`` and ``S`` are the same at every step (stored with a time axis of 1)."""
    return chain.transition_matrix.shape[0] == 1 and chain.transition_cov.shape[0] == 1


def time_reversed(kernels: GaussMarkovChain) -> GaussMarkovChain:
    """A backward chain's kernels, indexed by forward time, as a chain in reversed time.

    Each transition array of ``kernels`` (as :func:`~numpyro_lds.kalman.rts_kernels` gives
    them) is flipped; shared ones are unchanged.
    """
    return GaussMarkovChain(
        kernels.initial_mean, kernels.initial_cov, *(jnp.flip(x, 0) for x in transitions(kernels))
    )


def chain_moments(
    chain: GaussMarkovChain, num_steps: int, schedule="sequential", reverse=False
) -> Moments:
    """Marginal means, covariances and lag-one cross-covariances of a chain.

    ``reverse=True``: the chain runs backward in time (the RTS smoother's kernels): its
    initial state is ``z_T`` and its transition ``t`` gives ``z_t`` from ``z_{t+1}``, each
    array indexed by forward time. The moments come in forward time either way
    (``cross_covs[t] = Cov(z_{t+1}, z_t)``); sequentially the scan itself runs backward,
    so no array is flipped (on the parallel schedule the chain is).

    Args:
      chain: the chain; with ``reverse=True`` its initial state is ``z_T`` and its
        transition arrays (``[T − 1 or 1, ...]``) are indexed by forward time, as
        :func:`~numpyro_lds.kalman.rts_kernels` gives them.
      num_steps: ``T``.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.
      reverse: whether ``chain`` runs backward in time.

    Returns:
      :class:`Moments`: ``means [T, k]``, ``covs [T, k, k]`` and
      ``cross_covs [T − 1, k, k]``, in forward time.
    """
    require_schedule(schedule)
    if reverse and schedule == "parallel":
        return reverse_moments(chain_moments(time_reversed(chain), num_steps, schedule))
    m0, P0 = chain.initial_mean, symmetrize(chain.initial_cov)
    F, c, S = transitions(chain)
    if schedule != "parallel":

        def step(carry, x):
            moments = _apply_affine(_Affine(*x), *carry)
            return moments, moments

        _, (ms, Ps) = scan_steps(step, (m0, P0), (F, c, S), num_steps - 1, reverse=reverse)
        if reverse:
            ms, Ps = cat_last((ms, Ps), (m0, P0))
        else:
            ms, Ps = cat_first((m0, P0), (ms, Ps))
    else:
        # z_t = (e_t ∘ … ∘ e_1)(·), e_1 = N(m0, P0) and e_t = N(F_{t-1} z + c_{t-1}, S_{t-1}).
        first = _Affine(jnp.zeros_like(P0), m0, P0)
        steps = _Affine(*transitions_along_time(chain, num_steps))
        marginals = prefix_scan(_compose_affine, cat_first(first, steps), schedule)
        ms, Ps = marginals.c, marginals.S
    # Cov(z_{t+1}, z_t) = F_t P_t; backward, Cov(z_t, z_{t+1}) = G_t P_{t+1}, transposed.
    cross = matmul(Ps[1:], transpose(F)) if reverse else matmul(F, Ps[:-1])
    return Moments(ms, Ps, cross)


def reverse_moments(moments: Moments) -> Moments:
    """Moments of the time-reversed chain (``Cov(z_t, z_{t+1})`` becomes the cross term).

    Args:
      moments: :class:`Moments` of ``z_1, …, z_T`` (``means [T, k]``, ``covs [T, k, k]``,
        ``cross_covs [T − 1, k, k]``).

    Returns:
      :class:`Moments`: those of ``z_T, …, z_1``, of the same shapes, every array flipped
      along time and ``cross_covs`` transposed, so that its entries are
      ``Cov(z_t, z_{t+1})``, the last step first.
    """
    return Moments(
        jnp.flip(moments.means, 0),
        jnp.flip(moments.covs, 0),
        jnp.flip(transpose(moments.cross_covs), 0),
    )


def chain_log_prob(chain: GaussMarkovChain, z):
    """``log p(z)`` for ``z`` of shape ``[..., T, k]``; broadcasts over leading dims.

    Args:
      chain: the chain.
      z: paths ``[..., T, k]``, in the chain's own time order (flipped for a chain
        running backward in time).

    Returns:
      ``[...]``, one log-density per path.
    """
    lp = mvn_log_prob(z[..., 0, :], chain.initial_mean, cholesky(chain.initial_cov))
    pred = matvec(chain.transition_matrix, z[..., :-1, :]) + chain.transition_offset
    lp_steps = mvn_log_prob(z[..., 1:, :], pred, cholesky(chain.transition_cov))
    return lp + jnp.sum(lp_steps, -1)


def chain_sample(chain: GaussMarkovChain, eps, schedule="sequential"):
    """Reparametrized draw: maps standard normal ``eps [T, k]`` to a chain path ``[T, k]``.

    ``z_1 = m_0 + chol(P_0) ε_1`` and ``z_{t+1} = F_t z_t + c_t + chol(S_t) ε_{t+1}``, with
    ``chol`` the lower Cholesky factor.

    Args:
      chain: the chain, running forward in time.
      eps: standard normals ``[T, k]``.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      The path ``z [T, k]``.
    """
    F, c, _ = transitions(chain)
    z0 = chain.initial_mean + matvec(cholesky(chain.initial_cov), eps[0])
    return affine_recursion(z0, F, c + matvec(cholesky(chain.transition_cov), eps[1:]), schedule)


def affine_recursion(x0, F, c, schedule):
    """The path ``x_1 = x0``, ``x_{t+1} = F_t x_t + c_t``, by ``schedule``.

    ``c`` has ``T − 1`` steps; ``F`` too, or 1 when shared.
    """
    require_schedule(schedule)
    num_steps = c.shape[0] + 1
    if schedule == "parallel":
        first = _Affine(jnp.zeros(F.shape[1:], F.dtype), x0, None)
        steps = _Affine(along_time(F, num_steps - 1), c, None)
        return prefix_scan(_compose_affine, cat_first(first, steps), schedule).c

    def step(x, inputs):
        x = _apply_affine(_Affine(*inputs, None), x)
        return x, x

    _, xs = scan_steps(step, x0, (F, c), num_steps - 1)
    return cat_first(x0, xs)


def chain_entropy(chain: GaussMarkovChain, num_steps: int):
    """Joint entropy ``H(z_1) + Σ_t H(z_{t+1} | z_t)``.

    It depends on the covariances alone: ``initial_cov`` and ``transition_cov``.

    Args:
      chain: the chain.
      num_steps: ``T``.

    Returns:
      A scalar.
    """
    h_steps = mvn_entropy(cholesky(chain.transition_cov))
    return mvn_entropy(cholesky(chain.initial_cov)) + jnp.sum(along_time(h_steps, num_steps - 1))


class _Affine(NamedTuple):
    """``z ↦ N(F z + c, S)`` (``S`` None: deterministic), an associative-scan element."""

    F: jnp.ndarray
    c: jnp.ndarray
    S: jnp.ndarray | None


def _apply_affine(e, mean, cov=None):
    """The law ``N(mean, cov)`` (``cov`` None: the point ``mean``) pushed through ``e``.

    The one step of every affine recursion: scanned step by step, or inside
    :func:`_compose_affine` as the associative element's combination.
    """
    new_mean = matvec(e.F, mean) + e.c
    return new_mean if cov is None else (new_mean, quad_form(e.F, cov) + e.S)


def _compose_affine(e1, e2):
    """``e2 ∘ e1``: first ``e1``, then ``e2``."""
    if e1.S is None:
        return _Affine(matmul(e2.F, e1.F), _apply_affine(e2, e1.c), None)
    return _Affine(matmul(e2.F, e1.F), *_apply_affine(e2, e1.c, e1.S))
