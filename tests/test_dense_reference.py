"""Every numeric result against the dense float64 Gaussian (tests/reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.kl import kl_divergence

import reference as ref
from helpers import dense, make_case, random_posterior, random_prior
from numpyro_lds import LDSPosterior, kl_terms

RTOL = 1e-8
ATOL = 1e-10

# (id, k, T, prior batch, time-varying, potential kwargs)
CASES = [
    ("k1_T1", 1, 1, (), True, {}),
    ("k1_T6", 1, 6, (), True, {"diag": True}),
    ("T2", 2, 2, (), True, {}),
    ("shared_dynamics", 2, 5, (), False, {}),
    ("batched", 3, 4, (2,), True, {"batch": (2,)}),
    ("broadcast", 2, 4, (3, 1), True, {"batch": (4,), "diag": True}),
    ("masked", 2, 6, (), True, {"mask": True}),
    ("masked_batched", 2, 5, (3,), False, {"mask": True, "batch": (3,)}),
    ("d_lt_k", 3, 4, (), True, {"d": 1}),
    ("d_gt_k", 2, 4, (), True, {"d": 3, "diag": True}),
    ("shared_emission", 2, 4, (), True, {"d": 2, "emission": "shared"}),
    ("time_emission", 2, 4, (2,), True, {"emission": "time", "mask": True}),
    # shared dynamics and a shared H with diagonal potentials: Terms B and C from sums over
    # time, the potentials' terms from diag(H P Hᵀ) by one contraction
    (
        "shared_all_diag",
        3,
        5,
        (),
        False,
        {"d": 2, "diag": True, "emission": "shared", "mask": True},
    ),
    # k > 8: LAPACK; batched, so on CPU the sequences run one at a time (_batch.batch_map).
    ("k9_batched", 9, 4, (2,), False, {"batch": (2,), "mask": True}),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def _both(case):
    prior, post = make_case(case)
    return [prior, post]


def test_moments(case):
    for d in _both(case):
        T, k = d.event_shape
        mean, cov = np.asarray(d.mean), np.asarray(d.marginal_covariance)
        cross, var = np.asarray(d.cross_covariance), np.asarray(d.variance)
        assert mean.shape == d.batch_shape + (T, k)
        assert cov.shape == d.batch_shape + (T, k, k)
        assert cross.shape == d.batch_shape + (T - 1, k, k)
        for idx, (m, c, _) in dense(d).items():
            ms, cs, xs = ref.blocks(m, c, T, k)
            np.testing.assert_allclose(mean[idx], ms, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(cov[idx], cs, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(cross[idx], xs, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(var[idx], np.diagonal(cs, 0, -2, -1), rtol=RTOL, atol=ATOL)


def test_log_prob(case):
    rng = np.random.default_rng(1)
    for d in _both(case):
        z = rng.normal(size=(3,) + d.batch_shape + d.event_shape)
        lp = np.asarray(d.log_prob(z))
        assert lp.shape == (3,) + d.batch_shape
        for idx, (m, c, _) in dense(d).items():
            for s in range(3):
                expected = ref.mvn_log_prob(z[(s,) + idx].ravel(), m, c)
                np.testing.assert_allclose(lp[(s,) + idx], expected, rtol=RTOL)


def test_entropy_and_log_normalizer(case):
    prior, post = make_case(case)
    for d in (prior, post):
        h = np.asarray(d.entropy())
        for idx, (_, c, _) in dense(d).items():
            np.testing.assert_allclose(h[idx], ref.mvn_entropy(c), rtol=RTOL)
    log_z = np.asarray(post.log_normalizer)
    assert log_z.shape == post.batch_shape
    for idx, (_, _, lz) in dense(post).items():
        np.testing.assert_allclose(log_z[idx], lz, rtol=RTOL, atol=ATOL)


def _dense_mvn(d):
    T, k = d.event_shape
    items = dense(d)
    mean = np.stack([v[0] for v in items.values()]).reshape(d.batch_shape + (T * k,))
    cov = np.stack([v[1] for v in items.values()]).reshape(d.batch_shape + (T * k, T * k))
    return dist.MultivariateNormal(jnp.asarray(mean), covariance_matrix=jnp.asarray(cov))


@pytest.mark.parametrize("pair", ["prior_prior", "post_prior", "prior_post", "post_post"])
def test_kl_all_pairs_match_dense(case, pair):
    prior_a, post_a = make_case(case, seed=0)
    prior_b, post_b = make_case(case, seed=1)  # different dynamics on the two sides
    q = {"prior": prior_a, "post": post_a}[pair.split("_")[0]]
    p = {"prior": prior_b, "post": post_b}[pair.split("_")[1]]
    kl = np.asarray(kl_divergence(q, p))
    expected = np.asarray(kl_divergence(_dense_mvn(q), _dense_mvn(p)))
    assert kl.shape == jnp.broadcast_shapes(q.batch_shape, p.batch_shape)
    np.testing.assert_allclose(kl, expected, rtol=RTOL)


def _broadcast_index(idx, batch_shape):
    """The element of a (right-aligned, broadcast) batch that ``idx`` of a larger batch sees."""
    idx = idx[len(idx) - len(batch_shape) :]
    return tuple(i if s > 1 else 0 for i, s in zip(idx, batch_shape, strict=True))


def test_kl_terms_match_dense(case):
    """Each of Terms A–C against its dense definition, q and p with different dynamics."""
    _, q = make_case(case, seed=0)
    p, _ = make_case(case, seed=1)
    T, k = q.event_shape
    terms = kl_terms(q, p)
    for idx, (mq, Cq, _) in dense(q).items():
        mp, Cp, _ = dense(p)[_broadcast_index(idx, p.batch_shape)]
        s1 = slice(0, k)
        term_a = ref.mvn_kl(mq[s1], Cq[s1, s1], mp[s1], Cp[s1, s1])
        term_b = ref.mvn_entropy(Cq[s1, s1]) - ref.mvn_entropy(Cq)
        term_c = ref.expected_log_prob(mq, Cq, mp, Cp) - ref.expected_log_prob(
            mq[s1], Cq[s1, s1], mp[s1], Cp[s1, s1]
        )
        np.testing.assert_allclose(terms.term_a[idx], term_a, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(terms.term_b[idx], term_b, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(terms.term_c[idx], term_c, rtol=RTOL, atol=ATOL)


def test_fast_path_equals_general_formula(case):
    prior, post = make_case(case)
    general = kl_terms(post, prior).kl  # Terms A-C, checked against dense above
    np.testing.assert_allclose(post.kl_to_prior(), general, rtol=RTOL)
    # post.prior is prior: kl_divergence takes the fast path; a prior rebuilt from the
    # same parameters is another object and takes the general formula.
    assert post.prior is prior
    np.testing.assert_allclose(kl_divergence(post, prior), general, rtol=RTOL)
    rebuilt = jax.tree.map(jnp.array, prior)  # copies of every parameter
    assert rebuilt is not prior
    np.testing.assert_allclose(kl_divergence(post, rebuilt), general, rtol=RTOL)


def test_kl_of_a_distribution_with_itself_is_zero(case):
    for d in _both(case):
        np.testing.assert_allclose(kl_divergence(d, d), 0.0, atol=1e-10)


def test_posterior_without_potentials_is_the_prior():
    rng = np.random.default_rng(3)
    prior = random_prior(rng, 2, 5)
    post = LDSPosterior(
        prior, np.zeros((5, 2)), potential_var=np.ones((5, 2)), mask=np.zeros(5, bool)
    )
    np.testing.assert_allclose(post.mean, prior.mean, rtol=RTOL)
    np.testing.assert_allclose(post.cross_covariance, prior.cross_covariance, rtol=RTOL)
    np.testing.assert_allclose(post.log_normalizer, 0.0)
    np.testing.assert_allclose(kl_divergence(post, prior), 0.0, atol=1e-10)


def test_term_c_nine_term_expansion_of_the_derivation():
    """docs/derivation.md §6: the nine expectations, summed, give Term C."""
    rng = np.random.default_rng(7)
    T, k = 5, 3
    q = random_posterior(rng, random_prior(rng, k, T), mask=True)
    p = random_prior(rng, k, T)
    ((mq, Cq, _),) = dense(q).values()
    m, S, C = ref.blocks(mq, Cq, T, k)
    total = 0.0
    for t in range(1, T):
        A, b, Q = p.transition_matrix[t - 1], p.transition_offset[t - 1], p.transition_cov[t - 1]
        A, b, Qi = np.asarray(A), np.asarray(b), np.linalg.inv(np.asarray(Q))
        c = C[t - 1]  # Cov(z_t, z_{t-1})
        terms = [
            np.trace(Qi @ (S[t] + np.outer(m[t], m[t]))),  # ①
            -np.trace(Qi @ A @ (c.T + np.outer(m[t - 1], m[t]))),  # ②
            -m[t] @ Qi @ b,  # ③
            -np.trace(A.T @ Qi @ (c + np.outer(m[t], m[t - 1]))),  # ④
            np.trace(A.T @ Qi @ A @ (S[t - 1] + np.outer(m[t - 1], m[t - 1]))),  # ⑤
            m[t - 1] @ A.T @ Qi @ b,  # ⑥
            -b @ Qi @ m[t],  # ⑦
            b @ Qi @ A @ m[t - 1],  # ⑧
            b @ Qi @ b,  # ⑨
        ]
        logdet = np.linalg.slogdet(np.asarray(Q))[1]
        total += -0.5 * (k * np.log(2 * np.pi) + logdet + sum(terms))
    np.testing.assert_allclose(kl_terms(q, p).term_c, total, rtol=RTOL)
