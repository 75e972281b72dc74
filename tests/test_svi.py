"""SVI with TraceMeanField_ELBO takes the registered closed form.

NumPyro falls back to a Monte Carlo estimate when KL dispatch fails, silently. Each
test uses a model whose only term is the KL, so the closed form gives a loss that
equals the exact KL and does not depend on the random seed, while the Monte Carlo
fallback would.
"""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import pytest
from numpyro import handlers
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from helpers import random_posterior, random_prior

N = 3  # sequences in the plate


def _dists():
    rng = np.random.default_rng(0)
    prior = random_prior(rng, 2, 5)
    guide_prior = random_prior(rng, 2, 5)  # the guide's prior need not be the model's
    q = random_posterior(rng, guide_prior, batch=(N,), mask=True)
    return prior, q


MASK = np.array([True, False, True])


def _site(kind):
    """Model/guide bodies sampling 'z' in the way ``kind`` names."""

    def body(d):
        if kind == "plate":
            with numpyro.plate("seq", N):
                numpyro.sample("z", d)
        elif kind == "to_event":
            numpyro.sample("z", d.expand([N]).to_event(1))
        elif kind == "dist_mask":
            with numpyro.plate("seq", N):
                numpyro.sample("z", d.expand([N]).mask(MASK))
        elif kind == "handlers_mask":
            with numpyro.plate("seq", N), handlers.mask(mask=MASK):
                numpyro.sample("z", d)

    return body


def _expected(kind, prior, q):
    kl = np.asarray(kl_divergence(q, prior))
    return kl[MASK].sum() if kind in ("dist_mask", "handlers_mask") else kl.sum()


@pytest.mark.parametrize("kind", ["plate", "to_event", "dist_mask", "handlers_mask"])
def test_mean_field_elbo_uses_the_closed_form(kind):
    prior, q = _dists()
    body = _site(kind)
    model = lambda: body(prior)  # noqa: E731
    guide = lambda: body(q)  # noqa: E731
    elbo = TraceMeanField_ELBO()
    losses = [float(elbo.loss(jax.random.key(s), {}, model, guide)) for s in range(3)]
    np.testing.assert_allclose(losses, _expected(kind, prior, q), rtol=1e-10)


def test_monte_carlo_elbo_would_depend_on_the_seed():
    """The control: the same model under Trace_ELBO gives seed-dependent losses."""
    prior, q = _dists()
    body = _site("plate")
    model = lambda: body(prior)  # noqa: E731
    guide = lambda: body(q)  # noqa: E731
    losses = [float(Trace_ELBO().loss(jax.random.key(s), {}, model, guide)) for s in range(3)]
    assert len(set(losses)) == 3


def test_svi_step_runs_under_jit_with_learned_potentials():
    import jax.numpy as jnp
    from numpyro.infer import SVI
    from numpyro.optim import Adam

    from numpyro_lds import LDSPosterior

    prior, _ = _dists()
    T, k = prior.event_shape
    y_obs = jnp.asarray(np.random.default_rng(5).normal(size=(T, k)))

    def model():
        z = numpyro.sample("z", prior)
        numpyro.sample("y", numpyro.distributions.Normal(z, 0.5).to_event(2), obs=y_obs)

    def guide():
        y = numpyro.param("y_pot", jnp.zeros((T, k)))
        var = numpyro.param(
            "var", jnp.ones((T, k)), constraint=numpyro.distributions.constraints.positive
        )
        numpyro.sample("z", LDSPosterior(prior, y, potential_var=var))

    schedule = lambda i: 0.05 * 0.01 ** (i / 1500)  # noqa: E731
    svi = SVI(model, guide, Adam(schedule), TraceMeanField_ELBO(num_particles=4))
    result = svi.run(jax.random.key(0), 1500, progress_bar=False)
    # The optimum of this guide is the exact posterior: the prior conditioned on y_obs.
    exact = LDSPosterior(prior, y_obs, potential_var=jnp.full((T, k), 0.25))
    q = LDSPosterior(prior, result.params["y_pot"], potential_var=result.params["var"])
    sd = np.sqrt(exact.variance)
    np.testing.assert_array_less(np.abs(q.mean - exact.mean), 0.1 * sd)
    np.testing.assert_allclose(np.sqrt(q.variance), sd, rtol=0.1)
