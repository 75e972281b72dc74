"""The KL's public core: one sequence's Terms A–C, each term in one function.

The batched ``kl_terms`` is checked term by term against the dense Gaussian in
``test_dense_reference.py``; here the per-sequence functions it is built from are checked
against that same dense reference and against each other.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reference as ref
from helpers import dense, random_posterior, random_prior
from numpyro_lds import kl_terms
from numpyro_lds.kl import sequence_kl_terms, term_a, term_b

RTOL = 1e-8


def _pair(seed):
    rng = np.random.default_rng(seed)
    prior, other = random_prior(rng, 2, 6), random_prior(rng, 2, 6)
    return {
        "prior": prior,
        "other prior": other,
        "posterior": random_posterior(rng, prior, d=1),
        "other posterior": random_posterior(rng, other, diag=True, mask=True),
    }


@pytest.mark.parametrize(
    "q_name, p_name", list(itertools.product(["prior", "posterior"], repeat=2))
)
def test_sequence_kl_terms_is_the_batched_kl_of_one_sequence(q_name, p_name):
    dists = _pair(0)
    q, p = dists[q_name], dists["other " + p_name]
    (q_args, _), (p_args, _) = q.sequence_args(), p.sequence_args()
    one = sequence_kl_terms(q_args, p_args, q.num_steps, "sequential")
    batched = kl_terms(q, p)
    for a, b in zip(one, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL)


def test_term_a_and_term_b_equal_their_dense_formulas():
    q = _pair(1)["posterior"]
    p = _pair(1)["other prior"]
    m, cov = np.asarray(q.mean), np.asarray(q.marginal_covariance)
    first_q = (m[0], cov[0])
    first_p = (np.asarray(p.initial_mean), np.asarray(p.initial_cov))
    np.testing.assert_allclose(term_a(first_q, first_p), ref.mvn_kl(*first_q, *first_p), rtol=RTOL)
    # Term B = H(q(z_1)) − H(q(z_{1:T})): the joint entropy of the dense Gaussian.
    (_, Cq, _) = dense(q)[()]
    expected_log_q = -ref.mvn_entropy(Cq)
    np.testing.assert_allclose(
        term_b(cov[0], expected_log_q),
        ref.mvn_entropy(Cq[:2, :2]) - ref.mvn_entropy(Cq),
        rtol=RTOL,
    )
    np.testing.assert_allclose(kl_terms(q, p).term_b, term_b(cov[0], expected_log_q), rtol=RTOL)
