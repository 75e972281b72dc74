"""The closed-form KL divergence between two Gauss–Markov chains (Terms A–C).

For ``q`` and ``p`` chains over ``z_{1:T}``,

.. math::

    \\mathrm{KL}(q \\| p) = \\underbrace{\\mathrm{KL}(q(z_1) \\| p(z_1))}_{\\text{Term A}}
      + \\underbrace{\\sum_{t \\ge 2} \\mathbb E_q[\\log q(z_t \\mid z_{t-1})]}_{\\text{Term B}}
      - \\underbrace{\\sum_{t \\ge 2} \\mathbb E_q[\\log p(z_t \\mid z_{t-1})]}_{\\text{Term C}}.

The derivation, with every expectation written out, is ``docs/derivation.md``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from numpyro.distributions.kl import kl_divergence

from numpyro_lds._batch import jit_batch_map
from numpyro_lds.chains import chain_moments, reverse_moments
from numpyro_lds.distributions import LDSPosterior, LinearGaussianStateSpace, _ChainDistribution
from numpyro_lds.expectations import expected_transition_log_prob, forward_transition_residuals
from numpyro_lds.linalg import cholesky, expected_mvn_log_prob, mvn_entropy, mvn_kl
from numpyro_lds.schedules import resolve_schedule

__all__ = ["KLTerms", "kl_terms"]


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


_KL_FNS: dict = {}


def _single_kl_terms_for(q_cls, p_cls):
    """One stable function per class pair, so compiled KLs are reused."""
    key = (q_cls, p_cls)
    if key not in _KL_FNS:
        _KL_FNS[key] = functools.partial(_single_kl_terms, q_cls, p_cls)
    return _KL_FNS[key]


def _single_kl_terms(q_cls, p_cls, q_args, p_args, num_steps, schedule) -> KLTerms:
    """Terms A–C for one sequence. ``*_cls`` say how each chain is represented."""
    q_moments, q_log_q = q_cls._single_moments_and_log_q(q_args, num_steps, schedule)
    chol_q1 = cholesky(q_moments.covs[0])

    p_chain = p_cls._single_chain(p_args, num_steps, schedule)
    if p_cls._chain_reversed:
        # p runs backward: its marginal at t = 1 is the end of its own recursion.
        p_rev = chain_moments(p_chain, num_steps, schedule)
        p1_mean, p1_cov = p_rev.means[-1], p_rev.covs[-1]
    else:
        p1_mean, p1_cov = p_chain.initial_mean, p_chain.initial_cov
    chol_p1 = cholesky(p1_cov)

    term_a = mvn_kl(q_moments.means[0], chol_q1, p1_mean, chol_p1)
    # Σ_{t≥2} E_q log q(z_t | z_{t-1}) = E_q log q(z_{1:T}) + H_q(z_1).
    term_b = mvn_entropy(chol_q1) + q_log_q
    if p_cls._chain_reversed:
        # Σ_{t≥2} E_q log p(z_t | z_{t-1}) = E_q log p(z_{1:T}) − E_q log p(z_1), with
        # log p(z_{1:T}) evaluated through p's backward factorization.
        q_rev = reverse_moments(q_moments)
        log_p_joint = expected_mvn_log_prob(
            q_rev.means[0], q_rev.covs[0], p_chain.initial_mean, cholesky(p_chain.initial_cov)
        ) + expected_transition_log_prob(q_rev, p_chain)
        log_p1 = expected_mvn_log_prob(q_moments.means[0], q_moments.covs[0], p1_mean, chol_p1)
        term_c = log_p_joint - log_p1
    elif q_cls._chain_reversed:
        term_c = expected_transition_log_prob(q_moments, p_chain)
    else:
        # Both run forward: Term C's residuals from q's own transitions (no cancellation).
        q_chain = q_cls._single_chain(q_args, num_steps, schedule)
        transition = forward_transition_residuals(q_chain, q_moments, p_chain)
        term_c = expected_transition_log_prob(q_moments, p_chain, transition)
    return KLTerms(term_a, term_b, term_c)


def kl_terms(q: _ChainDistribution, p: _ChainDistribution) -> KLTerms:
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
        if not isinstance(d, _ChainDistribution):
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
    q_args, q_nd = q._core_args()
    p_args, p_nd = p._core_args()
    return jit_batch_map(
        _single_kl_terms_for(type(q), type(p)),
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
    expected log-densities (Terms A–C, whose gradients are written out too, cost about 1.1×).
    """
    if _conditions(q, p):
        return q.kl_to_prior()
    return kl_terms(q, p).kl


for _q in (LinearGaussianStateSpace, LDSPosterior):
    for _p in (LinearGaussianStateSpace, LDSPosterior):
        kl_divergence.register(_q, _p)(_kl)
