"""NumPyro's generic distribution tests, run against both classes.

NumPyro checks every distribution it ships with the same few tests
(``test/test_distributions.py`` in its repository, which its wheel does not ship): each
positional constructor argument is looked up in ``arg_constraints``, values outside the
constraint must raise ``ValueError`` under ``validate_args`` (eagerly and as constants
captured under ``jit``), out-of-support values warn in ``log_prob`` (also under ``jit``),
``infer_shapes`` must give the shapes from the arguments' shapes (a distribution argument
by its ``shape()``), and the distribution must survive ``jit`` and ``lax.map`` as a pytree.
This module runs those checks, written out here, on cases of both classes.

One difference: NumPyro stops at the first argument with a dependent constraint. Here
that is ``LDSPosterior``'s ``prior`` (a distribution, validated by its own constraints),
so the check goes on to the potentials after it.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax, random
from numpyro.distributions import constraints

from helpers import random_prior, spd
from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

K, T = 2, 4


def _prior_params(rng, batch=()):
    """Positional arguments of a prior whose time axis gives ``T`` (no ``num_steps``)."""
    p = random_prior(rng, K, T, batch)
    return [
        np.asarray(x)
        for x in (
            p.initial_mean,
            p.initial_cov,
            p.transition_matrix,
            p.transition_cov,
            p.transition_offset,
        )
    ]


def _posterior_params(rng, batch=()):
    prior = LinearGaussianStateSpace(*_prior_params(rng, batch))
    mean = rng.normal(size=tuple(batch) + (T, K))
    return [prior, mean, spd(rng, tuple(batch) + (T,), K)]


CASES = [
    pytest.param(LinearGaussianStateSpace, _prior_params, (), id="prior"),
    pytest.param(LinearGaussianStateSpace, _prior_params, (3,), id="prior-batched"),
    pytest.param(LDSPosterior, _posterior_params, (), id="posterior"),
    pytest.param(LDSPosterior, _posterior_params, (3,), id="posterior-batched"),
]


def _within(constraint, shape, key):
    """A value of ``shape`` that satisfies ``constraint``."""
    x = random.normal(key, shape)
    if constraint is constraints.positive_definite:
        return x @ jnp.swapaxes(x, -1, -2) + jnp.eye(shape[-1])
    if isinstance(constraint, constraints._GreaterThan):
        return constraint.lower_bound + jnp.exp(x)
    return x


def _outside(constraint, shape, key):
    """A value of ``shape`` that violates ``constraint`` (NumPyro's choices)."""
    if isinstance(constraint, constraints._GreaterThan):
        return constraint.lower_bound - jnp.exp(random.normal(key, shape))
    if constraint is constraints.positive_definite:
        return -_within(constraint, shape, key)
    return jnp.full(shape, jnp.nan)


def _positional_names(cls):
    return inspect.getfullargspec(cls.__init__)[0][1:]


def test_every_positional_argument_has_a_constraint():
    for cls in (LinearGaussianStateSpace, LDSPosterior):
        assert set(_positional_names(cls)) <= set(cls.arg_constraints)
    # finite and positive: NumPyro's ``positive`` lets +inf through, which turns every
    # output into NaN
    finite_positive = LDSPosterior.arg_constraints["potential_var"]
    np.testing.assert_array_equal(
        finite_positive(jnp.array([1e-30, 1.0, 1e30, jnp.inf, jnp.nan, 0.0, -1.0])),
        [True, True, True, False, False, False, False],
    )


@pytest.mark.parametrize("cls, make, batch", CASES)
@pytest.mark.parametrize("prepend_shape", [(), (2,)])
def test_distribution_constraints(cls, make, batch, prepend_shape):
    params = make(np.random.default_rng(0), batch)
    valid, outside = list(params), list(params)
    key = random.PRNGKey(1)
    checked = []
    for i, name in enumerate(_positional_names(cls)):
        constraint = cls.arg_constraints[name]
        if params[i] is None or constraints.is_dependent(constraint):
            continue
        key, sub = random.split(key)
        outside[i] = _outside(constraint, np.shape(params[i]), sub)
        valid[i] = _within(constraint, np.shape(params[i]), sub)
        checked.append(name)
    assert checked  # every class has arguments the test applies to

    assert cls(*outside, validate_args=False)  # without validation: constructs
    with pytest.raises(ValueError):
        cls(*outside, validate_args=True)
    outside = jax.device_get(outside)
    with pytest.raises(ValueError):  # constants captured under jit
        jax.jit(lambda: cls(*outside, validate_args=True))()

    d = cls(*valid, validate_args=True)
    bad_value = jnp.full(prepend_shape + d.batch_shape + d.event_shape, jnp.nan)
    with pytest.warns(UserWarning, match="Out-of-support"):
        d.log_prob(bad_value)
    valid, bad_value = jax.device_get((valid, bad_value))
    with pytest.warns(UserWarning, match="Out-of-support"):
        jax.jit(lambda: cls(*valid, validate_args=True).log_prob(bad_value))()


@pytest.mark.parametrize("cls, make, batch", CASES)
def test_infer_shapes(cls, make, batch):
    params = make(np.random.default_rng(0), batch)
    shapes = []
    for param in params:
        shape = getattr(param, "shape", ())
        shapes.append(shape() if callable(shape) else shape)
    d = cls(*params)
    assert cls.infer_shapes(*shapes) == (d.batch_shape, d.event_shape)


@pytest.mark.parametrize("cls, make, batch", CASES)
def test_dist_pytree(cls, make, batch):
    params = make(np.random.default_rng(0), batch)

    def f(_):
        return cls(*params)

    jax.jit(f)(0)  # flatten and unflatten
    lax.map(f, np.ones(3))  # inside a scan
    expected, actual = f(0), jax.jit(f)(0)
    assert (actual.batch_shape, actual.event_shape) == (expected.batch_shape, expected.event_shape)
    for name in cls.pytree_data_fields:
        for a, b in zip(
            jax.tree.leaves(getattr(actual, name)),
            jax.tree.leaves(getattr(expected, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls, make, batch", CASES)
def test_has_rsample(cls, make, batch):
    """NumPyro reads ``has_rsample`` as ``reparametrized_params == arg_constraints``; the
    ELBOs then take the draws' gradients (``rsample``)."""
    d = cls(*make(np.random.default_rng(0), batch))
    assert d.has_rsample
    z = d.rsample(random.PRNGKey(0))
    assert z.shape == d.batch_shape + d.event_shape
