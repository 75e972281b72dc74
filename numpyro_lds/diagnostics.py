"""ArviZ integration: InferenceData from an SVI fit, and Pareto k̂ of the variational fit.

Needs ArviZ (``pip install numpyro-lds[diagnostics]``); targets ArviZ 0.23. The adapter only
assembles dictionaries of arrays and calls ``az.from_dict``, so ArviZ 1.x
(``from_numpyro_svi``) can be added beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import Independent
from numpyro.infer import Predictive
from numpyro.infer.util import log_density, log_likelihood

from numpyro_lds.distributions import LinearGaussianStateSpace
from numpyro_lds.sites import unwrap

__all__ = ["pareto_k", "to_inference_data"]


def _model_trace(model, params, args, kwargs):
    seeded = handlers.seed(handlers.substitute(model, data=params), rng_seed=0)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


def _latent_names(trace):
    return [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]


def _latent_draws(guide, params, rng_key, num_samples, args, kwargs, latent_names):
    draws = Predictive(guide, params=params, num_samples=num_samples)(rng_key, *args, **kwargs)
    return {k: v for k, v in draws.items() if k in latent_names}


def to_inference_data(
    model, guide, params, *model_args, rng_key, num_samples, losses=None, **model_kwargs
):
    """An ArviZ ``InferenceData`` of an SVI fit.

    Groups: ``posterior`` (guide draws of every latent site; LDS sites have dims
    ``("chain", "draw", …, "time", "state")`` with integer coordinates), ``posterior_predictive``
    and ``log_likelihood`` (one entry per observed site; per time step, dims
    ``("chain", "draw", …, "time")``, for a site whose ``to_event`` dims include an LDS
    site's time axis, e.g. ``dist.Normal(z, s).to_event(2)`` with ``y`` of shape
    ``[…, T, D]``, so ``az.loo`` leaves out one time step at a time; other sites give one
    value per draw and batch element, as NumPyro's ``log_likelihood``),
    ``observed_data``, and ``svi_loss`` (the loss history, when ``losses`` is given).

    Args:
      model: the NumPyro model.
      guide: the fitted guide (any NumPyro guide; typically :class:`AutoLDSGuide`).
      params: the fitted parameters (``svi_result.params``).
      *model_args: the model's positional arguments.
      rng_key: a JAX PRNG key.
      num_samples: number of guide draws (one chain).
      losses: optional SVI loss history (``svi_result.losses``).
      **model_kwargs: the model's keyword arguments.

    Returns:
      ``arviz.InferenceData``.
    """
    import arviz as az

    trace = _model_trace(model, params, model_args, model_kwargs)
    latent = _latent_names(trace)
    observed = {
        n: s["value"] for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]
    }
    key_post, key_pred = jax.random.split(rng_key)
    draws = _latent_draws(guide, params, key_post, num_samples, model_args, model_kwargs, latent)
    predictive = Predictive(model, posterior_samples=draws, params=params)(
        key_pred, *model_args, **model_kwargs
    )
    dims, coords, lengths = {}, {}, set()
    for name in latent:
        base, _ = unwrap(trace[name]["fn"])
        if isinstance(base, LinearGaussianStateSpace):
            T, k = base.event_shape
            lengths.add(T)
            batch = [f"{name}_dim_{i}" for i in range(np.ndim(draws[name]) - 3)]
            dims[name] = batch + ["time", "state"]
            coords.setdefault("time", np.arange(T))
            coords.setdefault("state", np.arange(k))
    per_step = {n: _non_time_axes(trace[n]["fn"], lengths) for n in observed}
    per_step = {n: v for n, v in per_step.items() if v is not None}
    loglik = log_likelihood(
        handlers.substitute(model, data=params), draws, *model_args, **model_kwargs
    )
    if per_step:
        loglik.update(
            _per_step_log_likelihood(model, params, draws, per_step, model_args, model_kwargs)
        )
    for name in per_step:
        batch = [f"{name}_dim_{i}" for i in range(np.ndim(loglik[name]) - 2)]
        dims[name] = batch + ["time"]

    add_chain = lambda d: {k: np.asarray(v)[None] for k, v in d.items()}  # noqa: E731
    idata = az.from_dict(
        posterior=add_chain(draws),
        posterior_predictive=add_chain({k: v for k, v in predictive.items() if k in observed}),
        log_likelihood=add_chain(loglik),
        observed_data={k: np.asarray(v) for k, v in observed.items()},
        coords=coords,
        dims=dims,
    )
    if losses is not None:
        import xarray as xr

        idata.add_groups({"svi_loss": xr.Dataset({"loss": ("step", np.asarray(losses))})})
    return idata


def _strip_independent(fn):
    """The distribution under every ``to_event`` and how many dims those reinterpreted."""
    reinterpreted = 0
    while isinstance(fn, Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, reinterpreted


def _non_time_axes(fn, lengths):
    """Axes of the base log-density to sum for one value per time step, or ``None``.

    An observed site whose event shape ends in ``(T, D)`` with ``T`` an LDS site's length
    and whose time axis is among the dims ``to_event`` reinterpreted (``Normal(z, s)
    .to_event(2)``, ``MultivariateNormal(...).to_event(1)``) gets one log-likelihood per
    time step: its base distribution's log-density summed over every reinterpreted dim but
    time. Every other site keeps NumPyro's one value per draw (and batch element).
    """
    event = tuple(fn.event_shape)
    if len(event) < 2 or event[-2] not in lengths:
        return None
    _, reinterpreted = _strip_independent(fn)
    time = len(event) - 2  # position of the time axis among the event dims
    if time >= reinterpreted:
        return None  # the base distribution's own event includes time: nothing to split
    # the reinterpreted dims are the last `reinterpreted` dims of the base's log-density
    return tuple(j - reinterpreted for j in range(reinterpreted) if j != time)


def _per_step_log_likelihood(model, params, draws, per_step, args, kwargs):
    """``{site: log p(y_t | z, ...)}`` with a trailing time axis, for every draw."""

    def one(draw):
        seeded = handlers.seed(handlers.substitute(model, data={**params, **draw}), rng_seed=0)
        tr = handlers.trace(seeded).get_trace(*args, **kwargs)
        out = {}
        for name, axes in per_step.items():
            base, _ = _strip_independent(tr[name]["fn"])
            out[name] = jnp.sum(base.log_prob(tr[name]["value"]), axis=axes)
        return out

    return jax.vmap(one)(draws)


def pareto_k(model, guide, params, *model_args, rng_key, num_samples, **model_kwargs):
    r"""Pareto :math:`\hat k` of the importance ratios :math:`\log p(x, z) - \log q(z)`.

    The standard check of whether a variational fit can be trusted (Yao et al. 2018):
    draw ``num_samples`` latents from the guide, compute the log importance ratios, and fit
    a generalized Pareto distribution to their upper tail with ArviZ's PSIS
    (``az.psislw``). Reading :math:`\hat k`:

    - :math:`\hat k < 0.5`: q is close to the posterior; importance-weighted estimates are
      reliable and converge fast.
    - :math:`0.5 \le \hat k < 0.7`: usable, with slower convergence (0.7 is the
      threshold for moderate sample sizes; the finite-sample threshold is
      :math:`\min(1 - 1/\log_{10} S, 0.7)`).
    - :math:`\hat k \ge 0.7`: q misses mass the posterior has; do not trust the fit's
      expectations, and consider a richer guide or more optimization.

    Args:
      model: the NumPyro model.
      guide: the fitted guide.
      params: the fitted parameters.
      *model_args: the model's positional arguments.
      rng_key: a JAX PRNG key.
      num_samples: number of guide draws (hundreds to thousands).
      **model_kwargs: the model's keyword arguments.

    Returns:
      :math:`\hat k`, a float.

    References:
      Yao, Vehtari, Simpson & Gelman (2018). Yes, but did it work?: Evaluating variational
      inference. ICML.
    """
    import arviz as az

    trace = _model_trace(model, params, model_args, model_kwargs)
    latent = _latent_names(trace)
    draws = _latent_draws(guide, params, rng_key, num_samples, model_args, model_kwargs, latent)

    def log_ratio(z):
        log_p, _ = log_density(handlers.substitute(model, data=z), model_args, model_kwargs, params)
        log_q, _ = log_density(handlers.substitute(guide, data=z), model_args, model_kwargs, params)
        return log_p - log_q

    log_w = np.asarray(jax.vmap(log_ratio)(draws), np.float64)
    _, k_hat = az.psislw(log_w)
    return float(k_hat)
