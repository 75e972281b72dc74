"""The identity emission (``emission_matrix=None``) against the same potentials with an
explicit ``emission_matrix = I``.

``LDSPosterior`` without an emission matrix passes ``None`` down to the Kalman code, which
then forms no product with it (``potentials.Potentials``). The dense-reference tests check
that path's numbers; these check it against the general path, which forms every product
with ``H``, for every output the distribution has and every gradient, on all three
schedules, with diagonal and full potential covariances, unrolled (``k ≤ 8``) and LAPACK
(``k > 8``) algebra, one sequence and a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions.kl import kl_divergence

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

T = 5


def _inputs(k, batch, diagonal, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch,) if batch else ()
    x = rng.normal(size=shape + (T, k, k))
    cov = x @ np.swapaxes(x, -1, -2) + k * np.eye(k)
    return {
        "A": jnp.asarray(0.8 * np.linalg.qr(rng.normal(size=(k, k)))[0]),
        "Q": jnp.asarray(0.3 * np.eye(k) + 0.05),
        "m0": jnp.asarray(rng.normal(size=k)),
        "y": jnp.asarray(rng.normal(size=shape + (T, k))),
        "R": jnp.asarray(rng.uniform(0.5, 2.0, size=shape + (T, k)) if diagonal else cov),
        "z": jnp.asarray(rng.normal(size=shape + (T, k))),
    }


def _outputs(params, k, diagonal, schedule, explicit):
    def prior():
        return LinearGaussianStateSpace(
            params["m0"], jnp.eye(k), params["A"], params["Q"], num_steps=T, schedule=schedule
        )

    prior_q = prior()
    H = jnp.eye(k) if explicit else None
    R = {"potential_var": params["R"]} if diagonal else {"potential_cov": params["R"]}
    q = LDSPosterior(prior_q, params["y"], emission_matrix=H, **R)
    return {
        "kl_terms": kl_divergence(q, prior()),  # a rebuilt prior: Terms A–C
        "kl_to_prior": q.kl_to_prior(),
        "log_normalizer": q.log_normalizer,
        "mean": q.mean,
        "covariance": q.marginal_covariance,
        "cross_covariance": q.cross_covariance,
        "log_prob": q.log_prob(params["z"]),
        "sample": q.sample(jax.random.key(3)),
    }


# The gradient paths: the Terms A–C KL (the posterior's custom VJP, with the expected
# log-joint's), log q of fixed paths (its own VJP) and a draw (the simulation smoother).
# The other outputs' values are compared; their gradients go through the same VJPs.
DIFFERENTIATED = ("kl_terms", "log_prob", "sample")


def _scalar(outputs):
    return sum((i + 1.0) * jnp.sum(jnp.sin(outputs[n])) for i, n in enumerate(DIFFERENTIATED))


# Both kinds of covariance on the sequential filter, and one each on the elements that the
# blocked and parallel schedules share; LAPACK algebra (k > 8) on two; a batch vmapped
# (k ≤ 8) and one run one sequence at a time (k > 8).
CASES = [
    ("sequential", False, 3, 2),
    ("sequential", True, 9, 2),
    ("blocked", False, 9, 0),
    ("parallel", True, 3, 0),
]


@pytest.mark.parametrize(
    "schedule, diagonal, k, batch",
    CASES,
    ids=[f"{s}-{'var' if d else 'cov'}-k{k}-batch{b}" for s, d, k, b in CASES],
)
def test_identity_emission_equals_explicit_identity(schedule, diagonal, k, batch):
    params = _inputs(k, batch, diagonal)

    def run(explicit):
        def outputs_and_gradient(params):
            # one forward pass for the values and the gradient of _scalar(outputs)
            outputs, pullback = jax.vjp(
                lambda p: _outputs(p, k, diagonal, schedule, explicit), params
            )
            (gradient,) = pullback(jax.grad(_scalar)(outputs))
            return outputs, gradient

        return jax.jit(outputs_and_gradient)(params)

    (have, have_grad), (want, want_grad) = run(False), run(True)
    for name in want:
        np.testing.assert_allclose(have[name], want[name], rtol=1e-11, atol=1e-12, err_msg=name)
    for name in want_grad:
        np.testing.assert_allclose(
            have_grad[name], want_grad[name], rtol=1e-10, atol=1e-12, err_msg=name
        )
