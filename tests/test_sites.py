"""numpyro_lds.sites: a site's LDS taken out of NumPyro's expand, mask and to_event layers,
and another distribution put back into the same layers."""

from __future__ import annotations

import jax
import numpy as np
from numpyro.distributions.distribution import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
)

from helpers import random_posterior, random_prior
from numpyro_lds.sites import rewrap, unwrap


def test_rewrap_puts_back_the_layers_unwrap_took_off():
    rng = np.random.default_rng(0)
    prior = random_prior(rng, 2, 4)
    keep = np.array([True, False, True])
    # NumPyro's own wrapper (the package's distributions expand natively, without one)
    site = ExpandedDistribution(prior, (3,)).mask(keep).to_event(1)
    base, wrappers = unwrap(site)
    assert base is prior
    assert [type(w) for w in wrappers] == [Independent, MaskedDistribution, ExpandedDistribution]

    q = random_posterior(rng, prior)
    rewrapped = rewrap(q, wrappers)
    assert (rewrapped.batch_shape, rewrapped.event_shape) == (site.batch_shape, site.event_shape)
    z = rewrapped.sample(jax.random.key(0))
    expected = sum(float(q.log_prob(z[i])) for i in np.flatnonzero(keep))
    np.testing.assert_allclose(rewrapped.log_prob(z), expected, rtol=1e-12)


def test_an_unwrapped_site_is_its_own_base():
    prior = random_prior(np.random.default_rng(1), 2, 4)
    assert unwrap(prior) == (prior, [])
    assert rewrap(prior, []) is prior
