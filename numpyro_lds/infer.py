r"""SVI whose structured guide's potentials take conjugate-computation (natural-gradient) steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import random
from numpyro import handlers
from numpyro.infer.svi import SVI, SVIState

from numpyro_lds.conjugate import likelihood_curvature, natural_step
from numpyro_lds.guides import AutoLDSGuide
from numpyro_lds.sites import unwrap

__all__ = ["NaturalGradientSVI"]


class NaturalGradientSVI(SVI):
    r"""SVI with conjugate-computation steps on the free potentials of an :class:`AutoLDSGuide`.

    Every step first moves the natural parameters ``(h_t, Λ_t)`` of every free potential
    (:mod:`numpyro_lds.conjugate`) towards the expected gradient and curvature of the
    model's log joint without its LDS priors, ``f``, under the current posterior marginals
    ``q(z_t) = N(m_t, S_t)`` (Khan & Lin 2017; Chang et al. 2020):

    .. math::

        \Lambda_t \leftarrow (1-\beta)\,\Lambda_t + \beta\,[-E_q\nabla^2_{z_t} f]_+,\qquad
        h_t \leftarrow (1-\beta)\,h_t + \beta\,(E_q\nabla_{z_t} f + [-E_q\nabla^2_{z_t} f]_+\,m_t),

    with ``β = natural_step_size``; then every other parameter (the model's, the dynamics,
    other sites' ``AutoNormal``, an encoder) takes one step of ``optim`` on ``loss``, the
    structured VAE's split into local and global updates (Johnson et al. 2016). With a
    Gaussian likelihood ``f`` is quadratic in ``z``, its curvature is constant and its
    gradient linear, and the expectations are exact: at ``β = 1`` the guide is the exact
    posterior (the Kalman smoother) after one step, from any start and in any units.

    The expectations are averaged over ``curvature_samples`` antithetic pairs of draws of
    ``q`` (``z`` and ``2m − z``): exact for a quadratic ``f``, unbiased otherwise. A
    curvature that is not negative semi-definite (a likelihood that is not log-concave,
    such as Student-t, or Monte Carlo noise) is projected: its directions of negative
    precision are set to zero precision by a modified Cholesky factorization
    (:func:`numpyro_lds.conjugate.modified_ldl`), so every ``Λ_t`` stays positive
    semi-definite; :meth:`num_clipped` counts the steps where that happened.

    ``f`` must be a sum of factors each involving one time step of an LDS site (every
    observation model of a state-space model): its per-step Hessian blocks are read off
    ``k`` Hessian-vector products. Subsampled plates update the minibatch's rows; the
    potentials are not rescaled by the plate's scale, which multiplies the likelihood and
    the KL alike.

    Args:
      model: a NumPyro model.
      guide: an :class:`AutoLDSGuide` with free potentials (no ``encoder``).
      optim: the optimizer of every other parameter, as for :class:`numpyro.infer.SVI`.
      loss: the ELBO, as for :class:`numpyro.infer.SVI` (``TraceMeanField_ELBO`` uses the
        exact KL); the losses returned are its values.
      natural_step_size: ``β`` in ``(0, 1]``. ``1`` is exact in one step for Gaussian
        likelihoods; non-conjugate likelihoods (Poisson, Bernoulli, a neural decoder)
        converge with a smaller step (``0.1``-``0.5``), which also averages the Monte
        Carlo noise of their expectations over steps.
      curvature_samples: antithetic pairs of draws per step.
      **static_kwargs: passed to the model and guide, as for :class:`numpyro.infer.SVI`.

    Raises:
      TypeError: if ``guide`` is not an :class:`AutoLDSGuide`.
      ValueError: if the guide has an ``encoder`` or no LDS site (nothing for the
        natural-gradient step to update), or on a step size outside ``(0, 1]``.

    References:
      Khan, M. E. & Lin, W. (2017). Conjugate-computation variational inference. AISTATS.
      Chang, P. E., Wilkinson, W. J., Khan, M. E. & Solin, A. (2020). Fast variational
      learning in state-space Gaussian process models. MLSP.
      Johnson, M. J. et al. (2016). Composing graphical models with neural networks for
      structured representations and fast inference. NeurIPS.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
      >>> from numpyro.infer import TraceMeanField_ELBO
      >>> from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace, NaturalGradientSVI
      >>> counts = jnp.array([[0.0], [2.0], [5.0], [3.0]])  # Poisson counts, log link
      >>> def model(y):
      ...     lds = LinearGaussianStateSpace(jnp.zeros(1), jnp.eye(1), jnp.eye(1),
      ...                                    0.1 * jnp.eye(1), num_steps=len(y))
      ...     numpyro.sample("y", dist.Poisson(jnp.exp(numpyro.sample("z", lds))).to_event(2),
      ...                    obs=y)
      >>> svi = NaturalGradientSVI(model, AutoLDSGuide(model), numpyro.optim.Adam(0.01),
      ...                          TraceMeanField_ELBO(), natural_step_size=0.5)
      >>> result = svi.run(jax.random.key(0), 20, counts, progress_bar=False)
      >>> result.losses.shape, int(svi.num_clipped(result.state))
      ((20,), 0)
    """

    def __init__(
        self,
        model,
        guide,
        optim,
        loss,
        *,
        natural_step_size=1.0,
        curvature_samples=1,
        **static_kwargs,
    ):
        if not isinstance(guide, AutoLDSGuide):
            raise TypeError(
                f"guide must be an AutoLDSGuide (whose potentials take the natural-gradient "
                f"steps), got {type(guide).__name__}"
            )
        if guide.encoder is not None:
            raise ValueError(
                "NaturalGradientSVI updates an AutoLDSGuide's free potentials, but this guide "
                "has an encoder (amortized potentials, no free ones): use numpyro.infer.SVI"
            )
        step = float(natural_step_size)
        if not 0.0 < step <= 1.0:
            raise ValueError(f"natural_step_size must be in (0, 1], got {natural_step_size}")
        if int(curvature_samples) != curvature_samples or curvature_samples < 1:
            raise ValueError(f"curvature_samples must be an int >= 1, got {curvature_samples}")
        self.natural_step_size = step
        self.curvature_samples = int(curvature_samples)
        super().__init__(model, guide, optim, loss, **static_kwargs)

    # -- state ---------------------------------------------------------------------
    def _potential_names(self):
        names = []
        for site in self.guide.lds_sites:
            names.extend(self.guide.potential_param_names(site))
        return names

    def init(self, rng_key, *args, init_params=None, **kwargs):
        """The initial state: the potentials apart, every other parameter in ``optim``."""
        state = super().init(rng_key, *args, init_params=init_params, **kwargs)
        if not self.guide.lds_sites:
            raise ValueError(
                "NaturalGradientSVI needs a model with a LinearGaussianStateSpace site; "
                "this model has none"
            )
        unconstrained = self.optim.get_params(state.optim_state)
        names = self._potential_names()
        potentials = {n: v for n, v in self.constrain_fn(unconstrained).items() if n in names}
        others = {n: v for n, v in unconstrained.items() if n not in names}
        num_clipped = jnp.zeros((), jnp.int32)
        state_parts = (self.optim.init(others), potentials, num_clipped)
        return SVIState(state_parts, state.mutable_state, state.rng_key)

    def get_params(self, svi_state):
        """Values at the ``param`` sites of the model and guide, potentials included."""
        optim_state, potentials, _ = svi_state.optim_state
        return {**self.constrain_fn(self.optim.get_params(optim_state)), **potentials}

    @staticmethod
    def num_clipped(svi_state):
        """How many potential-steps so far had curvature projected to zero precision."""
        return svi_state.optim_state[2]

    # -- the natural-gradient step ---------------------------------------------------
    def _expected_curvature(self, rng_key, params, args, kwargs):
        """``E_q ∇f``, ``E_q ∇²f`` per LDS site, with the guide trace of the first draw."""
        guide = self.guide
        keys = random.split(rng_key, self.curvature_samples)
        total_g, total_h, first = None, None, None
        for key in keys:
            seeded = handlers.seed(handlers.substitute(guide, data=params), rng_seed=key)
            trace = handlers.trace(seeded).get_trace(*args, **kwargs)
            fn = guide.log_likelihood_fn(trace, params, *args, **kwargs)
            means = {n: unwrap(trace[n]["fn"])[0].mean for n in guide.lds_sites}
            draw = {n: trace[n]["value"] for n in guide.lds_sites}
            mirrored = {n: 2 * means[n] - draw[n] for n in draw}
            for z in (draw, mirrored):
                g, h = likelihood_curvature(fn, z)
                total_g = g if total_g is None else jax.tree.map(jnp.add, total_g, g)
                total_h = h if total_h is None else jax.tree.map(jnp.add, total_h, h)
            if first is None:
                first = (trace, means)
        n = 2 * self.curvature_samples
        return (
            jax.tree.map(lambda x: x / n, total_g),
            jax.tree.map(lambda x: x / n, total_h),
            *first,
        )

    def _natural_step(self, rng_key, params, potentials, args, kwargs):
        guide = self.guide
        grads, hessians, trace, means = self._expected_curvature(rng_key, params, args, kwargs)
        new = dict(potentials)
        num_clipped = jnp.zeros((), jnp.int32)
        for name in guide.lds_sites:
            site = trace[name]
            scale = 1.0 if site["scale"] is None else site["scale"]
            rows = _subsample_rows(site, trace, guide._prototype_frame_full_sizes)
            names = guide.potential_param_names(name)
            current = {
                n: _take_rows(potentials[n], rows, guide.potential_event_dim(name, n))
                for n in names
            }
            h, lam, clipped = natural_step(
                *guide.potential_information(name, current),
                means[name],
                grads[name] / scale,
                hessians[name] / scale,
                self.natural_step_size,
                diagonal=guide.potential_form == "diagonal",
            )
            for n, v in guide.potential_params(name, h, lam).items():
                new[n] = _put_rows(potentials[n], v, rows, guide.potential_event_dim(name, n))
            num_clipped = num_clipped + jnp.sum(clipped, dtype=jnp.int32)
        return new, num_clipped

    def _step(self, svi_state, args, kwargs, forward_mode_differentiation, stable):
        rng_key, key_natural, key_loss = random.split(svi_state.rng_key, 3)
        optim_state, potentials, num_clipped = svi_state.optim_state
        kwargs = {**kwargs, **self.static_kwargs}
        params = self.get_params(svi_state)
        new_potentials, clipped = self._natural_step(key_natural, params, potentials, args, kwargs)
        if stable:
            finite = jnp.all(
                jnp.asarray([jnp.all(jnp.isfinite(v)) for v in new_potentials.values()])
            )
            new_potentials = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), new_potentials, potentials
            )

        def loss_fn(unconstrained):
            p = {**self.constrain_fn(unconstrained), **new_potentials}
            return self.loss.loss(key_loss, p, self.model, self.guide, *args, **kwargs), None

        update = self.optim.eval_and_stable_update if stable else self.optim.eval_and_update
        (loss, _), optim_state = update(
            loss_fn, optim_state, forward_mode_differentiation=forward_mode_differentiation
        )
        state = (optim_state, new_potentials, num_clipped + clipped)
        return SVIState(state, svi_state.mutable_state, rng_key), loss

    def update(self, svi_state, *args, forward_mode_differentiation=False, **kwargs):
        """One natural-gradient step on the potentials, then one ``optim`` step on the rest.

        Returns:
          ``(svi_state, loss)``: the loss is the ELBO's at the new potentials and the
          parameters before ``optim``'s step.
        """
        return self._step(svi_state, args, kwargs, forward_mode_differentiation, stable=False)

    def stable_update(self, svi_state, *args, forward_mode_differentiation=False, **kwargs):
        """As :meth:`update`, keeping the previous values where a step is not finite."""
        return self._step(svi_state, args, kwargs, forward_mode_differentiation, stable=True)


def _subsample_rows(site, trace, full_sizes):
    """``(axis_from_right, indices)`` of the site's subsampled plate, or None."""
    rows = None
    for frame in site["cond_indep_stack"]:
        full = full_sizes.get(frame.name, frame.size)
        if full != frame.size:
            if rows is not None:
                raise NotImplementedError(
                    f"LDS site {site['name']!r} is in more than one subsampled plate; "
                    "NaturalGradientSVI supports one"
                )
            rows = (frame.dim, trace[frame.name]["value"])
    return rows


def _take_rows(x, rows, event_dim):
    if rows is None:
        return x
    dim, idx = rows
    return jnp.take(x, idx, axis=x.ndim + dim - event_dim)


def _put_rows(x, value, rows, event_dim):
    if rows is None:
        return value
    dim, idx = rows
    axis = x.ndim + dim - event_dim
    index = (slice(None),) * axis + (idx,)
    return x.at[index].set(value)
