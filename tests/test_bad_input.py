"""Bad input raises a clear error naming the argument and the shapes; never a silent number."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace, kl_terms

I2 = np.eye(2)


def prior(**kw):
    args = dict(
        initial_mean=np.zeros(2),
        initial_cov=I2,
        transition_matrix=0.9 * I2,
        transition_cov=0.1 * I2,
        num_steps=4,
    )
    args.update(kw)
    return LinearGaussianStateSpace(**args)


def posterior(**kw):
    args = dict(prior=prior(), potential_mean=np.zeros((4, 2)), potential_var=np.ones((4, 2)))
    args.update(kw)
    return LDSPosterior(**args)


PRIOR_CASES = [
    # (id, kwargs, error, message pattern)
    (
        "k_mismatch",
        dict(initial_cov=np.eye(3)),
        ValueError,
        r"initial_cov .*\[\.\.\., 2, 2\].*\(3, 3\)",
    ),
    (
        "non_square",
        dict(transition_matrix=np.ones((2, 3))),
        ValueError,
        r"transition_matrix .*\(2, 3\)",
    ),
    ("cov_wrong_k", dict(transition_cov=np.eye(3)), ValueError, r"transition_cov .*\(3, 3\)"),
    (
        "offset_wrong_k",
        dict(transition_offset=np.zeros(3)),
        ValueError,
        r"transition_offset .*\(3,\)",
    ),
    (
        "time_axis_length",
        dict(transition_matrix=np.ones((5, 2, 2))),
        ValueError,
        r"transition_matrix .*length 5.*T-1 = 3",
    ),
    (
        "time_axes_disagree",
        dict(
            transition_matrix=np.ones((3, 2, 2)),
            transition_cov=np.broadcast_to(I2, (4, 2, 2)),
            num_steps=None,
        ),
        ValueError,
        r"transition_cov .*length 4.*T-1 = 3",
    ),
    ("no_num_steps", dict(num_steps=None), ValueError, r"num_steps is required"),
    ("num_steps_zero", dict(num_steps=0), ValueError, r"num_steps must be >= 1"),
    ("num_steps_float", dict(num_steps=4.0), TypeError, r"num_steps must be an int"),
    (
        "scalar_mean",
        dict(initial_mean=np.float64(0.0)),
        ValueError,
        r"initial_mean .*\[\.\.\., k\]",
    ),
    (
        "k_zero",
        dict(initial_mean=np.zeros(0), initial_cov=np.zeros((0, 0))),
        ValueError,
        r"initial_mean .*k >= 1",
    ),
    ("bool_dtype", dict(initial_mean=np.zeros(2, bool)), TypeError, r"initial_mean .*floating"),
    (
        "batch_mismatch",
        dict(initial_mean=np.zeros((3, 2)), initial_cov=np.broadcast_to(I2, (4, 2, 2))),
        ValueError,
        r"do not broadcast.*initial_mean: \(3,\).*initial_cov: \(4,\)",
    ),
    ("not_pd", dict(initial_cov=-I2, validate_args=True), ValueError, r"invalid initial_cov"),
    (
        "nan_transition",
        dict(transition_matrix=np.full((2, 2), np.nan), validate_args=True),
        ValueError,
        r"invalid transition_matrix",
    ),
]


@pytest.mark.parametrize(
    "kw,err,msg", [c[1:] for c in PRIOR_CASES], ids=[c[0] for c in PRIOR_CASES]
)
def test_prior_rejects(kw, err, msg):
    with pytest.raises(err, match=msg):
        prior(**kw)


POSTERIOR_CASES = [
    (
        "both_covs",
        dict(potential_cov=np.broadcast_to(I2, (4, 2, 2))),
        ValueError,
        r"exactly one of .* got both",
    ),
    ("neither_cov", dict(potential_var=None), ValueError, r"exactly one of .* got neither"),
    (
        "mean_wrong_T",
        dict(potential_mean=np.zeros((5, 2))),
        ValueError,
        r"potential_mean .*\[\.\.\., 4, d\].*\(5, 2\)",
    ),
    (
        "var_wrong_d",
        dict(potential_var=np.ones((4, 3))),
        ValueError,
        r"potential_var .*\[\.\.\., 4, 2\].*\(4, 3\)",
    ),
    (
        "cov_wrong",
        dict(potential_var=None, potential_cov=np.ones((4, 2, 3))),
        ValueError,
        r"potential_cov .*\(4, 2, 3\)",
    ),
    (
        "d_ne_k_no_emission",
        dict(potential_mean=np.zeros((4, 3)), potential_var=np.ones((4, 3))),
        ValueError,
        r"emission_matrix \[3, 2\] is required",
    ),
    (
        "emission_wrong",
        dict(emission_matrix=np.ones((2, 3))),
        ValueError,
        r"emission_matrix .*\[2, 2\].*\(2, 3\)",
    ),
    (
        "emission_time_axis",
        dict(emission_matrix=np.ones((3, 2, 2))),
        ValueError,
        r"emission_matrix .*\(3, 2, 2\)",
    ),
    ("mask_shape", dict(mask=np.ones(5, bool)), ValueError, r"mask .*\[\.\.\., 4\].*\(5,\)"),
    ("mask_dtype", dict(mask=np.ones(4, int)), TypeError, r"mask must have dtype bool"),
    ("prior_type", dict(prior=np.zeros(3)), TypeError, r"prior must be a LinearGaussianStateSpace"),
    (
        "not_pd",
        dict(potential_var=None, potential_cov=np.broadcast_to(-I2, (4, 2, 2)), validate_args=True),
        ValueError,
        r"invalid potential_cov",
    ),
    (
        "negative_var",
        dict(potential_var=-np.ones((4, 2)), validate_args=True),
        ValueError,
        r"invalid potential_var",
    ),
    (
        "nan_potential",
        dict(potential_mean=np.full((4, 2), np.nan), validate_args=True),
        ValueError,
        r"invalid potential_mean",
    ),
]


@pytest.mark.parametrize(
    "kw,err,msg", [c[1:] for c in POSTERIOR_CASES], ids=[c[0] for c in POSTERIOR_CASES]
)
def test_posterior_rejects(kw, err, msg):
    with pytest.raises(err, match=msg):
        posterior(**kw)


def test_kl_rejects_mismatched_event_shapes():
    with pytest.raises(ValueError, match=r"same event shape.*\(4, 2\).*\(5, 2\)"):
        kl_terms(prior(), prior(num_steps=5))


def test_kl_rejects_other_distributions():
    import numpyro.distributions as dist

    with pytest.raises(TypeError, match="p must be a LinearGaussianStateSpace"):
        kl_terms(prior(), dist.Normal(0.0, 1.0))


def test_log_prob_rejects_wrong_event_shape():
    with pytest.raises(ValueError, match=r"value .*\[\.\.\., 4, 2\].*\(3, 2\)"):
        prior().log_prob(jnp.zeros((3, 2)))


def test_integer_arguments_are_promoted_to_float():
    d = prior(initial_mean=np.zeros(2, int), transition_matrix=np.eye(2, dtype=int))
    assert jnp.issubdtype(d.transition_matrix.dtype, jnp.floating)
    assert jnp.isfinite(d.entropy())
