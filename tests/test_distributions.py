"""NumPyro's distribution contract, table-driven over cases of both classes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.batch_util import promote_batch_shape, vmap_over

from helpers import random_posterior, random_prior
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace


def _prior_case(batch=(), tv=True, k=2, T=4):
    return lambda rng: random_prior(rng, k, T, batch, time_varying=tv)


def _posterior_case(batch=(), prior_batch=(), **kw):
    return lambda rng: random_posterior(
        rng, random_prior(rng, 2, 4, prior_batch), batch=batch, **kw
    )


CASES = [
    pytest.param(_prior_case(), id="prior-unbatched"),
    pytest.param(_prior_case(batch=(3,)), id="prior-batched"),
    pytest.param(_prior_case(tv=False), id="prior-shared-dynamics"),
    pytest.param(_prior_case(batch=(2, 1), tv=False), id="prior-broadcast"),
    pytest.param(_posterior_case(), id="posterior-unbatched"),
    pytest.param(_posterior_case(batch=(3,), prior_batch=(3,)), id="posterior-batched"),
    pytest.param(
        _posterior_case(batch=(2, 3), prior_batch=(3,), diag=True), id="posterior-broadcast"
    ),
    pytest.param(_posterior_case(mask=True, emission="time"), id="posterior-masked-time-varying"),
]


@pytest.fixture(params=CASES)
def d(request):
    return request.param(np.random.default_rng(0))


@pytest.mark.parametrize("sample_shape", [(), (2,), (2, 3)])
def test_sample_and_log_prob_shapes(d, sample_shape):
    z = d.sample(jax.random.key(0), sample_shape)
    assert z.shape == sample_shape + d.batch_shape + d.event_shape
    assert d.log_prob(z).shape == sample_shape + d.batch_shape
    assert d.mean.shape == d.variance.shape == d.batch_shape + d.event_shape
    assert d.entropy().shape == d.batch_shape


def test_infer_shapes(d):
    if isinstance(d, LDSPosterior):
        shapes = {
            "prior": d.prior.shape(),
            "potential_mean": d.potential_mean.shape,
        }
        for name, attr in [
            ("potential_cov", "potential_cov"),
            ("potential_var", "potential_var"),
            ("emission_matrix", "emission_matrix"),
            ("mask", "potential_mask"),
        ]:
            if getattr(d, attr) is not None:
                shapes[name] = getattr(d, attr).shape
    else:
        shapes = {f: getattr(d, f).shape for f in d.pytree_data_fields}
        shapes["num_steps"] = d.num_steps
    assert type(d).infer_shapes(**shapes) == (d.batch_shape, d.event_shape)


def test_jit_matches_eager(d):
    z = d.sample(jax.random.key(1))
    out = jax.jit(lambda d, z: (d.log_prob(z), d.mean, d.entropy(), d.sample(jax.random.key(2))))(
        d, z
    )
    eager = (d.log_prob(z), d.mean, d.entropy(), d.sample(jax.random.key(2)))
    for a, b in zip(out, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_a_parameter(d):
    """vmap a constructor over a leading axis of one parameter (NumPyro's vmap_over protocol)."""
    if isinstance(d, LDSPosterior):
        name, field, kw = "potential_mean", d.potential_mean, {"potential_mean": 0}

        def make(x):
            return LDSPosterior(
                d.prior,
                x,
                d.potential_cov,
                potential_var=d.potential_var,
                emission_matrix=d.emission_matrix,
                mask=d.potential_mask,
            )
    else:
        name, field, kw = "initial_mean", d.initial_mean, {"initial_mean": 0}

        def make(x):
            return LinearGaussianStateSpace(
                x,
                d.initial_cov,
                d.transition_matrix,
                d.transition_cov,
                d.transition_offset,
                num_steps=d.num_steps,
            )

    stacked = jnp.stack([field, field + 1.0])
    vmapped = promote_batch_shape(jax.vmap(make, out_axes=vmap_over(d, **kw))(stacked))
    assert vmapped.batch_shape == (2,) + d.batch_shape, name
    z = d.sample(jax.random.key(3))
    lp = vmapped.log_prob(z)
    np.testing.assert_allclose(lp[0], d.log_prob(z), rtol=1e-10)
    np.testing.assert_allclose(lp[1], make(field + 1.0).log_prob(z), rtol=1e-10)


def test_expand(d):
    e = d.expand((5,) + d.batch_shape)
    assert e.batch_shape == (5,) + d.batch_shape
    z = e.sample(jax.random.key(0))
    assert z.shape == (5,) + d.batch_shape + d.event_shape
    np.testing.assert_allclose(
        e.log_prob(z[0]), jnp.broadcast_to(d.log_prob(z[0]), e.batch_shape), rtol=1e-10
    )
    assert d.expand(d.batch_shape).batch_shape == d.batch_shape
    if d.batch_shape:
        # grow the first dimension that is not 1: no broadcasting reaches that shape
        i = next(i for i, s in enumerate(d.batch_shape) if s > 1)
        bad = d.batch_shape[:i] + (d.batch_shape[i] + 1,) + d.batch_shape[i + 1 :]
        with pytest.raises(ValueError, match="cannot expand batch shape"):
            d.expand(bad)


def test_mask_and_to_event(d):
    z = d.sample(jax.random.key(0))
    assert jnp.all(d.mask(False).log_prob(z) == 0.0)
    e = d.expand((3,) + d.batch_shape).to_event(1)
    assert e.log_prob(e.sample(jax.random.key(1))).shape == ((3,) + d.batch_shape)[:-1]


def test_validate_args_is_checked_outside_jit_only(d):
    """With validate_args, values are checked eagerly; under jit NumPyro skips the check."""
    bad = jnp.nan * jnp.ones_like(d.mean)
    if isinstance(d, LDSPosterior):
        with pytest.raises(ValueError, match="potential_mean"):
            LDSPosterior(d.prior, bad, potential_var=jnp.ones_like(bad), validate_args=True)
        jax.jit(
            lambda y: (
                LDSPosterior(d.prior, y, potential_var=jnp.ones_like(y), validate_args=True).mean
            )
        )(bad)
    else:
        with pytest.raises(ValueError, match="initial_mean"):
            LinearGaussianStateSpace(
                bad[..., 0, :],
                d.initial_cov,
                d.transition_matrix,
                d.transition_cov,
                num_steps=d.num_steps,
                validate_args=True,
            )


def test_equivalent_to_gaussian_random_walk():
    T, scale = 6, 0.7
    grw = dist.GaussianRandomWalk(scale, num_steps=T)
    lgss = LinearGaussianStateSpace(
        jnp.zeros(1),
        jnp.full((1, 1), scale**2),
        jnp.ones((1, 1)),
        jnp.full((1, 1), scale**2),
        num_steps=T,
    )
    z = grw.sample(jax.random.key(0), (4,))
    np.testing.assert_allclose(lgss.log_prob(z[..., None]), grw.log_prob(z), rtol=1e-10)
    np.testing.assert_allclose(lgss.variance[:, 0], grw.variance, rtol=1e-10)


def test_equivalent_to_gaussian_state_space():
    """NumPyro's GaussianStateSpace starts from z_0 = 0, so z_1 ~ N(0, Q)."""
    rng = np.random.default_rng(0)
    T, k = 5, 3
    A = 0.5 * rng.normal(size=(k, k))
    Q = rng.normal(size=(k, k))
    Q = Q @ Q.T + np.eye(k)
    gss = dist.GaussianStateSpace(T, A, covariance_matrix=Q)
    lgss = LinearGaussianStateSpace(jnp.zeros(k), Q, A, Q, num_steps=T)
    z = gss.sample(jax.random.key(0), (3,))
    np.testing.assert_allclose(lgss.log_prob(z), gss.log_prob(z), rtol=1e-10)


def test_vmap_over_refuses_a_name_the_constructor_does_not_take(d):
    with pytest.raises(TypeError, match="unexpected keyword argument 'loc'"):
        vmap_over(d, loc=0)


def test_vmap_over_refuses_an_argument_that_is_not_an_array(d):
    with pytest.raises(TypeError, match=r"array arguments only, got \['schedule'\]"):
        vmap_over(d, schedule=0)


def test_vmap_over_a_posterior_mask():
    """The constructor's ``mask`` is the ``potential_mask`` field; an argument the posterior
    was built without has no axis."""
    rng = np.random.default_rng(0)
    q = random_posterior(rng, random_prior(rng, 2, 4), mask=True, diag=True)
    axes = vmap_over(q, mask=0, potential_mean=0, potential_cov=0)
    assert (axes.potential_mask, axes.potential_mean) == (0, 0)
    assert axes.potential_cov is None and axes.potential_var is None
