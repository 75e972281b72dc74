"""NaturalGradientSVI (``numpyro_lds.infer``): the Newton start, conjugate-computation steps.

Float64 against the dense ``T·k``-dimensional Gaussian (``tests/reference.py``), and the
non-conjugate fixed point against the closed-form ELBO of a Poisson LDS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.svi import SVIRunResult
from numpyro.optim import Adam

import reference as ref
from helpers import random_prior, spd
from numpyro_lds import AutoLDSGuide, LDSPosterior, NaturalGradientSVI
from numpyro_lds.conjugate import (
    natural_step,
    potential_from_information,
    potential_root,
)

T, K, D = 5, 2, 3


def _dense_posterior(prior, y, C, R, mask=None):
    """Means ``[T, k]`` and marginal covariances ``[T, k, k]`` by plain linear algebra."""
    m0, P0, A, b, Q = (np.asarray(x) for x in (
        prior.initial_mean, prior.initial_cov, prior.transition_matrix,
        prior.transition_offset, prior.transition_cov,
    ))  # fmt: skip
    mean, cov = ref.prior_joint(m0, P0, A, b, Q, T)
    mask = np.ones(T, bool) if mask is None else np.asarray(mask)
    Rs = np.broadcast_to(R, (T,) + R.shape)
    Cs = np.broadcast_to(C, (T,) + C.shape)
    mean, cov, log_z = ref.condition_joint(mean, cov, np.asarray(y), Rs, Cs, mask, K)
    means, covs, _ = ref.blocks(mean, cov, T, K)
    return means, covs, log_z


def _gaussian_model(prior, C, R, mask=None):
    def model(y):
        z = numpyro.sample("z", prior)
        likelihood = dist.MultivariateNormal(z @ C.T, R)
        if mask is not None:
            likelihood = likelihood.mask(mask)
        numpyro.sample("y", likelihood.to_event(1), obs=y)

    return model


# ---------------------------------------------------------------- Gaussian likelihoods


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_newton_start_is_the_exact_posterior_with_zero_precision_directions(form):
    """Positions observed, velocities not (``C = [1, 0]``): the likelihood's precision is
    singular, and the default start holds it exactly."""
    prior = random_prior(np.random.default_rng(0), K, T)
    C = np.array([[1.0, 0.0]])
    R = np.array([[0.3]])
    y = np.random.default_rng(1).normal(size=(T, 1))
    model = _gaussian_model(prior, jnp.asarray(C), jnp.asarray(R))
    guide = AutoLDSGuide(model, potential_form=form)
    svi = SVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), jnp.asarray(y)))
    np.testing.assert_array_equal(params["z_auto_potential_root_diag"][:, 1], 0.0)
    q = guide.get_posteriors(params, jnp.asarray(y))["z"]
    means, covs, _ = _dense_posterior(prior, y, C, R)
    np.testing.assert_allclose(q.mean, means, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(q.marginal_covariance, covs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_one_natural_step_is_the_exact_posterior_from_any_start(form):
    """A 3-dimensional observation mixing both states, a masked step, data far from the
    prior (in its own units): one step at β = 1 from weak potentials gives the exact
    smoother; with ``"diagonal"`` potentials the likelihood's coupling is out of reach, so
    that case observes each state alone."""
    rng = np.random.default_rng(2)
    prior = random_prior(rng, K, T)
    C = rng.normal(size=(D, K)) if form == "full" else np.eye(K)
    d = C.shape[0]
    R = spd(rng, (), d, 0.3) if form == "full" else np.diag([0.2, 0.5])
    y = 300.0 + 50.0 * rng.normal(size=(T, d))
    mask = np.array([True, True, False, True, True])
    model = _gaussian_model(prior, jnp.asarray(C), jnp.asarray(R), jnp.asarray(mask))
    guide = AutoLDSGuide(model, potential_form=form, init_potentials="prior")
    svi = NaturalGradientSVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    result = svi.run(jax.random.key(0), 1, jnp.asarray(y), progress_bar=False)
    assert isinstance(result, SVIRunResult) and result.losses.shape == (1,)
    q = guide.get_posteriors(result.params, jnp.asarray(y))["z"]
    means, covs, log_z = _dense_posterior(prior, y, C, R, mask)
    np.testing.assert_allclose(q.mean, means, rtol=1e-9)
    np.testing.assert_allclose(q.marginal_covariance, covs, rtol=1e-8, atol=1e-12)
    # The loss is the ELBO's: at the exact posterior its expectation is -log p(y).
    params = result.params
    losses = [
        float(TraceMeanField_ELBO().loss(jax.random.key(s), params, model, guide, jnp.asarray(y)))
        for s in range(64)
    ]
    assert abs(np.mean(losses) + log_z) < 4 * np.std(losses) / 8 + 1e-8


def test_two_lds_sites_take_one_exact_step_each():
    """Two LDS sites, each observed directly and (to_event over a plate of 2 sequences)
    at its own noise level: one step at β = 1 gives each site's exact smoother."""
    rng = np.random.default_rng(6)
    p1, p2 = random_prior(rng, K, T), random_prior(rng, 1, T)
    y1 = jnp.asarray(rng.normal(size=(2, T, K)))
    y2 = jnp.asarray(rng.normal(size=(T, 1)))

    def model(y1, y2):
        with numpyro.plate("seq", 2):
            a = numpyro.sample("a", p1)
            numpyro.sample("y1", dist.Normal(a, 0.7).to_event(2), obs=y1)
        b = numpyro.sample("b", p2)
        numpyro.sample("y2", dist.Normal(b, 0.3).to_event(2), obs=y2)

    guide = AutoLDSGuide(model, init_potentials="prior")
    svi = NaturalGradientSVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    state, _ = svi.update(svi.init(jax.random.key(0), y1, y2), y1, y2)
    q = guide.get_posteriors(svi.get_params(state), y1, y2)
    exact_a = LDSPosterior(p1.expand((2,)), y1, potential_var=jnp.full((2, T, K), 0.49))
    exact_b = LDSPosterior(p2, y2, potential_var=jnp.full((T, 1), 0.09))
    np.testing.assert_allclose(q["a"].mean, exact_a.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q["a"].variance, exact_a.variance, rtol=1e-9)
    np.testing.assert_allclose(q["b"].mean, exact_b.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q["b"].variance, exact_b.variance, rtol=1e-9)


def test_plate_subsample_and_learned_parameter():
    """Four sequences in a plate subsampled two at a time: each step updates its rows only;
    the ELBO's gradient then fits the observation noise, which converges to the maximum of
    the exact log-likelihood (``log_normalizer``)."""
    rng = np.random.default_rng(3)
    prior = random_prior(rng, K, T, time_varying=False)
    n = 4
    y = jnp.asarray(rng.normal(size=(n, T, K)))

    def model(y, batch=None):
        sd = numpyro.param("obs_sd", 1.0, constraint=dist.constraints.positive)
        with numpyro.plate("seq", n, subsample_size=batch):
            z = numpyro.sample("z", prior)
            y_b = numpyro.subsample(y, event_dim=2)
            numpyro.sample("y", dist.Normal(z, sd).to_event(2), obs=y_b)

    def plates(y, batch=None):
        return numpyro.plate("seq", n, subsample_size=batch)

    guide = AutoLDSGuide(
        model, potential_form="full", init_potentials="prior", create_plates=plates
    )
    svi = NaturalGradientSVI(model, guide, Adam(0.05), TraceMeanField_ELBO())
    state = svi.init(jax.random.key(0), y, 2)
    before = svi.get_params(state)
    state, _ = svi.update(state, y, 2)
    after = svi.get_params(state)
    changed = np.any(
        np.asarray(after["z_auto_potential_obs"] != before["z_auto_potential_obs"]), axis=(1, 2)
    )
    assert changed.sum() == 2
    result = svi.run(jax.random.key(1), 300, y, 2, progress_bar=False)

    def log_lik(sd):
        q = LDSPosterior(prior.expand((n,)), y, potential_var=jnp.full((n, T, K), sd**2))
        return jnp.sum(q.log_normalizer)

    sds = jnp.exp(jnp.linspace(-2.0, 3.0, 2000))
    best = sds[jnp.argmax(jax.vmap(log_lik)(sds))]
    np.testing.assert_allclose(result.params["obs_sd"], best, rtol=0.05)
    # A step on the whole batch: the potentials of the noise level it starts from.
    sd = result.params["obs_sd"]
    state, _ = svi.update(result.state, y, None)
    q = guide.get_posteriors(svi.get_params(state), y)["z"]
    exact = LDSPosterior(prior.expand((n,)), y, potential_var=jnp.full((n, T, K), sd**2))
    np.testing.assert_allclose(q.mean, exact.mean, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------- non-conjugate


def _poisson_elbo(prior, C, y, q):
    """The closed-form ELBO of a Poisson LDS with log link: ``E exp(c·z) = exp(c·m + cᵀSc/2)``."""
    m, S = q.mean, q.marginal_covariance
    log_rate = m @ C.T + 0.5 * jnp.einsum("dk,tkl,dl->td", C, S, C)
    expected = jnp.sum(y * (m @ C.T) - jnp.exp(log_rate))
    return expected - q.kl_to_prior()


def test_exact_expectation_steps_reach_a_stationary_point_of_the_poisson_elbo():
    """Conjugate-computation steps with the exact expectations converge to a point where the
    closed-form ELBO's gradient with respect to the potentials is zero."""
    rng = np.random.default_rng(4)
    prior = random_prior(rng, K, T, offset=False)
    C = jnp.asarray(0.5 * rng.normal(size=(D, K)))
    y = jnp.asarray(rng.poisson(1.5, size=(T, D)).astype(float))
    h = jnp.zeros((T, K))
    lam = jnp.zeros((T, K, K))

    def posterior(h, lam):
        params = potential_from_information(h, lam)
        root = potential_root(*params[1:])
        return LDSPosterior(prior, params[0], potential_var=jnp.ones((T, K)), emission_matrix=root)

    for _ in range(40):
        q = posterior(h, lam)
        m, S = q.mean, q.marginal_covariance
        rate = jnp.exp(m @ C.T + 0.5 * jnp.einsum("dk,tkl,dl->td", C, S, C))
        grad = (y - rate) @ C
        hess = -jnp.einsum("td,dk,dl->tkl", rate, C, C)
        h, lam, clipped = natural_step(h, lam, m, grad, hess, 0.7)
        assert not np.any(clipped)
    g_h, g_lam = jax.grad(lambda h, lam: _poisson_elbo(prior, C, y, posterior(h, lam)), (0, 1))(
        h, lam
    )
    assert float(jnp.max(jnp.abs(g_h))) < 1e-8
    assert float(jnp.max(jnp.abs(g_lam + jnp.swapaxes(g_lam, -1, -2)))) < 1e-8


def test_natural_gradient_svi_improves_a_poisson_lds_beyond_adam():
    """Monte Carlo steps on a Poisson LDS, β = 0.5: the closed-form ELBO after 30 steps is
    above that of 300 Adam steps from the same default start."""
    rng = np.random.default_rng(5)
    prior = random_prior(rng, K, 20, offset=False)
    C = jnp.asarray(0.7 * rng.normal(size=(6, K)))
    y = jnp.asarray(rng.poisson(2.0, size=(20, 6)).astype(float))

    def model(y):
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Poisson(jnp.exp(z @ C.T)).to_event(2), obs=y)

    def fitted_elbo(svi, guide, steps):
        result = svi.run(jax.random.key(0), steps, y, progress_bar=False)
        return float(_poisson_elbo(prior, C, y, guide.get_posteriors(result.params, y)["z"]))

    guide = AutoLDSGuide(model)
    natural = NaturalGradientSVI(
        model, guide, Adam(0.01), TraceMeanField_ELBO(), natural_step_size=0.5,
        curvature_samples=4,
    )  # fmt: skip
    elbo_natural = fitted_elbo(natural, guide, 30)
    adam_guide = AutoLDSGuide(model)
    adam = SVI(model, adam_guide, Adam(0.02), TraceMeanField_ELBO())
    elbo_adam = fitted_elbo(adam, adam_guide, 300)
    start = SVI(model, AutoLDSGuide(model), Adam(0.0), TraceMeanField_ELBO())
    elbo_start = fitted_elbo(start, start.guide, 1)
    assert elbo_natural > elbo_adam > elbo_start - 1.0


# ---------------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong():
    prior = random_prior(np.random.default_rng(0), K, T)

    def model(y):
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Normal(z, 1.0).to_event(2), obs=y)

    with pytest.raises(TypeError, match="AutoLDSGuide"):
        NaturalGradientSVI(
            model, numpyro.infer.autoguide.AutoNormal(model), Adam(0.1), Trace_ELBO()
        )
    encoded = AutoLDSGuide(model, encoder=lambda y: {"z": (y, jnp.ones_like(y))})
    with pytest.raises(ValueError, match="encoder"):
        NaturalGradientSVI(model, encoded, Adam(0.1), Trace_ELBO())
    with pytest.raises(ValueError, match="natural_step_size"):
        NaturalGradientSVI(model, AutoLDSGuide(model), Adam(0.1), Trace_ELBO(), natural_step_size=2)
    with pytest.raises(ValueError, match="potential_form"):
        AutoLDSGuide(model, potential_form="dense")
    with pytest.raises(ValueError, match="init_potentials"):
        AutoLDSGuide(model, init_potentials="zeros")

    def no_lds(y):
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    svi = NaturalGradientSVI(no_lds, AutoLDSGuide(no_lds), Adam(0.1), Trace_ELBO())
    with (
        pytest.warns(UserWarning, match="no LinearGaussianStateSpace"),  # the guide's own
        pytest.raises(ValueError, match="LinearGaussianStateSpace"),
    ):
        svi.init(jax.random.key(0), jnp.zeros((T, K)))
