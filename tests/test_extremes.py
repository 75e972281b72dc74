"""Potentials many orders of magnitude more (or less) precise than the prior's prediction.

Every variance of the potentials, relative to the prediction, anywhere in ``1e-30 … 1e30``
along each axis (diagonal variances, the guide's square-root form ``H = diag(g)``, ``R =
I``, and full covariances scaled as a whole): the KL on both paths, the entropy and the
gradients in float32 against the dense reference in information form
(:func:`reference.kl_to_prior_information`) in float64, and float64 against it at
``1e-9``. The derivation is section 11 of ``docs/derivation.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from helpers import random_prior, spd
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace, kl_terms

K, T = 2, 4
SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _cast(prior, dtype, schedule=None):
    def f(x):
        return jnp.asarray(x, dtype)

    return LinearGaussianStateSpace(
        f(prior.initial_mean),
        f(prior.initial_cov),
        f(prior.transition_matrix),
        f(prior.transition_cov),
        f(prior.transition_offset),
        num_steps=T,
        schedule=schedule,
    )


def _problem(seed, form, exponents, mask):
    """A prior, another prior and the potentials: ``(kwargs, y, R, H)`` in dense form."""
    rng = np.random.default_rng(seed)
    prior, other = random_prior(rng, K, T), random_prior(rng, K, T)
    y = 3.0 * rng.normal(size=(T, K))
    var = rng.uniform(0.2, 2.0, size=(T, K)) * 10.0**exponents
    eye = np.broadcast_to(np.eye(K), (T, K, K))
    if form == "variance":
        kwargs = {"potential_var": var}
        R, H = var[..., None] * np.eye(K), eye
    elif form == "root":  # AutoLDSGuide's free potentials: exp(-½‖g y − g z‖²)
        g = 1.0 / np.sqrt(var)
        y, H, R = g * y, g[..., None] * np.eye(K), eye
        kwargs = {"potential_var": np.ones((T, K)), "emission_matrix": H}
    else:  # a full covariance, scaled as a whole at each step
        R = spd(rng, (T,), K, 0.7) * (10.0 ** exponents[:, :1])[..., None]
        kwargs, H = {"potential_cov": R}, eye
    kwargs["mask"] = mask
    return prior, other, y, kwargs, (R, H)


def _posterior(prior, y, kwargs, dtype):
    cast = {k: v if k == "mask" else jnp.asarray(v, dtype) for k, v in kwargs.items()}
    return LDSPosterior(_cast(prior, dtype), jnp.asarray(y, dtype), **cast)


def _dense(prior):
    return [
        np.asarray(x)
        for x in (
            prior.initial_mean,
            prior.initial_cov,
            prior.transition_matrix,
            prior.transition_offset,
            prior.transition_cov,
        )
    ]


def _dense_kl(prior, y, R, H, mask, against=None):
    """``KL(q ‖ against)`` (the prior by default) and ``H(q)``, dense, in float64."""
    other = None if against is None else _dense(against)
    kl, entropy = ref.kl_to_prior_information(*_dense(prior), y, R, H, mask, against=other)
    return float(kl), float(entropy)


@st.composite
def extremes(draw):
    exponents = np.array(
        draw(
            st.lists(
                st.one_of(st.just(0.0), st.floats(-30.0, 30.0)), min_size=T * K, max_size=T * K
            )
        )
    ).reshape(T, K)
    mask = np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T)))
    mask[draw(st.integers(0, T - 1))] = True
    return (
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(["variance", "root", "covariance"])),
        exponents,
        mask,
    )


@SETTINGS
@given(extremes())
def test_kl_entropy_and_gradients_at_extreme_precisions(problem):
    seed, form, exponents, mask = problem
    prior, other, y, kwargs, (R, H) = _problem(seed, form, exponents, mask)
    kl_ref, entropy_ref = _dense_kl(prior, y, R, H, mask)
    other_ref, _ = _dense_kl(prior, y, R, H, mask, against=other)
    for dtype, rtol in ((jnp.float64, 1e-9), (jnp.float32, 1e-3)):
        q = _posterior(prior, y, kwargs, dtype)
        kl, kl_general = float(q.kl_to_prior()), float(kl_terms(q, _cast(prior, dtype)).kl)
        for value in (kl, kl_general):
            assert abs(value - kl_ref) <= rtol * max(1.0, abs(kl_ref)), (dtype, value, kl_ref)
            assert value >= -1e-3
        assert abs(float(q.entropy()) - entropy_ref) <= rtol * max(1.0, abs(entropy_ref))
        # Against another prior: Terms A-C with different dynamics.
        kl_other = float(kl_terms(q, _cast(other, dtype)).kl)
        assert abs(kl_other - other_ref) <= rtol * max(1.0, abs(other_ref)), (dtype, kl_other)
        key = next(k for k in kwargs if k != "mask")

        def loss(value, mean, key=key, dtype=dtype):
            posterior = _posterior(prior, mean, {**kwargs, key: value}, dtype)
            return posterior.kl_to_prior() + kl_terms(posterior, _cast(other, dtype)).kl

        grads = jax.grad(loss, (0, 1))(jnp.asarray(kwargs[key], dtype), jnp.asarray(y, dtype))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("form", ["variance", "root"])
@pytest.mark.parametrize("exponent", [-30, -16, 9])
def test_gradients_at_one_extreme_potential_match_the_dense_reference(form, exponent):
    """One potential variance at ``10^exponent`` (the issue's case: ``k = 2``, ``T = 4``).

    The gradient w.r.t. the potentials' means and variances in float64 and float32
    against the dense reference's, which ``jax.grad`` differentiates in float64.
    """
    exponents = np.zeros((T, K))
    exponents[1, 1] = exponent
    mask = np.ones(T, bool)
    prior, _, y, kwargs, _ = _problem(7, form, exponents, mask)
    key = "potential_var" if form == "variance" else "emission_matrix"

    def dense(value, mean):
        if form == "variance":
            R, H = value[..., None] * jnp.eye(K), jnp.broadcast_to(jnp.eye(K), (T, K, K))
        else:
            R, H = jnp.broadcast_to(jnp.eye(K), (T, K, K)), value
        return ref.kl_to_prior_information(*_dense(prior), mean, R, H, mask)[0]

    want = jax.grad(dense, (0, 1))(jnp.asarray(kwargs[key]), jnp.asarray(y))
    # float64 at 1e-6: the reference's own gradient passes through the inverse of a
    # precision graded over up to 30 orders of magnitude (about 1e-8 of its scale there).
    # In the root form, d/dH_t = 2 H_t ∂KL/∂Λ_t + ...: the reference knows ∂KL/∂Λ_t to
    # float64's absolute rounding only, which H_t's scale multiplies (an entry whose exact
    # value is 4e-15 came out as -0.25 at H_t = 7.5e14; ours follows its 1/g³ law from
    # g = 1e2 to 1e12): that bound is added, row by row of H.
    reference_error = [np.zeros_like(w) for w in want]
    if form == "root":
        scale = np.max(np.abs(kwargs[key]), axis=-1, keepdims=True)
        reference_error[0] = 64 * np.finfo(np.float64).eps * scale * np.ones_like(want[0])
    for dtype, rtol in ((jnp.float64, 1e-6), (jnp.float32, 1e-3)):

        def loss(value, mean, dtype=dtype):
            return _posterior(prior, mean, {**kwargs, key: value}, dtype).kl_to_prior()

        have = jax.grad(loss, (0, 1))(jnp.asarray(kwargs[key], dtype), jnp.asarray(y, dtype))
        for h, w, err in zip(have, want, reference_error, strict=True):
            h, w = np.asarray(h, np.float64), np.asarray(w)
            bound = rtol * np.maximum(1.0, np.abs(w)) + err
            np.testing.assert_array_less(np.abs(h - w), bound)


@pytest.mark.parametrize("schedule", ["sequential", "blocked", "parallel"])
@pytest.mark.parametrize("variance", [1e-18, 1e-30])
def test_the_reported_case_is_right_in_float32_on_every_schedule(variance, schedule):
    """The report: ``k = 2``, ``T = 4``, variances 0.5 and one 1e-18 (float32 KL was -2718.5)."""
    rng = np.random.default_rng(0)
    prior = random_prior(rng, K, T)
    y = rng.normal(size=(T, K))
    v = np.full((T, K), 0.5)
    v[1, 1] = variance
    mask = np.ones(T, bool)
    R, H = v[..., None] * np.eye(K), np.broadcast_to(np.eye(K), (T, K, K))
    kl_ref, entropy_ref = _dense_kl(prior, y, R, H, mask)
    prior32 = _cast(prior, jnp.float32, schedule)
    q = LDSPosterior(
        prior32, jnp.asarray(y, jnp.float32), potential_var=jnp.asarray(v, jnp.float32)
    )
    assert abs(float(q.kl_to_prior()) - kl_ref) <= 1e-3 * kl_ref
    assert abs(float(kl_terms(q, prior32).kl) - kl_ref) <= 1e-3 * kl_ref
    assert abs(float(q.entropy()) - entropy_ref) <= 1e-3 * abs(entropy_ref)


@pytest.mark.parametrize("process_var, damping", [(1e-4, 0.999), (1e-6, 0.9999), (1e-8, 1.0)])
def test_kl_between_near_unit_root_priors_in_float32(process_var, damping):
    """Prior against prior, joint condition number up to 1.7e10 (``T = 50``).

    Term C's residual covariance from the moments, ``P_{t+1} − C Fᵀ − F Cᵀ + F P Fᵀ``, is a
    difference of terms ``1e10`` times its size here; from ``q``'s own transitions it has
    no cancellation. Float32 within 1e-3 of the dense float64 KL; a prior against a copy of
    itself gives 0.
    """
    steps = 50
    rot = np.array([[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]])
    q_args = (np.ones(K), np.eye(K), damping * rot, process_var * np.eye(K), np.zeros(K))
    shear = np.array([[1.0, 1e-3], [0.0, 1.0]])
    p_args = (np.ones(K), 1.1 * np.eye(K), damping * rot @ shear, 1.3 * process_var * np.eye(K))
    p_args = p_args + (np.zeros(K),)
    joint = [
        ref.prior_joint(m0, P0, A[None], b[None], Q[None], steps)
        for m0, P0, A, Q, b in (q_args, p_args)
    ]
    want = ref.mvn_kl(*joint[0], *joint[1])

    def prior(args):
        m0, P0, A, Q, b = (jnp.asarray(x, jnp.float32) for x in args)
        return LinearGaussianStateSpace(m0, P0, A, Q, b, num_steps=steps)

    have = float(kl_terms(prior(q_args), prior(p_args)).kl)
    assert abs(have - want) <= 1e-3 * max(1.0, want), (have, want)
    assert float(kl_terms(prior(q_args), prior(q_args)).kl) == pytest.approx(0.0, abs=1e-3)
