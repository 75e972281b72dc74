"""An autoguide that puts the structured Gauss–Markov posterior on every LDS site."""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack, contextmanager

import jax
import jax.numpy as jnp
import numpyro
from jax import random
from jax.scipy.special import ndtri
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform, ComposeTransform, biject_to
from numpyro.distributions.util import periodic_repeat
from numpyro.infer.autoguide import AutoGuide, AutoNormal
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import log_density
from numpyro.util import find_stack_level

from numpyro_lds.conjugate import (
    information_from_potential,
    likelihood_curvature,
    natural_step,
    potential_from_information,
    potential_root,
)
from numpyro_lds.distributions import LDSPosterior, LinearGaussianStateSpace
from numpyro_lds.sites import rewrap, unwrap

__all__ = ["AutoLDSGuide"]


class _Slow(constraints.Constraint):
    """``base``, reached through a transform scaled so that a unit step moves ``1/rate``.

    The free potentials start at their Newton step (exact for a Gaussian likelihood), and
    the size of a first-order optimizer's steps then sets how far a noisy gradient
    scatters them around the optimum. With rates 10 for ``obs`` and ``root_upper`` and 30
    for ``root_diag``, ``Adam(0.02)`` moves ``obs`` by about ``0.002`` (in units of the
    potential's own standard deviation) and ``root_diag`` by about 0.07% per step, and
    keeps the fits of ``benchmarks/adam_defaults.py`` within a quarter of a posterior sd
    (rates of 1 scattered them by up to 0.58 sd; the precision's noise moves the means too,
    by ``(potential mean - prior prediction)`` times its relative change).
    """

    def __init__(self, base, rate):
        self.base = base
        self.rate = rate
        super().__init__()

    @property
    def event_dim(self):
        return self.base.event_dim

    def __call__(self, x):
        return self.base(x)

    def feasible_like(self, prototype):
        return self.base.feasible_like(prototype)

    def tree_flatten(self):
        return (), ((), {"base": self.base, "rate": self.rate})


@biject_to.register(_Slow)
def _slow_transform(constraint):
    scale = AffineTransform(0.0, 1.0 / constraint.rate)
    return ComposeTransform([scale, biject_to(constraint.base)])


_SLOW_REAL = _Slow(constraints.real, 10.0)
_SLOW_NONNEGATIVE = _Slow(constraints.nonnegative, 30.0)


def _warn_broadcast_observations(trace):
    """Warn where an observed value's shape broadcasts the site's distribution to another shape.

    The classic case: a univariate series ``y`` of shape ``(T,)`` observed through
    ``dist.Normal(z, s).to_event(2)`` with ``z`` of shape ``(T, 1)``: the log-density is then
    summed over a ``(T, T)`` array, a finite, silently wrong number.
    """
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value_shape = jnp.shape(site["value"])
        fn_shape = tuple(site["fn"].batch_shape) + tuple(site["fn"].event_shape)
        try:
            joint = jnp.broadcast_shapes(value_shape, fn_shape)
        except ValueError:
            continue  # the model itself raises on its log-density
        if joint != fn_shape:
            warnings.warn(
                f"observed site {name!r}: its value of shape {value_shape} broadcasts the "
                f"distribution's shape {fn_shape} (batch + event) to {joint}, so its "
                "log-density is summed over values that were never observed. A univariate "
                "series must have shape [T, 1] (e.g. y[:, None]), like the LDS site's [T, k].",
                UserWarning,
                stacklevel=find_stack_level(),
            )


class AutoLDSGuide(AutoGuide):
    r"""Structured guide: :class:`~numpyro_lds.LDSPosterior` on every LDS site of a model.

    For each latent site whose distribution is a
    :class:`~numpyro_lds.LinearGaussianStateSpace` (also inside plates, with ``to_event`` or
    masks), the guide conditions *the model's own prior at that site* — built with the
    current values of whatever ``numpyro.param``\ s or latent variables it uses — on Gaussian
    potentials,

    .. math::

        q(z) \propto p_\theta(z) \prod_t \exp\big(-\tfrac12
        \lVert y_t - G_t z_t \rVert^2\big),\qquad
        G_t = \mathrm{diag}(\mathrm{root\_diag}_t)\,(I + U_t),

    with ``y = {site}_{prefix}_potential_obs``, ``root_diag = _potential_root_diag`` and, for
    ``potential_form="full"``, ``U`` the strict upper triangle of ``_potential_root_upper``
    (:meth:`potential_param_names`): potentials of precision ``GᵀG``, any positive
    semi-definite matrix (zero where the likelihood says nothing, such as a tracking
    model's velocities). With ``encoder`` the potentials are an encoder's outputs
    ``N(mean_t; z_t, diag(var_t))`` instead (the amortized structured VAE of Johnson et al.
    2016). Other latent sites get an :class:`~numpyro.infer.autoguide.AutoNormal`. With
    ``TraceMeanField_ELBO`` the LDS sites use the exact KL. When the model is
    linear-Gaussian with fixed dynamics, the optimum of this guide is the exact posterior.

    The free potentials start at one Newton step of the likelihood from the prior median
    (``init_potentials="newton"``): for a Gaussian likelihood, the exact posterior at the
    model's initial parameter values, in the data's own units. A site whose likelihood is
    not quadratic (its curvature changes one unit away: Poisson, Bernoulli, a decoder)
    starts at the ``"prior"`` potentials instead, since a Newton step from a poor start on
    an exponential rate can overshoot by orders of magnitude.
    :class:`~numpyro_lds.NaturalGradientSVI` then moves them by conjugate-computation steps
    (exact in one step for a Gaussian likelihood). With plain ``SVI``, a first-order
    optimizer's steps on them are scaled down (rates 10 and 30: ``Adam(0.02)`` moves ``y``
    by about 0.002 and ``root_diag`` by about 0.07% a step), so that one-sample gradient
    noise does not scatter a fit that starts at the optimum; the price is that Adam moves
    them slowly where their optimum moves far, as when an observation noise level is
    learned, or under a subsampled plate (whose Newton start sees only the prototype's
    minibatch, repeated over the plate): use ``NaturalGradientSVI`` there.

    Sequences of different lengths are batched by padding them to a common ``T``: the
    model masks the likelihood of the padded steps, and ``potential_mask`` removes the
    guide's potentials there. Beyond its last potential a sequence's posterior follows the
    prior's own transitions, so the padded steps add exactly nothing to the KL, and the
    real steps' moments, gradients and ``log_normalizer`` are those of the unpadded
    sequence (``tests/test_lengths.py``); only the compute of the padded steps is spent.

    Minibatches of sequences: put the LDS site in a subsampled ``numpyro.plate``. The free
    potentials are parameters of the plate's full size, of which each step uses the
    subsample's rows; the model's prior built inside the guide, the ``AutoNormal`` of other
    sites, the encoder and ``potential_mask`` run with the same rows (inside the encoder,
    ``numpyro.subsample(y, event_dim=2)`` gives the minibatch's data), and NumPyro scales
    the KL and the likelihood by the plate's size over the subsample's. To read the fit
    for every sequence afterwards, pass ``create_plates`` whose plate takes the subsample
    size from the model's arguments, and call :meth:`get_posteriors` with it set to
    ``None``.

    Args:
      model: a NumPyro model.
      encoder: optional callable ``encoder(*args, **kwargs) -> {site: (potential_mean,
        potential_var)}`` called inside the guide (register its networks there, e.g. with
        ``numpyro.contrib.module.flax_module``). Shapes: the site's ``batch_shape + [T, k]``.
        Called inside the plates around every LDS site.
      potential_mask: optional callable ``potential_mask(*args, **kwargs) -> {site: mask}``
        called inside the guide with the model's arguments: ``mask`` (bool, the site's
        ``batch_shape + [T]``) is False at steps without a potential, such as the padding
        of a shorter sequence or a step the model does not observe. Sites left out of the
        dict have a potential at every step. Called inside the plates around every LDS
        site, like ``encoder``.
      create_plates: optional callable ``create_plates(*args, **kwargs)`` returning the
        guide's ``numpyro.plate``\ s (one or a list), as for NumPyro's autoguides: for
        subsampling, a plate whose ``subsample_size`` comes from the model's arguments.
      potential_form: ``"diagonal"`` (``G_t`` diagonal) or ``"full"`` (a ``k × k``
        precision: needed for the structured optimum when the likelihood couples the state
        components, as an emission matrix that mixes them does).
      init_potentials: ``"newton"`` (above) or ``"prior"``: weak potentials of standard
        deviation ``init_scale`` at the point ``init_loc_fn`` gives. Must be concrete
        values at set-up (the Newton start checks its likelihood's curvature there).
      init_loc_fn: initialization strategy (as for NumPyro's autoguides): where the Newton
        step starts (or the ``"prior"`` potentials' centre) at LDS sites, and the initial
        locations of other sites. The default is ``init_to_median``.
      init_scale: standard deviation of the ``"prior"`` potentials. The ``AutoNormal`` for
        other sites uses at most 0.1.
      prefix: prefix of the guide's parameter names.

    Raises:
      ValueError: if ``potential_mask`` returns a mask for a site that is not an LDS site
        of the model, or one whose shape is not the site's ``batch_shape + [T]``.

    References:
      Johnson, M. J. et al. (2016). Composing graphical models with neural networks for
      structured representations and fast inference. NeurIPS.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
      >>> from numpyro.infer import SVI, TraceMeanField_ELBO
      >>> from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace
      >>> def model(y):
      ...     prior = LinearGaussianStateSpace(
      ...         jnp.zeros(1), jnp.eye(1), jnp.eye(1), 0.1 * jnp.eye(1), num_steps=y.shape[0])
      ...     z = numpyro.sample("z", prior)
      ...     numpyro.sample("y", dist.Normal(z, 0.5).to_event(2), obs=y)
      >>> guide = AutoLDSGuide(model)
      >>> svi = SVI(model, guide, numpyro.optim.Adam(0.05), TraceMeanField_ELBO())
      >>> result = svi.run(jax.random.key(0), 10, jnp.ones((20, 1)), progress_bar=False)
      >>> guide.median(result.params, jnp.ones((20, 1)))["z"].shape
      (20, 1)
    """

    def __init__(
        self,
        model,
        *,
        encoder=None,
        potential_mask=None,
        create_plates=None,
        potential_form="diagonal",
        init_potentials="newton",
        init_loc_fn=init_to_median,
        init_scale=10.0,
        prefix="auto",
    ):
        if potential_form not in ("full", "diagonal"):
            raise ValueError(f"potential_form must be 'full' or 'diagonal', got {potential_form!r}")
        if init_potentials not in ("newton", "prior"):
            raise ValueError(
                f"init_potentials must be 'newton' or 'prior', got {init_potentials!r}"
            )
        self.encoder = encoder
        self.potential_mask = potential_mask
        self.potential_form = potential_form
        self.init_potentials = init_potentials
        self._init_scale = init_scale
        self._init_potentials: dict = {}
        self._lds_sites: dict = {}
        self._other = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn, create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            prior, _ = unwrap(site["fn"])
            if isinstance(prior, LinearGaussianStateSpace):
                self._lds_sites[name] = site
        _warn_broadcast_observations(self.prototype_trace)
        self._init_potentials = {}
        self._prototype_args = (args, kwargs)
        others = [
            n
            for n, s in self.prototype_trace.items()
            if s["type"] == "sample" and not s["is_observed"] and n not in self._lds_sites
        ]
        if not self._lds_sites:
            latent = [
                f"{n} ({type(unwrap(self.prototype_trace[n]['fn'])[0]).__name__})" for n in others
            ]
            warnings.warn(
                "AutoLDSGuide found no LinearGaussianStateSpace sample site in the model "
                f"(latent sites: {', '.join(latent) or 'none'}); every latent gets an "
                "AutoNormal guide. Sample the latent trajectory from a "
                "LinearGaussianStateSpace (possibly inside plates or .to_event()) for the "
                "structured guide.",
                UserWarning,
                stacklevel=find_stack_level(),
            )
        if others:
            self._other = AutoNormal(
                handlers.block(self.model, hide=list(self._lds_sites)),
                prefix=self.prefix,
                init_loc_fn=self.init_loc_fn,
                init_scale=min(self._init_scale, 0.1),
                create_plates=self.create_plates,
            )

    def log_likelihood_fn(self, trace, params, *args, **kwargs):
        """``f(z)``: the model's log joint without its LDS sites' priors, as a function of them.

        ``z`` is ``{site: value}`` for the LDS sites; every other latent site and every plate's
        subsample take their values from ``trace`` (a trace of this guide), and the model's
        parameters from ``params``. This is the "everything in the log joint but the LDS
        prior" whose expected gradient and curvature set the potentials in the
        conjugate-computation step (:class:`~numpyro_lds.NaturalGradientSVI`).
        """
        hide = list(self._lds_sites)

        def fn(z):
            model = handlers.block(handlers.substitute(self.model, data=z), hide=hide)
            model = handlers.replay(handlers.seed(model, rng_seed=0), trace=trace)
            with handlers.block():  # seen by no handler around the caller (a guide's trace)
                return log_density(model, args, kwargs, params)[0]

        return fn

    def _initial(self, name):
        if self._init_potentials:
            return self._init_potentials[name]
        args, kwargs = self._prototype_args
        init = self._initial_potentials(*args, **kwargs)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(init)):
            self._init_potentials = init  # kept only outside a trace, where it cannot leak
        return init[name]

    def _initial_potentials(self, *args, **kwargs):
        """Initial free potentials ``{site: {param name: value}}`` of the prototype.

        ``"newton"``: one conjugate-computation step from the prior median, with the
        likelihood's gradient and curvature taken there (a Newton step on the log-likelihood;
        a Gauss–Newton step where its curvature is clipped): for a Gaussian likelihood this is
        the exact posterior at the initial parameter values, in any units. ``"prior"``: weak
        potentials of standard deviation ``init_scale`` centred on the prior median.
        """
        z0 = {name: self.prototype_trace[name]["value"] for name in self._lds_sites}
        diagonal = self.potential_form == "diagonal"
        natural = {}
        for name, z in z0.items():
            precision = jnp.broadcast_to(
                jnp.eye(z.shape[-1], dtype=z.dtype), z.shape + z.shape[-1:]
            )
            natural[name] = (z / self._init_scale**2, precision / self._init_scale**2)
        if self.init_potentials == "newton":
            params = {
                n: s["value"]
                for n, s in self.prototype_trace.items()
                if (s["type"] == "param" or (s["type"] == "sample" and not s["is_observed"]))
                and n not in self._lds_sites
            }
            fn = self.log_likelihood_fn(self.prototype_trace, params, *args, **kwargs)
            grads, hessians = likelihood_curvature(fn, z0)
            # A Newton step is exact for a quadratic log-likelihood only: from a poor start
            # on any other (an exponential rate) it can overshoot by orders of magnitude.
            # The curvature one unit away tells them apart; where it differs, the
            # potentials stay at the "prior" start.
            _, shifted = likelihood_curvature(fn, {n: z + 1.0 for n, z in z0.items()})
            for name, z in z0.items():
                quadratic = bool(jnp.allclose(shifted[name], hessians[name], rtol=1e-4, atol=1e-6))
                if not quadratic:
                    continue
                scale = self._lds_sites[name]["scale"]
                scale = 1.0 if scale is None else scale
                h, lam, _ = natural_step(
                    *natural[name], z, grads[name] / scale, hessians[name] / scale, 1.0, diagonal
                )
                natural[name] = (h, lam)
        out = {}
        for name, site in self._lds_sites.items():
            values = self.potential_params(name, *natural[name])
            # Free potentials are parameters of the full size of every plate (subsampled
            # plates take their rows): the prototype's initial values are repeated to it.
            for frame in site["cond_indep_stack"]:
                full_size = self._prototype_frame_full_sizes[frame.name]
                if full_size != frame.size:
                    values = {
                        n: periodic_repeat(
                            v, full_size, frame.dim - self.potential_event_dim(name, n)
                        )
                        for n, v in values.items()
                    }
            out[name] = values
        return out

    def potential_param_names(self, name):
        """Names of the free potentials' parameters at LDS site ``name``.

        ``{site}_{prefix}_potential_obs`` (``y [..., T, k]``), ``_potential_root_diag``
        (``[..., T, k]``, positive or zero) and, for ``potential_form="full"``,
        ``_potential_root_upper`` (``[..., T, k, k]``, of which the strict upper triangle is
        used): the potential is ``exp(-½ ‖y_t - G_t z_t‖²)`` with
        ``G_t = diag(root_diag_t) (I + U_t)``, ``U_t`` the strict upper triangle of
        ``root_upper_t``: precision ``G_tᵀ G_t`` and information ``G_tᵀ y_t``.
        """
        names = [f"{name}_{self.prefix}_potential_{p}" for p in ("obs", "root_diag")]
        if self.potential_form == "full":
            names.append(f"{name}_{self.prefix}_potential_root_upper")
        return tuple(names)

    def potential_params(self, name, information, precision):
        """``{param name: value}`` of site ``name``'s potentials with natural parameters.

        ``information`` is ``h`` and ``precision`` is ``Λ``, which is projected onto the
        positive semi-definite matrices.
        """
        diagonal = self.potential_form == "diagonal"
        obs, root_diag, root_upper = potential_from_information(
            information, precision, diagonal=diagonal
        )
        values = (obs, root_diag) if diagonal else (obs, root_diag, root_upper)
        return dict(zip(self.potential_param_names(name), values, strict=True))

    def potential_information(self, name, params):
        """Natural parameters ``(h, Λ)`` of site ``name``'s potentials in ``params``."""
        return information_from_potential(*(params[n] for n in self.potential_param_names(name)))

    @property
    def lds_sites(self) -> list[str]:
        """Names of the model's LDS sites, each with an ``LDSPosterior`` in the guide.

        Empty until the guide has seen the model (its first call or ``svi.init``).
        """
        return list(self._lds_sites)

    def potential_event_dim(self, name, param_name):
        """The number of per-sequence (trailing) dims of potential parameter ``param_name``.

        For LDS site ``name``; its plates' dims come before them.
        """
        event_dim = self._lds_sites[name]["fn"].event_dim
        return event_dim + 1 if param_name.endswith("_root_upper") else event_dim

    def _model_priors(self, values, indices, *args, **kwargs):
        """The model's distributions at the LDS sites, given the other latents' values.

        Samples stay inside (blocked, seeded locally); parameters pass through, so the
        priors use the current parameter values; subsampled plates take the guide's indices.
        """
        data = {**values, **indices}
        model = handlers.substitute(handlers.seed(self.model, rng_seed=0), data=data)
        with handlers.block(hide_fn=lambda msg: msg["type"] != "param"):
            trace = handlers.trace(model).get_trace(*args, **kwargs)
        return {name: trace[name]["fn"] for name in self._lds_sites}

    def _potentials(self, name, encoded):
        """Free potentials (called inside the site's plates) or the encoder's."""
        if encoded is not None:
            mean, var = encoded[name]
            return {"potential_mean": mean, "potential_var": var}
        # Lazy initial values: computed (once) only where the parameters are not given.
        values = []
        for param_name in self.potential_param_names(name):
            constraint = _SLOW_NONNEGATIVE if param_name.endswith("_root_diag") else _SLOW_REAL
            values.append(
                numpyro.param(
                    param_name,
                    lambda _, n=param_name: self._initial(name)[n],
                    constraint=constraint,
                    event_dim=self.potential_event_dim(name, param_name),
                )
            )
        obs, root = values[0], potential_root(*values[1:])
        if root.ndim == obs.ndim:  # diagonal
            root = root[..., :, None] * jnp.eye(root.shape[-1], dtype=root.dtype)
        return {"potential_mean": obs, "potential_var": jnp.ones_like(obs), "emission_matrix": root}

    @staticmethod
    @contextmanager
    def _in_plates(plates, frames):
        """Run the code inside under the plates of ``frames``."""
        with ExitStack() as stack:
            for frame in frames:
                stack.enter_context(plates[frame.name])
            yield

    def _shared_frames(self):
        """The plates around every LDS site: the encoder and ``potential_mask`` run in them."""
        stacks = [site["cond_indep_stack"] for site in self._lds_sites.values()]
        return [f for f in stacks[0] if all(f in s for s in stacks[1:])] if stacks else []

    def _posteriors(self, plates, *args, **kwargs):
        """Sample the non-LDS sites, then build the LDS sites' guide distributions."""
        indices = {}
        for name, plate in plates.items():
            with plate as idx:
                indices[name] = idx
        values = {}
        if self._other is not None:
            values = handlers.substitute(self._other, data=indices)(*args, **kwargs)
        with self._in_plates(plates, self._shared_frames()):
            encoded = self.encoder(*args, **kwargs) if self.encoder is not None else None
            masks = self._masks(*args, **kwargs)
        out = {}
        for name, fn in self._model_priors(values, indices, *args, **kwargs).items():
            prior, wrappers = unwrap(fn)
            with self._in_plates(plates, self._lds_sites[name]["cond_indep_stack"]):
                potentials = self._potentials(name, encoded)
            mask = masks.get(name)
            expected = prior.batch_shape + prior.event_shape[:1]
            if mask is not None and jnp.shape(mask) != expected:
                raise ValueError(
                    f"potential_mask for site {name!r} must have shape {expected} (the site's "
                    f"batch_shape + [T]), got {jnp.shape(mask)}"
                )
            q = LDSPosterior(prior, **potentials, mask=mask)
            out[name] = rewrap(q, wrappers)
        return values, out

    def _masks(self, *args, **kwargs):
        """``potential_mask``'s masks by site, checked against the model's LDS sites."""
        if self.potential_mask is None:
            return {}
        masks = dict(self.potential_mask(*args, **kwargs))
        unknown = sorted(set(masks) - set(self._lds_sites))
        if unknown:
            raise ValueError(
                f"potential_mask returned masks for {unknown}, which are not LDS sites of the "
                f"model; its LDS sites are {sorted(self._lds_sites)}"
            )
        return masks

    def __call__(self, *args, **kwargs):
        """Sample every latent site of the model from the guide; returns ``{name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result, posteriors = self._posteriors(plates, *args, **kwargs)
        for name, q in posteriors.items():
            with self._in_plates(plates, self._lds_sites[name]["cond_indep_stack"]):
                result[name] = numpyro.sample(name, q)
        return result

    def get_posteriors(self, params, *args, **kwargs):
        """``{site: LDSPosterior}`` (with the site's wrappers) at ``params``."""
        guide = handlers.substitute(handlers.seed(self, rng_seed=0), data=params)
        trace = handlers.trace(guide).get_trace(*args, **kwargs)
        return {name: trace[name]["fn"] for name in self._lds_sites}

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Joint draws of every latent site, each of shape ``sample_shape + site shape``."""
        n = math.prod(sample_shape)

        def one(key):
            guide = handlers.substitute(handlers.seed(self, rng_seed=key), data=params)
            trace = handlers.trace(guide).get_trace(*args, **kwargs)
            return {
                k: s["value"]
                for k, s in trace.items()
                if s["type"] == "sample" and not s["is_observed"]
            }

        draws = jax.vmap(one)(random.split(rng_key, n))
        return jax.tree.map(lambda x: x.reshape(tuple(sample_shape) + x.shape[1:]), draws)

    def _lds_marginals(self, params, *args, **kwargs):
        out = {}
        for name, q in self.get_posteriors(params, *args, **kwargs).items():
            base, _ = unwrap(q)
            out[name] = (base.mean, jnp.sqrt(base.variance))
        return out

    def median(self, params, *args, **kwargs):
        """Posterior medians: the smoothed means for LDS sites (pass the model's arguments)."""
        result = self._other.median(params) if self._other is not None else {}
        result.update({k: m for k, (m, _) in self._lds_marginals(params, *args, **kwargs).items()})
        return result

    def quantiles(self, params, quantiles, *args, **kwargs):
        """Marginal quantiles, shape ``[len(quantiles), ...]`` per site."""
        quantiles = jnp.asarray(quantiles)
        result = self._other.quantiles(params, quantiles) if self._other is not None else {}
        for k, (m, sd) in self._lds_marginals(params, *args, **kwargs).items():
            z = ndtri(quantiles).reshape((-1,) + (1,) * m.ndim)
            result[k] = m + sd * z
        return result
