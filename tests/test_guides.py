"""AutoLDSGuide: exact posterior at the optimum, closed-form KL, plates, encoder, latents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import SVI, TraceMeanField_ELBO
from numpyro.optim import Adam

from helpers import random_prior
from numpyro_lds import AutoLDSGuide, LDSPosterior

T, K, N = 6, 2, 3
OBS_VAR = 0.25


def _prior(batch=()):
    return random_prior(np.random.default_rng(0), K, T, batch)


def test_optimum_is_the_exact_kalman_smoother():
    """Sequences of lengths 6, 4 and 2, padded to T = 6: the model masks the likelihood of
    the padded steps and the guide its potentials there (``potential_mask``)."""
    prior = _prior()
    y_obs = jnp.asarray(np.random.default_rng(1).normal(size=(N, T, K)))
    valid = jnp.arange(T) < jnp.asarray([T, 4, 2])[:, None]

    def model(y, valid):
        with numpyro.plate("seq", N):
            z = numpyro.sample("z", prior)
            likelihood = dist.Normal(z, jnp.sqrt(OBS_VAR)).mask(valid[..., None])
            numpyro.sample("y", likelihood.to_event(2), obs=y)

    guide = AutoLDSGuide(model, potential_mask=lambda y, valid: {"z": valid}, init_scale=1.0)
    schedule = lambda i: 0.05 * 0.01 ** (i / 2000)  # noqa: E731
    svi = SVI(model, guide, Adam(schedule), TraceMeanField_ELBO(num_particles=4))
    result = svi.run(jax.random.key(0), 2000, y_obs, valid, progress_bar=False)
    exact = LDSPosterior(
        prior.expand((N,)), y_obs, potential_var=jnp.full((N, T, K), OBS_VAR), mask=valid
    )
    q = guide.get_posteriors(result.params, y_obs, valid)["z"]
    np.testing.assert_array_equal(q.potential_mask, valid)
    sd = np.sqrt(exact.variance)
    np.testing.assert_array_less(np.abs(q.mean - exact.mean), 0.1 * sd)
    np.testing.assert_allclose(np.sqrt(q.variance), sd, rtol=0.1)
    # Masked potentials get no gradient: Adam leaves them at their initial variance, 1.
    np.testing.assert_allclose(result.params["z_auto_potential_var"][~valid], 1.0, rtol=1e-12)
    med = guide.median(result.params, y_obs, valid)["z"]
    np.testing.assert_allclose(med, q.mean)
    qs = guide.quantiles(result.params, [0.5, 0.975], y_obs, valid)["z"]
    np.testing.assert_allclose(qs[0], q.mean, atol=1e-12)
    np.testing.assert_allclose(qs[1], q.mean + 1.959964 * np.sqrt(q.variance), rtol=1e-5)
    draws = guide.sample_posterior(
        jax.random.key(1), result.params, y_obs, valid, sample_shape=(5, 2)
    )
    assert draws["z"].shape == (5, 2, N, T, K)


def test_lds_site_takes_the_closed_form_with_learned_prior_and_other_latents():
    """The prior uses a param and a latent; the guide uses both, and the KL is exact."""
    base = _prior()

    def prior_of(shift, scale):
        return type(base)(
            base.initial_mean + shift,
            base.initial_cov,
            base.transition_matrix,
            scale * base.transition_cov,
            num_steps=T,
        )

    def model():
        scale = numpyro.param("q_scale", 0.5, constraint=dist.constraints.positive)
        shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
        numpyro.sample("z", prior_of(shift, scale))

    guide = AutoLDSGuide(model)
    svi = SVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    params = dict(svi.get_params(svi.init(jax.random.key(0))), q_scale=0.7)
    for seed in range(2):
        key = jax.random.key(seed)
        loss = float(TraceMeanField_ELBO().loss(key, params, model, guide))
        # replay what the ELBO does with this key: the guide's draw of "shift" sets both priors
        _, guide_key = jax.random.split(key)
        tr = numpyro.handlers.trace(
            numpyro.handlers.substitute(numpyro.handlers.seed(guide, guide_key), data=params)
        ).get_trace()
        shift = tr["shift"]["value"]
        q_z = tr["z"]["fn"]
        np.testing.assert_allclose(q_z.prior.initial_mean, base.initial_mean + shift)
        np.testing.assert_allclose(q_z.prior.transition_cov, 0.7 * base.transition_cov)
        expected = kl_divergence(tr["shift"]["fn"], dist.Normal(0.0, 1.0)) + kl_divergence(
            q_z, prior_of(shift, 0.7)
        )
        np.testing.assert_allclose(loss, float(expected), rtol=1e-8)


def test_lds_only_model_loss_is_the_exact_kl():
    prior = _prior()

    def model():
        numpyro.sample("z", prior)

    guide = AutoLDSGuide(model, init_scale=1.0)
    svi = SVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0)))
    params = dict(params, z_auto_potential_mean=jnp.ones((T, K)))
    losses = [
        float(TraceMeanField_ELBO().loss(jax.random.key(s), params, model, guide)) for s in range(3)
    ]
    q = LDSPosterior(prior, jnp.ones((T, K)), potential_var=params["z_auto_potential_var"])
    np.testing.assert_allclose(losses, float(q.kl_to_prior()), rtol=1e-10)


def test_encoder_provides_the_potentials():
    prior = _prior()
    y_obs = jnp.asarray(np.random.default_rng(2).normal(size=(T, K)))

    def model(y):
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Normal(z, 0.5).to_event(2), obs=y)

    def encoder(y):
        w = numpyro.param("enc_w", jnp.ones(K))
        log_var = numpyro.param("enc_log_var", jnp.zeros(K))
        return {"z": (y * w, jnp.exp(log_var) * jnp.ones_like(y))}

    guide = AutoLDSGuide(model, encoder=encoder)
    result = SVI(model, guide, Adam(0.05), TraceMeanField_ELBO()).run(
        jax.random.key(0), 300, y_obs, progress_bar=False
    )
    assert "enc_w" in result.params and "z_auto_potential_mean" not in result.params
    assert result.losses[-20:].mean() < result.losses[:20].mean()
