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

from helpers import guide_potentials, random_prior
from numpyro_lds import AutoLDSGuide, LDSPosterior, NaturalGradientSVI

T, K, N = 6, 2, 3
OBS_VAR = 0.25


def _loss_and_guide_trace(key, params, model, guide):
    """``TraceMeanField_ELBO``'s loss with ``key``, and the guide's trace as the ELBO ran it."""
    loss = float(TraceMeanField_ELBO().loss(key, params, model, guide))
    _, guide_key = jax.random.split(key)
    tr = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(guide, guide_key), data=params)
    ).get_trace()
    return loss, tr


def test_optimum_is_the_exact_kalman_smoother():
    """Minibatches of 2 of 4 sequences of lengths 6, 6, 4 and 2, padded to T = 6: the model
    masks the likelihood of the padded steps and the guide its potentials there
    (``potential_mask``); ``create_plates`` lets the guide read every sequence after the fit
    (``batch=None``), and every sequence's posterior is its exact smoother."""
    prior = random_prior(np.random.default_rng(0), K, T)
    n = 4
    y_obs = jnp.asarray(np.random.default_rng(1).normal(size=(n, T, K)))
    valid = jnp.arange(T) < jnp.asarray([T, T, 4, 2])[:, None]

    def model(y, valid, batch=None):
        with numpyro.plate("seq", n, subsample_size=batch):
            z = numpyro.sample("z", prior)
            observed = numpyro.subsample(valid, event_dim=1)[..., None]
            likelihood = dist.Normal(z, jnp.sqrt(OBS_VAR)).mask(observed)
            numpyro.sample("y", likelihood.to_event(2), obs=numpyro.subsample(y, event_dim=2))

    def plates(y, valid, batch=None):
        return numpyro.plate("seq", n, subsample_size=batch)

    def potential_mask(y, valid, batch=None):
        return {"z": numpyro.subsample(valid, event_dim=1)}

    guide = AutoLDSGuide(model, potential_mask=potential_mask, create_plates=plates)
    # The Newton start sees the prototype's minibatch only: natural-gradient steps set the
    # other sequences' potentials as their minibatches come (Adam's scaled steps would not).
    svi = NaturalGradientSVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    result = svi.run(jax.random.key(0), 30, y_obs, valid, 2, progress_bar=False)
    params = result.params
    assert params["z_auto_potential_obs"].shape == (n, T, K)
    assert params["z_auto_potential_root_diag"].shape == (n, T, K)
    exact = LDSPosterior(
        prior.expand((n,)), y_obs, potential_var=jnp.full((n, T, K), OBS_VAR), mask=valid
    )
    q = guide.get_posteriors(params, y_obs, valid, None)["z"]
    np.testing.assert_array_equal(q.potential_mask, valid)
    np.testing.assert_allclose(q.mean, exact.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q.variance, exact.variance, rtol=1e-9)
    # Masked steps have no likelihood: zero precision there.
    np.testing.assert_array_equal(params["z_auto_potential_root_diag"][~valid], 0.0)
    med = guide.median(params, y_obs, valid, None)["z"]
    np.testing.assert_allclose(med, q.mean)
    qs = guide.quantiles(params, [0.5, 0.975], y_obs, valid, None)["z"]
    np.testing.assert_allclose(qs[0], q.mean, atol=1e-12)
    np.testing.assert_allclose(qs[1], q.mean + 1.959964 * np.sqrt(q.variance), rtol=1e-5)
    draws = guide.sample_posterior(
        jax.random.key(1), params, y_obs, valid, None, sample_shape=(5, 2)
    )
    assert draws["z"].shape == (5, 2, n, T, K)


def test_lds_site_takes_the_closed_form_with_learned_prior_and_other_latents():
    """The prior uses a param and a latent; the guide uses both, and the KL is exact."""
    base = random_prior(np.random.default_rng(0), K, T)

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
        # the guide's draw of "shift" sets both priors
        loss, tr = _loss_and_guide_trace(jax.random.key(seed), params, model, guide)
        shift = tr["shift"]["value"]
        q_z = tr["z"]["fn"]
        np.testing.assert_allclose(q_z.prior.initial_mean, base.initial_mean + shift)
        np.testing.assert_allclose(q_z.prior.transition_cov, 0.7 * base.transition_cov)
        expected = kl_divergence(tr["shift"]["fn"], dist.Normal(0.0, 1.0)) + kl_divergence(
            q_z, prior_of(shift, 0.7)
        )
        np.testing.assert_allclose(loss, float(expected), rtol=1e-8)


def test_lds_only_model_loss_is_the_exact_kl():
    prior = random_prior(np.random.default_rng(0), K, T)

    def model():
        numpyro.sample("z", prior)

    guide = AutoLDSGuide(model)
    svi = SVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0)))
    var = jnp.full((T, K), 2.0)
    params = dict(params, **guide_potentials(jnp.ones((T, K)), var))
    losses = [
        float(TraceMeanField_ELBO().loss(jax.random.key(s), params, model, guide)) for s in range(3)
    ]
    q = LDSPosterior(prior, jnp.ones((T, K)), potential_var=var)
    np.testing.assert_allclose(losses, float(q.kl_to_prior()), rtol=1e-10)


def test_encoder_provides_the_potentials():
    prior = random_prior(np.random.default_rng(0), K, T)
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
    assert "enc_w" in result.params and "z_auto_potential_obs" not in result.params
    assert result.losses[-20:].mean() < result.losses[:20].mean()


def test_subsampled_plate_loss_is_the_scaled_exact_kl_of_the_subsample():
    """A plate of 4 sequences subsampled 2 at a time, with a per-sequence latent shift and a
    per-sequence known offset: the guide's potentials and the shift's AutoNormal take the
    plate's rows, the model's prior (built inside the guide) the same rows, and the loss is
    the exact KL of the subsample scaled by 4 / 2."""
    base = random_prior(np.random.default_rng(0), K, T)
    n = 4
    offsets = 10.0 * jnp.arange(n)

    def prior_of(shift):
        return type(base)(
            base.initial_mean + shift[..., None],
            base.initial_cov,
            base.transition_matrix,
            base.transition_cov,
            num_steps=T,
        )

    def model():
        with numpyro.plate("seq", n, subsample_size=2):
            shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
            numpyro.sample("z", prior_of(shift + numpyro.subsample(offsets, event_dim=0)))

    guide = AutoLDSGuide(model)
    svi = SVI(model, guide, Adam(0.01), TraceMeanField_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0)))
    assert params["z_auto_potential_obs"].shape == (n, T, K)
    rng = np.random.default_rng(3)
    mean = jnp.asarray(rng.normal(size=(n, T, K)))
    var = jnp.asarray(rng.uniform(0.5, 2.0, size=(n, T, K)))
    params = dict(params, **guide_potentials(mean, var), shift_auto_loc=rng.normal(size=n))
    subsets = set()
    for seed in range(4):
        # the guide's plate rows and its draw of the shifts
        loss, tr = _loss_and_guide_trace(jax.random.key(seed), params, model, guide)
        idx = np.asarray(tr["seq"]["value"])
        subsets.add(tuple(sorted(idx)))
        shift = tr["shift"]["value"]
        q_shift = dist.Normal(params["shift_auto_loc"][idx], params["shift_auto_scale"][idx])
        p_z = prior_of(shift + offsets[idx])
        q_z = LDSPosterior(p_z, mean[idx], potential_var=var[idx])
        kl = kl_divergence(q_shift, dist.Normal(0.0, 1.0)) + kl_divergence(q_z, p_z)
        np.testing.assert_allclose(loss, float(n / 2 * jnp.sum(kl)), rtol=1e-8)
    assert len(subsets) > 1  # the plate did subsample


def test_encoder_and_potential_mask_run_inside_the_subsampled_plate():
    """``numpyro.subsample`` in an encoder or a ``potential_mask`` takes the plate's rows."""
    prior = random_prior(np.random.default_rng(0), K, T)
    n = 4
    y_obs = jnp.asarray(np.random.default_rng(1).normal(size=(n, T, K)))
    valid = jnp.arange(T) < jnp.asarray([T, 5, 4, 3])[:, None]

    def model(y, valid):
        with numpyro.plate("seq", n, subsample_size=2):
            z = numpyro.sample("z", prior)
            y_b = numpyro.subsample(y, event_dim=2)
            likelihood = dist.Normal(z, 1.0).mask(numpyro.subsample(valid, event_dim=1)[..., None])
            numpyro.sample("y", likelihood.to_event(2), obs=y_b)

    def encoder(y, valid):
        y_b = numpyro.subsample(y, event_dim=2)
        return {"z": (2.0 * y_b, jnp.ones_like(y_b))}

    guide = AutoLDSGuide(
        model,
        encoder=encoder,
        potential_mask=lambda y, valid: {"z": numpyro.subsample(valid, event_dim=1)},
    )
    for seed in range(3):
        tr = numpyro.handlers.trace(numpyro.handlers.seed(guide, seed)).get_trace(y_obs, valid)
        idx = np.asarray(tr["seq"]["value"])
        q = tr["z"]["fn"]
        np.testing.assert_array_equal(q.potential_mean, 2.0 * y_obs[idx])
        np.testing.assert_array_equal(q.potential_mask, valid[idx])


def test_defaults_with_adam_reach_the_exact_smoother_in_float32():
    """The user's path: ``AutoLDSGuide(model)``, ``Adam(0.02)``, 2 000 steps, float32, on
    the acceptance grid's rotation at observation sd 0.1 (its hardest diagonal case):
    within 0.25 posterior sd of the exact smoother's means and 10% of its sds."""
    from adam_defaults import errors, exact_posterior, make_model, problem

    y, params = problem("rotation", 0.1, 100, 0)
    model = make_model(params, jnp.float32)
    guide = AutoLDSGuide(model)
    svi = SVI(model, guide, Adam(0.02), TraceMeanField_ELBO())
    y32 = jnp.asarray(y, jnp.float32)
    result = svi.run(jax.random.key(0), 2000, y32, progress_bar=False)
    mean_err, sd_err = errors(guide, result.params, y, exact_posterior(y, params))
    assert mean_err < 0.25
    assert sd_err < 0.10
