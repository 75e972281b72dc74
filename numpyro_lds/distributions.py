"""NumPyro distributions over LDS trajectories: the prior and the structured posterior."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from numpyro.distributions import constraints
from numpyro.distributions.batch_util import promote_batch_shape, vmap_over
from numpyro.distributions.distribution import Distribution
from numpyro.distributions.util import validate_sample

from numpyro_lds._batch import jit_batch_map
from numpyro_lds.chains import (
    GaussMarkovChain,
    Moments,
    chain_entropy,
    chain_log_prob,
    chain_moments,
    chain_sample,
)
from numpyro_lds.expectations import expected_potential_log_prob
from numpyro_lds.kalman import condition_on_potentials
from numpyro_lds.linalg import tracing
from numpyro_lds.posterior import posterior_log_prob, posterior_sample, posterior_stats
from numpyro_lds.potentials import Potentials
from numpyro_lds.schedules import check_schedule, resolve_schedule

__all__ = ["LDSPosterior", "LinearGaussianStateSpace"]

# per-sequence (event) ndims of each field, the structure batch_map expects
_CHAIN_NDIMS = GaussMarkovChain._make((1, 2, 3, 2, 3))
_POTENTIAL_NDIMS = Potentials._make((2, 3, 3, 1))
_DIAGONAL_POTENTIAL_NDIMS = Potentials._make((2, 2, 3, 1))


# --------------------------------------------------------------------------- checks


def _as_float(name, x):
    """Convert to a floating array; integers are promoted, other dtypes are rejected."""
    if isinstance(x, Distribution):
        raise TypeError(f"{name} must be an array, got a {type(x).__name__} distribution")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.bool_) or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    elif x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"{name} has dtype {x.dtype}; supported: float32 and float64 (integers are "
            "promoted to JAX's default float)"
        )
    return x


class _FinitePositive(constraints._GreaterThan):
    """``0 < x < inf``: NumPyro's ``positive`` lets ``+inf`` through.

    An infinite potential variance turns every output into NaN.
    """

    def __init__(self):
        super().__init__(0.0)

    def __call__(self, x):
        return (x > 0) & jnp.isfinite(x)


_finite_positive = _FinitePositive()


def _shape_error(name, shape, expected):
    return ValueError(f"{name} must have shape {expected}, got shape {tuple(shape)}")


def _broadcast_batch(named_batch_shapes):
    try:
        return tuple(jnp.broadcast_shapes(*[s for _, s in named_batch_shapes]))
    except ValueError:
        listed = ", ".join(f"{n}: {tuple(s)}" for n, s in named_batch_shapes)
        raise ValueError(f"batch shapes of the arguments do not broadcast ({listed})") from None


class _PriorShapes(NamedTuple):
    batch_shape: tuple
    num_steps: int
    state_dim: int
    matrix: tuple  # normalized shapes, with a time axis
    cov: tuple
    offset: tuple


def _concrete_num_steps(num_steps) -> int:
    """``num_steps`` as a Python int, from any concrete integer scalar.

    ``int``, ``np.int64`` or a 0-d ``jnp.int32`` array; a traced value is refused, as ``T``
    fixes the scan's length.
    """
    if isinstance(num_steps, jax.core.Tracer):
        raise TypeError(
            "num_steps must be a concrete integer, got a traced value (the sequence length "
            "fixes array shapes, so it cannot be a jit argument: pass it as a static "
            "argument or close over a Python int)"
        )
    dtype = getattr(num_steps, "dtype", None)
    is_int = isinstance(num_steps, (int, np.integer)) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer) and np.ndim(num_steps) == 0
    )
    if isinstance(num_steps, bool) or not is_int:  # bool is an int subclass
        shape = f" of shape {np.shape(num_steps)} and dtype {dtype}" if dtype is not None else ""
        raise TypeError(
            f"num_steps must be an integer scalar, got {type(num_steps).__name__}{shape}"
        )
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps


def _prior_shapes(shapes: Mapping[str, Sequence[int]], num_steps) -> _PriorShapes:
    """Resolve ``T``, ``k`` and the batch shape from argument shapes, or raise ValueError.

    ``shapes`` maps the constructor's array arguments' names to their shapes;
    ``transition_offset`` may be absent or None.
    """
    mean, cov0, matrix, cov = (
        tuple(shapes[n])
        for n in ("initial_mean", "initial_cov", "transition_matrix", "transition_cov")
    )
    offset = shapes.get("transition_offset")
    if len(mean) < 1:
        raise _shape_error("initial_mean", mean, "[..., k]")
    k = mean[-1]
    if k < 1:
        raise _shape_error("initial_mean", mean, "[..., k] with k >= 1")
    if len(cov0) < 2 or cov0[-2:] != (k, k):
        raise _shape_error("initial_cov", cov0, f"[..., {k}, {k}] (k={k} from initial_mean)")
    offset = (k,) if offset is None else tuple(offset)
    norm = {}
    for name, shape, event in (
        ("transition_matrix", matrix, (k, k)),
        ("transition_cov", cov, (k, k)),
        ("transition_offset", offset, (k,)),
    ):
        e = len(event)
        expected = f"{list(event)} or [..., T-1 or 1, {', '.join(map(str, event))}] (k={k})"
        if len(shape) < e or shape[-e:] != event:
            raise _shape_error(name, shape, expected)
        norm[name] = (1,) + shape if len(shape) == e else shape
    # the time axis sits just before the event dims: -3 for matrices, -2 for the offset
    lengths = {
        n: s[-3] if len(s) >= 3 and n != "transition_offset" else s[-2] for n, s in norm.items()
    }
    if num_steps is not None:
        num_steps = _concrete_num_steps(num_steps)
    explicit = {n: t for n, t in lengths.items() if t != 1}
    if explicit:
        if num_steps is None:
            num_steps = next(iter(explicit.values())) + 1
        for n, t_n in explicit.items():
            if t_n != num_steps - 1:
                pos = -2 if n == "transition_offset" else -3
                raise ValueError(
                    f"{n} has shape {norm[n]} with a time axis (position {pos}) of length "
                    f"{t_n}; expected T-1 = {num_steps - 1} or 1 (T = {num_steps})"
                )
    elif num_steps is None:
        raise ValueError(
            "num_steps is required when no transition argument has a time axis of length T-1"
        )
    batch_shape = _broadcast_batch(
        [
            ("initial_mean", mean[:-1]),
            ("initial_cov", cov0[:-2]),
            ("transition_matrix", norm["transition_matrix"][:-3]),
            ("transition_cov", norm["transition_cov"][:-3]),
            ("transition_offset", norm["transition_offset"][:-2]),
        ]
    )
    return _PriorShapes(
        batch_shape,
        num_steps,
        k,
        norm["transition_matrix"],
        norm["transition_cov"],
        norm["transition_offset"],
    )


class _PosteriorShapes(NamedTuple):
    batch_shape: tuple
    potential_dim: int
    emission: tuple | None


def _posterior_shapes(
    prior_shape: Sequence[int], shapes: Mapping[str, Sequence[int] | None]
) -> _PosteriorShapes:
    """Check the potentials' shapes against ``T`` and ``k``, or raise ValueError.

    ``prior_shape`` is the prior's ``batch_shape + (T, k)``; ``shapes`` maps the constructor's
    array arguments' names to their shapes (an absent or None one was not given).
    """
    prior_shape = tuple(prior_shape)
    if len(prior_shape) < 2:
        raise ValueError(f"prior's shape must be batch_shape + (T, k), got {prior_shape}")
    prior_batch, (T, k) = prior_shape[:-2], prior_shape[-2:]
    mean, cov, var, emission, mask = (
        shapes.get(n)
        for n in ("potential_mean", "potential_cov", "potential_var", "emission_matrix", "mask")
    )
    if mean is None:
        raise ValueError("potential_mean is required")
    mean = tuple(mean)
    if len(mean) < 2 or mean[-2] != T or mean[-1] < 1:
        raise _shape_error("potential_mean", mean, f"[..., {T}, d] (T={T} from prior)")
    d = mean[-1]
    if (cov is None) == (var is None):
        raise ValueError(
            "exactly one of potential_cov [..., T, d, d] or potential_var [..., T, d] "
            f"must be given, got {'both' if cov is not None else 'neither'}"
        )
    named = [("prior", tuple(prior_batch)), ("potential_mean", mean[:-2])]
    if cov is not None:
        cov = tuple(cov)
        if len(cov) < 3 or cov[-3:] != (T, d, d):
            raise _shape_error("potential_cov", cov, f"[..., {T}, {d}, {d}] (T={T}, d={d})")
        named.append(("potential_cov", cov[:-3]))
    elif var is not None:
        var = tuple(var)
        if len(var) < 2 or var[-2:] != (T, d):
            raise _shape_error("potential_var", var, f"[..., {T}, {d}] (T={T}, d={d})")
        named.append(("potential_var", var[:-2]))
    if emission is None:
        if d != k:
            raise ValueError(
                f"emission_matrix [{d}, {k}] is required when the potential dimension "
                f"d={d} differs from the state dimension k={k}"
            )
    else:
        emission = tuple(emission)
        expected = f"[{d}, {k}] or [..., {T} or 1, {d}, {k}] (d={d}, k={k}, T={T})"
        if len(emission) < 2 or emission[-2:] != (d, k):
            raise _shape_error("emission_matrix", emission, expected)
        if len(emission) == 2:
            emission = (1,) + emission
        if emission[-3] not in (1, T):
            raise _shape_error("emission_matrix", emission, expected)
        named.append(("emission_matrix", emission[:-3]))
    if mask is not None:
        mask = tuple(mask)
        if len(mask) < 1 or mask[-1] != T:
            raise _shape_error("mask", mask, f"[..., {T}] (T={T})")
        named.append(("mask", mask[:-1]))
    return _PosteriorShapes(_broadcast_batch(named), d, emission)


# ---------------------------------------------------------------------- base class


class _ChainDistribution(Distribution):
    """Shared behaviour of distributions that are Gauss–Markov chains over ``[T, k]``.

    Subclasses provide ``_core_args`` (the arrays and their per-sequence ndims) and
    ``_single_chain`` (the chain of one sequence). Everything else is generic, except that
    a backward chain (``LDSPosterior``) supplies its own moments, draws and log-density.
    """

    support = constraints.real_matrix
    pytree_aux_fields = ("schedule",)
    schedule: str | None = None

    def get_args(self):
        return {k: v for k, v in super().get_args().items() if v is not None}

    # -- per-sequence pieces, batched by batch_map --------------------------------
    def _core_args(self):
        raise NotImplementedError

    @classmethod
    def _single_chain(cls, args, num_steps, schedule):
        raise NotImplementedError

    @classmethod
    def _single_moments(cls, args, num_steps, schedule) -> Moments:
        return chain_moments(cls._single_chain(args, num_steps, schedule), num_steps, schedule)

    @classmethod
    def _single_entropy(cls, args, num_steps, schedule):
        return chain_entropy(cls._single_chain(args, num_steps, schedule), num_steps)

    def sequence_args(self):
        """The per-sequence arrays of the core functions, and their event ndims.

        Returns:
          ``(args, event_ndims)`` with ``args = (chain, potentials)``: the
          :class:`~numpyro_lds.chains.GaussMarkovChain` of the (prior) dynamics, and the
          :class:`~numpyro_lds.potentials.Potentials` it is conditioned on, ``None`` for a
          prior. Leaves carry ``batch_shape`` (or none, where shared); ``event_ndims``
          has the structure of ``args`` and gives each leaf's per-sequence ndims, as
          ``numpyro_lds._batch.batch_map`` takes them.
        """
        raise NotImplementedError

    def _noise_shape(self):
        """Shape of the standard normals behind one draw of one sequence."""
        return self.event_shape

    @classmethod
    def _single_draw(cls, args, num_steps, schedule):
        """The map from one draw's standard normals (``_noise_shape()``) to a path."""
        chain = cls._single_chain(args, num_steps, schedule)
        return lambda e: chain_sample(chain, e, schedule)

    @classmethod
    def _single_sample(cls, args, eps, num_steps, schedule):
        """Paths for standard normals ``eps [S, *_noise_shape()]``."""
        draw = cls._single_draw(args, num_steps, schedule)
        # Several draws are a batch to the small-k products (see linalg.matmul).
        with tracing(batched=eps.shape[0] > 1):
            return jax.vmap(draw)(eps)

    def _resolved_schedule(self) -> str:
        return resolve_schedule(self.schedule)

    def _map(self, fn):
        """Apply single-sequence ``fn(args, num_steps, schedule)`` over the batch."""
        args, ndims = self._core_args()
        return jit_batch_map(
            fn, self.batch_shape, (args,), (ndims,), self.num_steps, self._resolved_schedule()
        )

    def _moments(self) -> Moments:
        return self._map(type(self)._single_moments)

    # -- public API -----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """``T``, the number of time steps."""
        return self.event_shape[0]

    @property
    def mean(self):
        """Marginal means ``E[z_t]``, shape ``batch_shape + [T, k]``."""
        return self._moments().means

    @property
    def variance(self):
        """Marginal variances (diagonal of ``Cov(z_t)``), shape ``batch_shape + [T, k]``."""
        return jnp.diagonal(self._moments().covs, axis1=-2, axis2=-1)

    @property
    def marginal_covariance(self):
        """Marginal covariances ``Cov(z_t)``, shape ``batch_shape + [T, k, k]``."""
        return self._moments().covs

    @property
    def cross_covariance(self):
        """Lag-one cross-covariances ``Cov(z_{t+1}, z_t)``, shape ``batch_shape + [T-1, k, k]``."""
        return self._moments().cross_covs

    def expand(self, batch_shape):
        """Same distribution with a larger batch shape; parameters broadcast lazily.

        Every computation broadcasts the parameters to ``batch_shape``, so only the shape
        is recorded; nothing is copied.
        """
        batch_shape = tuple(batch_shape)
        try:
            new = lax.broadcast_shapes(batch_shape, self.batch_shape)
        except ValueError:
            new = None
        if new != batch_shape:
            raise ValueError(f"cannot expand batch shape {self.batch_shape} to {batch_shape}")
        out = jax.tree.map(lambda x: x, self)
        out._batch_shape = batch_shape
        return out

    def entropy(self):
        """Joint entropy of the trajectory, shape ``batch_shape``."""
        return self._map(type(self)._single_entropy)

    def sample(self, key, sample_shape=()):
        """Reparametrized draw of shape ``sample_shape + batch_shape + [T, k]``."""
        sample_shape = tuple(sample_shape)
        dtype = jnp.result_type(*jax.tree.leaves(self._core_args()[0]))
        eps = random.normal(key, sample_shape + self.batch_shape + self._noise_shape(), dtype)
        return self._map_draws(type(self)._single_sample, eps, sample_shape)

    def _map_draws(self, fn, draws, sample_shape):
        """Apply single-sequence ``fn(args, draws, num_steps, schedule)`` to ``draws``.

        ``draws`` has shape ``sample_shape + batch_shape + tail``; ``fn`` gets ``[S, *tail]``.
        """
        n_s, n_b = len(sample_shape), len(self.batch_shape)
        # [S..., B..., tail] -> [B..., S, tail]: the samples are part of each sequence's work.
        draws = jnp.moveaxis(draws.reshape((-1,) + draws.shape[n_s:]), 0, n_b)
        args, ndims = self._core_args()
        out = jit_batch_map(
            fn,
            self.batch_shape,
            (args, draws),
            (ndims, draws.ndim - n_b),
            self.num_steps,
            self._resolved_schedule(),
        )
        out = jnp.moveaxis(out, n_b, 0)
        return out.reshape(sample_shape + out.shape[1:])

    def _checked_value(self, value):
        value = jnp.asarray(value)
        if value.shape[-2:] != self.event_shape:
            raise _shape_error(
                "value", value.shape, f"[..., {self.num_steps}, {self.event_shape[1]}]"
            )
        try:
            jnp.broadcast_shapes(value.shape[:-2], self.batch_shape)
        except ValueError:
            raise ValueError(
                f"value's batch shape {value.shape[:-2]} (of shape {value.shape}) does not "
                f"broadcast with the distribution's batch_shape {self.batch_shape}"
            ) from None
        return value

    @validate_sample
    def log_prob(self, value):
        """Log-density of trajectories ``value`` of shape ``[..., T, k]``."""
        value = self._checked_value(value)
        lp = chain_log_prob(self._map(type(self)._single_chain), value)
        return jnp.broadcast_to(lp, lax.broadcast_shapes(value.shape[:-2], self.batch_shape))


# --------------------------------------------------------------------------- prior


class LinearGaussianStateSpace(_ChainDistribution):
    r"""Linear-Gaussian state-space (LDS) prior over a latent trajectory ``z`` of shape ``[T, k]``.

    .. math::

        z_1 &\sim \mathcal N(\mathrm{initial\_mean},\ \mathrm{initial\_cov}), \\
        z_t \mid z_{t-1} &\sim \mathcal N(A_{t} z_{t-1} + b_{t},\ Q_{t}), \qquad t = 2, \dots, T,

    with :math:`A` = ``transition_matrix``, :math:`b` = ``transition_offset`` and
    :math:`Q` = ``transition_cov``.

    Shapes:
      ``initial_mean [..., k]``, ``initial_cov [..., k, k]``. A transition argument is
      either shared over time and batch (``[k, k]``; offset ``[k]``) or carries a time axis
      in position -3 (offset: -2) of length ``T - 1``, or 1 to share it over time:
      ``[..., T-1 or 1, k, k]``. ``event_shape == (T, k)``; ``batch_shape`` is the broadcast
      of the arguments' leading dimensions. Transition arguments are stored with their
      time axis.

    Args:
      initial_mean: mean of ``z_1``.
      initial_cov: covariance of ``z_1``. Every covariance argument is used through its
        symmetric part ``(P + Pᵀ) / 2``; validation rejects a non-symmetric value wherever
        it sees one (eagerly, or a constant under ``jit``), and a traced or unvalidated
        one is symmetrized, not an error.
      transition_matrix: ``A``.
      transition_cov: process-noise covariance ``Q``.
      transition_offset: ``b``; zero if omitted.
      num_steps: ``T``. Required when no argument has a time axis of length ``T - 1``;
        must agree when one does.
      schedule: how recursions over time run: ``"sequential"`` (a scan), ``"parallel"``
        (parallel-in-time prefix scan, ``O(log T)`` depth; for GPUs and long sequences) or
        ``"blocked"`` (two-level scan). Same results; None picks by backend
        (sequential on CPU, parallel on GPU/TPU). See the performance page.
      validate_args: check positive definiteness and finiteness of the arguments.

    Raises:
      ValueError: on inconsistent shapes (naming the argument, the shape received and the
        shape expected) and, with ``validate_args``, on invalid values.
      TypeError: on non-floating arguments or a non-integer ``num_steps``.
      ValueError: on an unknown ``schedule``.

    References:
      Särkkä, S. (2013). *Bayesian Filtering and Smoothing*. Cambridge University Press.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax import random
      >>> from numpyro_lds import LinearGaussianStateSpace
      >>> prior = LinearGaussianStateSpace(
      ...     jnp.zeros(2), jnp.eye(2), 0.9 * jnp.eye(2), 0.1 * jnp.eye(2), num_steps=50)
      >>> prior.event_shape
      (50, 2)
      >>> z = prior.sample(random.key(0))
      >>> prior.log_prob(z).shape
      ()
    """

    arg_constraints = {
        "initial_mean": constraints.real_vector,
        "initial_cov": constraints.positive_definite,
        "transition_matrix": constraints.real,
        "transition_cov": constraints.positive_definite,
        "transition_offset": constraints.real,
    }
    reparametrized_params = [
        "initial_mean",
        "initial_cov",
        "transition_matrix",
        "transition_cov",
        "transition_offset",
    ]
    pytree_data_fields = (
        "initial_mean",
        "initial_cov",
        "transition_matrix",
        "transition_cov",
        "transition_offset",
    )

    def __init__(
        self,
        initial_mean,
        initial_cov,
        transition_matrix,
        transition_cov,
        transition_offset=None,
        *,
        num_steps=None,
        schedule=None,
        validate_args=None,
    ):
        # Constants captured under jit stay concrete through the conversions, so that
        # validation checks their values there too, as NumPyro's own distributions do.
        with jax.ensure_compile_time_eval():
            args = {
                "initial_mean": initial_mean,
                "initial_cov": initial_cov,
                "transition_matrix": transition_matrix,
                "transition_cov": transition_cov,
            }
            if transition_offset is not None:
                args["transition_offset"] = transition_offset
            args = {n: _as_float(n, v) for n, v in args.items()}
            dtype = jnp.result_type(*args.values())
            args = {n: v.astype(dtype) for n, v in args.items()}
            shapes = _prior_shapes({n: v.shape for n, v in args.items()}, num_steps)
            k = shapes.state_dim
            self.initial_mean = args["initial_mean"]
            self.initial_cov = args["initial_cov"]
            self.transition_matrix = args["transition_matrix"].reshape(shapes.matrix)
            self.transition_cov = args["transition_cov"].reshape(shapes.cov)
            self.transition_offset = (
                jnp.zeros((1, k), dtype)
                if transition_offset is None
                else args["transition_offset"].reshape(shapes.offset)
            )
            self.schedule = check_schedule(schedule)
            super().__init__(shapes.batch_shape, (shapes.num_steps, k), validate_args=validate_args)

    @classmethod
    def infer_shapes(cls, *args, **kwargs):
        """``(batch_shape, event_shape)`` from the arguments' shapes.

        Takes the arguments as the constructor does, by position or by name, with each array
        replaced by its shape and ``num_steps`` as it is (an int or None).
        """
        given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
        shapes = _prior_shapes(given, given.get("num_steps"))
        return shapes.batch_shape, (shapes.num_steps, shapes.state_dim)

    def _core_args(self):
        chain = GaussMarkovChain(
            self.initial_mean,
            self.initial_cov,
            self.transition_matrix,
            self.transition_offset,
            self.transition_cov,
        )
        return chain, _CHAIN_NDIMS

    def sequence_args(self):  # noqa: D102 (documented on the base class)
        chain, ndims = self._core_args()
        return (chain, None), (ndims, None)

    @classmethod
    def _single_chain(cls, args, num_steps, schedule):
        return args


# ----------------------------------------------------------------------- posterior


class LDSPosterior(_ChainDistribution):
    r"""Structured Gauss–Markov posterior: an LDS prior conditioned on Gaussian potentials.

    .. math::

        q(z) \propto \mathrm{prior}(z) \prod_{t:\ \mathrm{mask}_t}
            \mathcal N(\mathrm{potential\_mean}_t;\ H_t z_t,\ R_t),

    with :math:`H` = ``emission_matrix`` (identity by default) and :math:`R_t` =
    ``potential_cov`` (or ``diag(potential_var)``). The potentials are free parameters or
    an encoder's outputs (the structured VAE of Johnson et al. 2016). Moments come from a
    Kalman filter and RTS smoother; samples from Durbin & Koopman's simulation smoother (a
    prior path plus a smoothed mean: :func:`numpyro_lds.posterior.posterior_sample`),
    reparametrized and differentiable in every input.

    Shapes:
      ``prior``: a :class:`LinearGaussianStateSpace` with ``event_shape (T, k)``;
      ``potential_mean [..., T, d]``; exactly one of ``potential_cov [..., T, d, d]`` or
      ``potential_var [..., T, d]``; ``emission_matrix [d, k]`` or
      ``[..., T or 1, d, k]`` (required when ``d != k``); ``mask [..., T]`` bool.

    Args:
      prior: the LDS prior that the potentials condition.
      potential_mean: pseudo-observations ``y_t``.
      potential_cov: their full covariances ``R_t`` (symmetric; used through their
        symmetric part, as the prior's covariances).
      potential_var: their variances (diagonal ``R_t``), kept as ``[T, d]`` throughout: never
        stored, factorized or differentiated as ``d × d`` matrices (the Kalman update adds
        them to the diagonal of its innovation covariance); faster and smaller than the
        same potentials as ``potential_cov``, and an encoder's usual output.
      emission_matrix: ``H``.
      mask: False where a step has no potential.
      schedule: as for :class:`LinearGaussianStateSpace`; None takes the prior's.
      validate_args: check positive definiteness and finiteness of the arguments.

    Raises:
      ValueError: on inconsistent shapes, both or neither of ``potential_cov`` and
        ``potential_var``, and, with ``validate_args``, invalid values.
      TypeError: on a non-distribution ``prior``, a non-boolean ``mask`` or non-floating
        arrays.

    References:
      Särkkä, S. (2013). *Bayesian Filtering and Smoothing*. Cambridge University Press.
      Johnson, M. J. et al. (2016). Composing graphical models with neural networks for
      structured representations and fast inference. NeurIPS.

    Examples:
      >>> import jax.numpy as jnp
      >>> from numpyro_lds import LDSPosterior, LinearGaussianStateSpace
      >>> prior = LinearGaussianStateSpace(
      ...     jnp.zeros(1), jnp.eye(1), jnp.eye(1), 0.1 * jnp.eye(1), num_steps=3)
      >>> q = LDSPosterior(prior, jnp.ones((3, 1)), potential_var=jnp.full((3, 1), 0.5))
      >>> q.mean.shape
      (3, 1)
      >>> bool(q.kl_to_prior() > 0)
      True
    """

    # Every positional argument of the constructor has an entry (NumPyro's generic tests
    # look each one up); the prior is a distribution, checked by its own constraints.
    arg_constraints = {
        "prior": constraints.dependent,
        "potential_mean": constraints.independent(constraints.real, 2),
        "potential_cov": constraints.positive_definite,
        "potential_var": _finite_positive,
        "emission_matrix": constraints.real,
    }
    # The draw is differentiable in the prior too (a prior path plus a smoothed mean).
    reparametrized_params = [
        "prior",
        "potential_mean",
        "potential_cov",
        "potential_var",
        "emission_matrix",
    ]
    pytree_data_fields = (
        "prior",
        "potential_mean",
        "potential_cov",
        "potential_var",
        "emission_matrix",
        "potential_mask",
    )

    def __init__(
        self,
        prior,
        potential_mean,
        potential_cov=None,
        *,
        potential_var=None,
        emission_matrix=None,
        mask=None,
        schedule=None,
        validate_args=None,
    ):
        if not isinstance(prior, LinearGaussianStateSpace):
            raise TypeError(f"prior must be a LinearGaussianStateSpace, got {type(prior).__name__}")
        with jax.ensure_compile_time_eval():  # as in LinearGaussianStateSpace
            T, k = prior.event_shape
            arrays = {
                "potential_mean": potential_mean,
                "potential_cov": potential_cov,
                "potential_var": potential_var,
                "emission_matrix": emission_matrix,
            }
            arrays = {n: None if v is None else _as_float(n, v) for n, v in arrays.items()}
            if mask is not None:
                mask = jnp.asarray(mask)
                if mask.dtype != jnp.bool_:
                    raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
            given = {n: v.shape for n, v in arrays.items() if v is not None}
            if mask is not None:
                given["mask"] = mask.shape
            shapes = _posterior_shapes(prior.shape(), given)
            dtype = prior.initial_mean.dtype
            arrays = {n: None if v is None else v.astype(dtype) for n, v in arrays.items()}
            self.prior = prior
            self.potential_mean = arrays["potential_mean"]
            self.potential_cov = arrays["potential_cov"]
            self.potential_var = arrays["potential_var"]
            self.emission_matrix = (
                None
                if shapes.emission is None
                else arrays["emission_matrix"].reshape(shapes.emission)
            )
            self.potential_mask = mask
            self.schedule = prior.schedule if schedule is None else check_schedule(schedule)
            super().__init__(shapes.batch_shape, (T, k), validate_args=validate_args)

    def validate_args(self, strict: bool = True) -> None:
        """NumPyro's value checks, on the unmasked steps only.

        A masked step's potential is never used, so a placeholder there (NaN, a negative variance)
        is not an error.
        """
        mask = self.potential_mask
        if mask is None:
            return super().validate_args(strict)
        saved = {n: getattr(self, n) for n in ("potential_mean", "potential_var", "potential_cov")}
        with jax.ensure_compile_time_eval():
            d = self.potential_mean.shape[-1]
            fills: dict[str, tuple[jax.Array, jax.Array]] = {
                "potential_mean": (mask[..., None], jnp.zeros(())),
                "potential_var": (mask[..., None], jnp.ones(())),
                "potential_cov": (mask[..., None, None], jnp.eye(d)),
            }
            for name, value in saved.items():
                if value is not None:
                    keep, fill = fills[name]
                    setattr(self, name, jnp.where(keep, value, fill))
        try:
            super().validate_args(strict)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    @classmethod
    def infer_shapes(cls, *args, **kwargs):
        """``(batch_shape, event_shape)`` from the arguments' shapes.

        Takes the arguments as the constructor does, by position or by name, with each array
        replaced by its shape, and ``prior`` by the prior's shape ``batch_shape + (T, k)``
        (``prior.shape()``, as NumPyro passes a distribution argument's shape).
        """
        given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
        shapes = _posterior_shapes(given["prior"], given)
        return shapes.batch_shape, tuple(given["prior"])[-2:]

    def expand(self, batch_shape):
        """Same distribution with a larger batch shape; the prior is expanded with it."""
        out = super().expand(batch_shape)
        out.prior = self.prior.expand(out.batch_shape)
        return out

    def _potentials(self):
        T = self.event_shape[0]
        # Variances stay [T, d]: never stored or factorized as d x d matrices.
        cov = self.potential_var if self.potential_cov is None else self.potential_cov
        mask = self.potential_mask
        if mask is None:
            mask = jnp.ones((T,), bool)
        return Potentials(self.potential_mean, cov, self.emission_matrix, mask)

    def _core_args(self):
        chain, chain_ndims = self.prior._core_args()
        ndims = _POTENTIAL_NDIMS if self.potential_var is None else _DIAGONAL_POTENTIAL_NDIMS
        if self.emission_matrix is None:  # the identity: potentials.Potentials
            ndims = ndims._replace(emission_matrix=None)
        return (chain, self._potentials()), (chain_ndims, ndims)

    def sequence_args(self):  # noqa: D102 (documented on the base class)
        return self._core_args()

    @classmethod
    def _single_chain(cls, args, num_steps, schedule):
        chain, potentials = args
        return condition_on_potentials(chain, potentials, schedule).backward_chain

    def _noise_shape(self):
        # A prior path (k) and pseudo-potentials (d) per step: see _single_draw.
        T, k = self.event_shape
        return (T, k + self.potential_mean.shape[-1])

    @classmethod
    def _single_draw(cls, args, num_steps, schedule):
        # Durbin & Koopman's simulation smoother rather than sampling the backward kernels:
        # a smoothed mean plus a prior path, whose gradient is posterior_stats' custom VJP.
        chain, potentials = args
        return lambda e: posterior_sample(chain, potentials, e, schedule)

    @classmethod
    def _single_log_prob(cls, args, z, num_steps, schedule):
        chain, potentials = args
        return posterior_log_prob(chain, potentials, z, schedule)

    @validate_sample
    def log_prob(self, value):
        """Log-density of trajectories ``value`` of shape ``[..., T, k]``.

        The value is the backward chain's; its gradient (also w.r.t. ``value``) is written
        out, without reverse mode through the filter (see
        :func:`numpyro_lds.posterior.posterior_log_prob`).
        """
        value = self._checked_value(value)
        shape = lax.broadcast_shapes(value.shape[:-2], self.batch_shape)
        sample_shape = shape[: len(shape) - len(self.batch_shape)]
        value = jnp.broadcast_to(value, shape + self.event_shape)
        return self._map_draws(type(self)._single_log_prob, value, sample_shape)

    # Moments, log-normalizer and KL go through posterior_stats, whose gradient is a custom
    # VJP instead of reverse mode through the scans.
    @classmethod
    def _single_stats(cls, args, num_steps, schedule):
        chain, potentials = args
        return posterior_stats(chain, potentials, schedule)

    @classmethod
    def _single_moments(cls, args, num_steps, schedule) -> Moments:
        return cls._single_stats(args, num_steps, schedule).moments

    @classmethod
    def _single_log_normalizer(cls, args, num_steps, schedule):
        return cls._single_stats(args, num_steps, schedule).log_normalizer

    @classmethod
    def _single_kl_to_prior(cls, args, num_steps, schedule):
        stats = cls._single_stats(args, num_steps, schedule)
        expected = expected_potential_log_prob(stats.moments, args[1], stats.potential_residuals)
        return expected - stats.log_normalizer

    @property
    def log_normalizer(self):
        r"""``log ∫ prior(z) Π_t N(potential_mean_t; H_t z_t, R_t) dz``, shape ``batch_shape``.

        The marginal likelihood of the pseudo-observations under the prior.
        """
        return self._map(type(self)._single_log_normalizer)

    def kl_to_prior(self):
        r"""``KL(self ‖ self.prior)`` by the identity ``Σ_t E_q[log φ_t(z_t)] − log Z``.

        Cheaper than the general closed form (:func:`numpyro_lds.kl_terms`), which it
        equals; it holds only against the very prior that the potentials condition.
        ``kl_divergence(q, q.prior)`` uses it (when the prior is that same object).
        """
        return self._map(type(self)._single_kl_to_prior)


# ------------------------------------------------------ NumPyro batching protocol


def _default_vmap_over(d, **axes):
    """A copy of ``d`` whose data fields hold vmap axes (None: not mapped)."""
    out = copy.copy(d)
    for field in type(d).gather_pytree_data_fields():
        setattr(out, field, axes.get(field))
    return out


def _constructor_axes(cls, axes):
    """``vmap_over``'s axes, named as ``cls``'s constructor names its array arguments.

    Raises:
      TypeError: on a name that is not an array argument of the constructor.
    """
    others = sorted(set(axes) - set(cls.pytree_data_fields) - {"mask"})
    if others:
        raise TypeError(
            f"vmap_over got an unexpected keyword argument {others[0]!r}: it takes axes of "
            f"array arguments only, got {others}"
        )
    return dict(axes)


@vmap_over.register
def _vmap_over_lgss(dist: LinearGaussianStateSpace, **axes):
    """Axes by the constructor's argument names, e.g. ``vmap_over(prior, initial_mean=0)``."""
    return _default_vmap_over(dist, **_constructor_axes(LinearGaussianStateSpace, axes))


@vmap_over.register
def _vmap_over_lds_posterior(dist: LDSPosterior, **axes):
    """Axes by the constructor's argument names.

    ``prior`` is the prior's own axes, e.g. ``vmap_over(q.prior, initial_mean=0)``.
    """
    axes = _constructor_axes(LDSPosterior, axes)
    prior = axes.pop("prior", None)
    axes["potential_mask"] = axes.pop("mask", None)
    # an argument the distribution was built without has no axis
    axes = {n: a if getattr(dist, n) is not None else None for n, a in axes.items()}
    out = _default_vmap_over(dist, **axes)
    out.prior = prior if prior is not None else vmap_over(dist.prior)
    return out


@promote_batch_shape.register
def _promote_batch_shape_lgss(d: LinearGaussianStateSpace):
    shapes = _prior_shapes({n: getattr(d, n).shape for n in d.pytree_data_fields}, d.num_steps)
    new = copy.copy(d)
    new._batch_shape = lax.broadcast_shapes(shapes.batch_shape, d.batch_shape)
    return new


@promote_batch_shape.register
def _promote_batch_shape_lds_posterior(d: LDSPosterior):
    prior = promote_batch_shape(d.prior)
    arrays = {
        "potential_mean": d.potential_mean,
        "potential_cov": d.potential_cov,
        "potential_var": d.potential_var,
        "emission_matrix": d.emission_matrix,
        "mask": d.potential_mask,
    }
    shapes = _posterior_shapes(
        prior.shape(), {n: v.shape for n, v in arrays.items() if v is not None}
    )
    new = copy.copy(d)
    new.prior = prior
    new._batch_shape = lax.broadcast_shapes(shapes.batch_shape, d.batch_shape)
    return new
