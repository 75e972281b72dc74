"""Random LDS models and their dense counterparts, shared by the tests."""

from __future__ import annotations

import copy
import itertools
import os

import jax.numpy as jnp
import numpy as np

import reference as ref
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace


def spd(rng, shape, k, scale=1.0):
    """Random symmetric positive-definite matrices ``shape + [k, k]``."""
    a = rng.normal(size=tuple(shape) + (k, k))
    return scale * (a @ np.swapaxes(a, -1, -2) / k + 0.5 * np.eye(k))


def random_prior(rng, k, T, batch=(), time_varying=True, offset=True):
    n = (T - 1,) if time_varying else ((1,) if batch else ())
    A = 0.8 * rng.normal(size=tuple(batch) + n + (k, k)) / np.sqrt(k)
    Q = spd(rng, tuple(batch) + n, k, 0.5)
    b = rng.normal(size=tuple(batch) + n + (k,)) if offset else None
    return LinearGaussianStateSpace(
        rng.normal(size=tuple(batch) + (k,)),
        spd(rng, batch, k),
        A,
        Q,
        b,
        num_steps=T,
    )


def random_posterior(rng, prior, d=None, batch=(), diag=False, emission="auto", mask=False):
    T, k = prior.event_shape
    d = k if d is None else d
    kwargs = {}
    if diag:
        kwargs["potential_var"] = rng.uniform(0.2, 2.0, size=tuple(batch) + (T, d))
    else:
        kwargs["potential_cov"] = spd(rng, tuple(batch) + (T,), d, 0.7)
    if emission == "time" or (emission == "auto" and d != k):
        kwargs["emission_matrix"] = rng.normal(size=tuple(batch) + (T, d, k))
    elif emission == "shared":
        kwargs["emission_matrix"] = rng.normal(size=(d, k))
    if mask:
        kwargs["mask"] = rng.uniform(size=tuple(batch) + (T,)) < 0.6
    return LDSPosterior(prior, rng.normal(size=tuple(batch) + (T, d)), **kwargs)


def _select(x, idx, ndim_event):
    """Index the batch part of ``x`` (right-aligned broadcasting) at ``idx``."""
    x = np.asarray(x)
    nb = x.ndim - ndim_event
    idx = idx[len(idx) - nb :] if nb else ()
    idx = tuple(i if s > 1 else 0 for i, s in zip(idx, x.shape[:nb], strict=True))
    return x[idx]


def make_case(case, seed=0, schedule=None):
    """``(prior, posterior)`` of a case ``(id, k, T, prior batch, time-varying, potential
    kwargs)``, as the dense-reference and schedule tests tabulate them; ``schedule`` set on
    both (``None``: the backend's default)."""
    _, k, T, batch, time_varying, potential_kwargs = case
    rng = np.random.default_rng(seed)
    prior = random_prior(rng, k, T, batch, time_varying=time_varying)
    post = random_posterior(rng, prior, **potential_kwargs)
    if schedule is not None:
        prior, post = copy.copy(prior), copy.copy(post)
        prior.schedule = post.schedule = schedule
    return prior, post


def dense_inputs(dist, idx=()):
    """Batch element ``idx`` of a chain's arguments as float64 NumPy arrays, in the reference's
    form: ``(m0, P0, A, b, Q)`` of the prior and, for a posterior, the potentials
    ``(y [T, d], R [T, d, d], H [T or 1, d, k], mask [T])`` (else None)."""
    T, k = dist.event_shape
    prior = dist.prior if isinstance(dist, LDSPosterior) else dist
    chain = (
        _select(prior.initial_mean, idx, 1),
        _select(prior.initial_cov, idx, 2),
        _select(prior.transition_matrix, idx, 3),
        _select(prior.transition_offset, idx, 2),
        _select(prior.transition_cov, idx, 3),
    )
    if not isinstance(dist, LDSPosterior):
        return chain, None
    y = _select(dist.potential_mean, idx, 2)
    R = dist.potential_cov
    if R is None:  # variances [.., T, d]
        R = np.asarray(dist.potential_var)[..., None] * np.eye(y.shape[-1])
    mask = dist.potential_mask
    mask = np.ones(T, bool) if mask is None else _select(mask, idx, 1)
    H = dist.emission_matrix  # [.., T or 1, d, k], None for the identity
    H = np.eye(k)[None] if H is None else _select(H, idx, 3)
    return chain, (y, _select(R, idx, 3), H, np.broadcast_to(mask, (T,)))


def dense(dist):
    """Per batch element ``(mean [T*k], cov [T*k, T*k], log_normalizer)`` of a chain."""
    T, k = dist.event_shape
    out = {}
    for idx in itertools.product(*[range(s) for s in dist.batch_shape]):
        chain, potentials = dense_inputs(dist, idx)
        mean, cov = ref.prior_joint(*chain, T)
        log_z = 0.0
        if potentials is not None:
            mean, cov, log_z = ref.condition_joint(mean, cov, *potentials, k)
        out[idx] = (mean, cov, log_z)
    return out


def guide_potentials(mean, var, site="z", form="diagonal"):
    """``AutoLDSGuide``'s free-potential parameters for ``N(mean; z, diag(var))`` at ``site``.

    The potential ``exp(-½‖obs − G z‖²)`` with ``G = diag(var^{-1/2})`` and ``obs = G mean``;
    ``form`` as the guide's ``potential_form``.
    """
    root_diag = 1.0 / jnp.sqrt(jnp.asarray(var))
    params = {
        f"{site}_auto_potential_obs": root_diag * jnp.asarray(mean),
        f"{site}_auto_potential_root_diag": root_diag,
    }
    if form == "full":
        k = root_diag.shape[-1]
        params[f"{site}_auto_potential_root_upper"] = jnp.zeros(root_diag.shape + (k,))
    return params


def user_environment(**overrides):
    """The environment a user's shell would give a script: this process's, without the
    XLA flags the test suite sets for itself (``conftest.TEST_XLA_FLAGS``)."""
    env = dict(os.environ)
    if env.get("XLA_FLAGS") == env.pop("NUMPYRO_LDS_TEST_XLA_FLAGS", None):
        env.pop("XLA_FLAGS", None)
    env.update(overrides)
    return env
