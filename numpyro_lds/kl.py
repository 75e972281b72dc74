r"""The closed-form KL divergence between two Gauss–Markov chains (Terms A–C).

For ``q`` and ``p`` chains over ``z_{1:T}``,

.. math::

    \mathrm{KL}(q \| p) = \underbrace{\mathrm{KL}(q(z_1) \| p(z_1))}_{\text{Term A}}
      + \underbrace{\sum_{t \ge 2} \mathbb E_q[\log q(z_t \mid z_{t-1})]}_{\text{Term B}}
      - \underbrace{\sum_{t \ge 2} \mathbb E_q[\log p(z_t \mid z_{t-1})]}_{\text{Term C}}.

The derivation, with every expectation written out, is ``docs/derivation.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from numpyro.distributions.kl import kl_divergence

from numpyro_lds._batch import jit_batch_map
from numpyro_lds.chains import (
    GaussMarkovChain,
    Moments,
    chain_entropy,
    chain_moments,
    reverse_moments,
)
from numpyro_lds.distributions import LDSPosterior, LinearGaussianStateSpace
from numpyro_lds.expectations import (
    expected_log_joint,
    expected_transition_log_prob,
    forward_transition_residuals,
)
from numpyro_lds.kalman import condition_on_potentials
from numpyro_lds.linalg import cholesky, expected_mvn_log_prob, mvn_entropy, mvn_kl
from numpyro_lds.posterior import posterior_stats
from numpyro_lds.schedules import resolve_schedule

__all__ = [
    "KLTerms",
    "kl_terms",
    "sequence_kl_terms",
    "term_a",
    "term_b",
    "term_c",
    "term_c_against_posterior",
]


class KLTerms(NamedTuple):
    """The three terms of ``KL(q ‖ p) = term_a + term_b − term_c``, each ``batch_shape``.

    Attributes:
      term_a: ``KL(q(z_1) ‖ p(z_1))``.
      term_b: ``Σ_{t≥2} E_q[log q(z_t | z_{t-1})]``, the negative conditional entropy of q.
      term_c: ``Σ_{t≥2} E_q[log p(z_t | z_{t-1})]``.
    """

    term_a: jnp.ndarray
    term_b: jnp.ndarray
    term_c: jnp.ndarray

    @property
    def kl(self):
        """``term_a + term_b − term_c``."""
        return self.term_a + self.term_b - self.term_c


def term_a(q_first: tuple, p_first: tuple):
    """Term A, ``KL(q(z_1) ‖ p(z_1))`` (derivation, section 4).

    ``½ [tr(P_0⁻¹ Σ_1) + (m_0 − m_1)ᵀ P_0⁻¹ (m_0 − m_1) − k + log det P_0 − log det Σ_1]``,
    from Cholesky factors.

    Args:
      q_first: ``(m_1 [k], Σ_1 [k, k])``, q's marginal at ``t = 1``.
      p_first: ``(m_0 [k], P_0 [k, k])``, p's marginal at ``t = 1``.

    Returns:
      A scalar.
    """
    (m_1, cov_1), (m_0, cov_0) = q_first, p_first
    return mvn_kl(m_1, cholesky(cov_1), m_0, cholesky(cov_0))


def term_b(q_first_cov, expected_log_q):
    """Term B, the negative conditional entropy of ``q`` (derivation, section 5).

    ``Σ_{t≥2} E_q[log q(z_t | z_{t-1})] = H(N(m_1, Σ_1)) + E_q[log q(z_{1:T})]``.

    Args:
      q_first_cov: ``Σ_1 [k, k]``, q's covariance at ``t = 1``.
      expected_log_q: ``E_q[log q(z_{1:T})] = −H_q(z_{1:T})``, a scalar: minus the
        entropy of a forward chain, or for a posterior
        ``E_q[log prior(z) + Σ_t log φ_t(z_t)] − log Z`` (:func:`sequence_kl_terms`).

    Returns:
      A scalar.
    """
    return mvn_entropy(cholesky(q_first_cov)) + expected_log_q


def term_c(q_moments: Moments, p_chain: GaussMarkovChain, transition=None):
    """Term C, ``Σ_{t≥2} E_q[log p(z_t | z_{t-1})]``, for a forward chain ``p``.

    Derivation, section 6: ``Σ_t −½ [k log 2π + log det Q_t + r_tᵀ Q_t⁻¹ r_t + tr(Q_t⁻¹ V_t)]``.

    Args:
      q_moments: q's moments in forward time (``means [T, k]``, ``covs [T, k, k]``,
        ``cross_covs [T − 1, k, k]``).
      p_chain: p's forward chain (``transition_*`` are ``A_t, b_t, Q_t``).
      transition: ``(r [T − 1, k], V)`` from
        :func:`~numpyro_lds.expectations.forward_transition_residuals` when ``q`` is a
        forward chain too (section 11.6: no cancellation); ``None``: from the moments.

    Returns:
      A scalar.
    """
    return expected_transition_log_prob(q_moments, p_chain, transition)


def term_c_against_posterior(q_moments: Moments, p_backward: GaussMarkovChain, p_first):
    """Term C when ``p`` is a posterior, through its backward factorization (section 6).

    ``E_q[log p(z_{1:T})] − E_q[log p(z_1)]``.

    Args:
      q_moments: q's moments in forward time.
      p_backward: p's RTS backward chain (in reversed time: its initial state is ``z_T``).
      p_first: ``(m [k], P [k, k])``, p's marginal at ``t = 1``.

    Returns:
      A scalar.
    """
    q_reversed = reverse_moments(q_moments)
    log_p_joint = expected_mvn_log_prob(
        q_reversed.means[0],
        q_reversed.covs[0],
        p_backward.initial_mean,
        cholesky(p_backward.initial_cov),
    ) + expected_transition_log_prob(q_reversed, p_backward)
    log_p_first = expected_mvn_log_prob(
        q_moments.means[0], q_moments.covs[0], p_first[0], cholesky(p_first[1])
    )
    return log_p_joint - log_p_first


def sequence_kl_terms(q: tuple, p: tuple, num_steps: int, schedule: str) -> KLTerms:
    """Terms A–C of ``KL(q ‖ p)`` for one sequence.

    Args:
      q: ``(chain, potentials)``: a :class:`~numpyro_lds.chains.GaussMarkovChain` running
        forward in time (an LDS prior) and ``None``, or that chain and the
        :class:`~numpyro_lds.potentials.Potentials` it is conditioned on (a posterior).
      p: the same for ``p``.
      num_steps: ``T``.
      schedule: one of :data:`~numpyro_lds.schedules.SCHEDULES`.

    Returns:
      :class:`KLTerms` of scalars.
    """
    (q_chain, q_potentials), (p_chain, p_potentials) = q, p
    if q_potentials is None:
        q_moments = chain_moments(q_chain, num_steps, schedule)
        q_log_q = -chain_entropy(q_chain, num_steps)
    else:
        stats = posterior_stats(q_chain, q_potentials, schedule)
        q_moments = stats.moments
        q_log_q = (
            expected_log_joint(q_moments, q_chain, q_potentials, stats.potential_residuals)
            - stats.log_normalizer
        )
    q_first = (q_moments.means[0], q_moments.covs[0])

    if p_potentials is None:
        p_first = (p_chain.initial_mean, p_chain.initial_cov)
        # Both forward: Term C's residuals from q's own transitions (no cancellation).
        transition = (
            forward_transition_residuals(q_chain, q_moments, p_chain)
            if q_potentials is None
            else None
        )
        c = term_c(q_moments, p_chain, transition)
    else:
        p_backward = condition_on_potentials(p_chain, p_potentials, schedule).backward_chain
        # p's marginal at t = 1 is the end of its backward recursion.
        p_moments = chain_moments(p_backward, num_steps, schedule)
        p_first = (p_moments.means[-1], p_moments.covs[-1])
        c = term_c_against_posterior(q_moments, p_backward, p_first)
    return KLTerms(term_a(q_first, p_first), term_b(q_first[1], q_log_q), c)


def kl_terms(q, p) -> KLTerms:
    """Terms A–C of the closed-form ``KL(q ‖ p)`` between two LDS chains.

    ``q`` and ``p`` are each a :class:`~numpyro_lds.LinearGaussianStateSpace` or an
    :class:`~numpyro_lds.LDSPosterior`, with any (different) dynamics. The result has the
    broadcast batch shape of ``q`` and ``p``.

    Args:
      q: the distribution the expectations are taken under.
      p: the reference distribution.

    Returns:
      :class:`KLTerms`; ``KLTerms.kl`` is the divergence.

    Raises:
      ValueError: if the event shapes differ or the batch shapes do not broadcast.
      TypeError: if either argument is not one of the two classes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from numpyro_lds import LinearGaussianStateSpace, kl_terms
      >>> I = jnp.eye(1)
      >>> p = LinearGaussianStateSpace(jnp.zeros(1), I, I, I, num_steps=4)
      >>> q = LinearGaussianStateSpace(jnp.ones(1), I, I, I, num_steps=4)
      >>> float(kl_terms(q, p).kl)  # only z_1 differs: KL = 1/2
      0.5
    """
    for name, d in (("q", q), ("p", p)):
        if not isinstance(d, (LinearGaussianStateSpace, LDSPosterior)):
            raise TypeError(
                f"{name} must be a LinearGaussianStateSpace or an LDSPosterior, "
                f"got {type(d).__name__}"
            )
    if q.event_shape != p.event_shape:
        raise ValueError(
            "q and p must have the same event shape (T, k), "
            f"got {q.event_shape} and {p.event_shape}"
        )
    try:
        batch_shape = lax.broadcast_shapes(q.batch_shape, p.batch_shape)
    except ValueError:
        raise ValueError(
            f"batch shapes of q {q.batch_shape} and p {p.batch_shape} do not broadcast"
        ) from None
    q_args, q_nd = q.sequence_args()
    p_args, p_nd = p.sequence_args()
    return jit_batch_map(
        sequence_kl_terms,
        batch_shape,
        (q_args, p_args),
        (q_nd, p_nd),
        q.event_shape[0],
        resolve_schedule(q.schedule if q.schedule is not None else p.schedule),
    )


def _conditions(q, p):
    """Whether ``q`` is ``p`` conditioned on potentials: ``q.prior`` is ``p`` itself.

    Identity, not equality of values: it is decided while tracing, at no cost, and never
    wrongly. A prior rebuilt from the same parameters (as the model's prior is, beside the
    guide's) takes the general formula, which gives the same value.
    """
    return isinstance(q, LDSPosterior) and q.prior is p


def _kl(q, p):
    """``KL(q ‖ p)``: Terms A–C, or for ``p = q.prior`` the identity ``Σ E_q log φ − log Z``.

    Against its own prior, ``log q = log p + Σ_t log φ_t − log Z`` makes every transition
    term cancel: :meth:`~numpyro_lds.LDSPosterior.kl_to_prior` computes only the potentials'
    expected log-densities (Terms A–C, whose gradients are written out too, cost a little
    more: ``docs/performance.md``).
    """
    if _conditions(q, p):
        return q.kl_to_prior()
    return kl_terms(q, p).kl


for _q in (LinearGaussianStateSpace, LDSPosterior):
    for _p in (LinearGaussianStateSpace, LDSPosterior):
        kl_divergence.register(_q, _p)(_kl)
