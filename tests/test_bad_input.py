"""Bad input raises a clear error naming the argument and the shapes; never a silent number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions.kl import kl_divergence

from numpyro_lds import AutoLDSGuide, LDSPosterior, LinearGaussianStateSpace, kl_terms

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
    ("unknown_schedule", dict(schedule="fast"), ValueError, r"schedule must be None or one of"),
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
        "num_steps_vector",
        dict(num_steps=np.array([4])),
        TypeError,
        r"num_steps must be an integer scalar, got ndarray of shape \(1,\)",
    ),
    ("num_steps_bool", dict(num_steps=np.bool_(True)), TypeError, r"num_steps must be an int"),
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
        "float16_dtype",
        dict(initial_cov=np.eye(2, dtype=np.float16)),
        TypeError,
        r"initial_cov has dtype float16; supported: float32 and float64",
    ),
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


POSTERIOR_CASES = [
    (
        "infinite_var",
        dict(potential_var=np.full((4, 2), np.inf), validate_args=True),
        ValueError,
        r"invalid potential_var",
    ),
    (
        "var_overflows_float32",  # a float64 1e300 against a float32 prior: inf once cast
        dict(
            prior=prior(
                initial_mean=np.zeros(2, np.float32),
                initial_cov=np.eye(2, dtype=np.float32),
                transition_matrix=np.float32(0.9) * np.eye(2, dtype=np.float32),
                transition_cov=np.float32(0.1) * np.eye(2, dtype=np.float32),
            ),
            potential_var=np.full((4, 2), 1e300),
            validate_args=True,
        ),
        ValueError,
        r"invalid potential_var",
    ),
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
    ("unknown_schedule_posterior", dict(schedule=True), ValueError, r"schedule must be None"),
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


CASES = [(prior, *c) for c in PRIOR_CASES] + [(posterior, *c) for c in POSTERIOR_CASES]


@pytest.mark.parametrize(
    "build,kw,err,msg",
    [(b, *c[1:]) for b, *c in CASES],
    ids=[f"{b.__name__}-{c[0]}" for b, *c in CASES],
)
def test_rejects(build, kw, err, msg):
    with pytest.raises(err, match=msg):
        build(**kw)


def test_kl_rejects_mismatched_event_shapes():
    with pytest.raises(ValueError, match=r"same event shape.*\(4, 2\).*\(5, 2\)"):
        kl_terms(prior(), prior(num_steps=5))


def test_kl_rejects_other_distributions():
    with pytest.raises(TypeError, match="p must be a LinearGaussianStateSpace"):
        kl_terms(prior(), dist.Normal(0.0, 1.0))


def test_log_prob_rejects_wrong_event_shape():
    with pytest.raises(ValueError, match=r"value .*\[\.\.\., 4, 2\].*\(3, 2\)"):
        prior().log_prob(jnp.zeros((3, 2)))


@pytest.mark.parametrize("build", [prior, posterior], ids=["prior", "posterior"])
def test_log_prob_rejects_a_value_whose_batch_does_not_broadcast(build):
    d = build().expand((3,))
    with pytest.raises(ValueError, match=r"value's batch shape \(2,\) .*batch_shape \(3,\)"):
        d.log_prob(jnp.zeros((2, 4, 2)))


def test_integer_arguments_are_promoted_to_float():
    d = prior(initial_mean=np.zeros(2, int), transition_matrix=np.eye(2, dtype=int))
    assert jnp.issubdtype(d.transition_matrix.dtype, jnp.floating)
    assert jnp.isfinite(d.entropy())


def test_mixed_precision_is_promoted_and_potentials_follow_the_prior():
    d = prior(
        initial_mean=np.zeros(2, np.float32), transition_cov=0.1 * np.eye(2, dtype=np.float64)
    )
    assert d.initial_mean.dtype == d.transition_cov.dtype == jnp.float64
    p32 = prior(
        **{
            k: np.asarray(v, np.float32)
            for k, v in dict(
                initial_mean=np.zeros(2),
                initial_cov=I2,
                transition_matrix=0.9 * I2,
                transition_cov=0.1 * I2,
            ).items()
        }
    )
    q = LDSPosterior(p32, np.zeros((4, 2)), potential_var=np.ones((4, 2)))
    assert q.potential_mean.dtype == q.potential_var.dtype == jnp.float32
    assert q.mean.dtype == jnp.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_potentials_without_validation_give_nan_not_a_number(bad):
    y = np.zeros((4, 2))
    y[2, 1] = bad
    q = posterior(potential_mean=y, validate_args=False)
    assert not np.isfinite(float(kl_divergence(q, q.prior)))


def test_masked_steps_ignore_non_finite_placeholders():
    """A masked step's potential is never used: NaN there changes nothing, gradients included."""
    y = np.zeros((4, 2))
    var = np.ones((4, 2))
    mask = np.array([True, True, False, True])
    y_nan, var_nan = y.copy(), var.copy()
    y_nan[2], var_nan[2] = np.nan, -1.0

    def kl(y, var):
        q = posterior(potential_mean=y, potential_var=var, mask=mask, validate_args=False)
        return kl_divergence(q, q.prior)

    np.testing.assert_allclose(kl(y_nan, var_nan), kl(y, var), rtol=1e-12)
    g = jax.grad(kl, argnums=(0, 1))(jnp.asarray(y_nan), jnp.asarray(var_nan))
    assert all(np.all(np.isfinite(x)) for x in g)


@pytest.mark.parametrize("form", ["var", "cov"])
def test_masked_placeholders_pass_default_validation(form):
    """``validate_args=True`` checks the unmasked steps only: NaN or a negative variance at
    a masked step is a placeholder, not an error, and the KL is the one without it."""
    mask = np.array([True, True, False, True])
    y, y_nan = np.zeros((4, 2)), np.zeros((4, 2))
    y_nan[2] = np.nan
    if form == "var":
        good, bad = np.ones((4, 2)), np.ones((4, 2))
        bad[2] = -1.0
        kw = lambda v: dict(potential_var=v)  # noqa: E731
    else:
        good, bad = np.broadcast_to(I2, (4, 2, 2)).copy(), np.broadcast_to(I2, (4, 2, 2)).copy()
        bad[2] = np.nan
        kw = lambda v: dict(potential_var=None, potential_cov=v)  # noqa: E731
    q_bad = posterior(potential_mean=y_nan, mask=mask, validate_args=True, **kw(bad))
    q_good = posterior(potential_mean=y, mask=mask, validate_args=True, **kw(good))
    np.testing.assert_allclose(q_bad.kl_to_prior(), q_good.kl_to_prior(), rtol=1e-12)
    with pytest.raises(ValueError, match=f"invalid potential_{form} parameter"):
        posterior(potential_mean=y, mask=np.ones(4, bool), validate_args=True, **kw(bad))


def test_non_pd_covariance_under_jit_gives_nan():
    """Under jit NumPyro cannot check values; a non-PD covariance yields NaN, never a number."""

    def kl(c):
        d = prior(initial_cov=c, validate_args=True)
        return kl_divergence(d, prior())

    assert np.isnan(float(jax.jit(kl)(-jnp.eye(2))))


@pytest.mark.parametrize(
    "build, kw, name",
    [
        (prior, dict(initial_cov=-I2), "initial_cov"),
        (prior, dict(transition_matrix=np.full((2, 2), np.nan)), "transition_matrix"),
        (posterior, dict(potential_var=-np.ones((4, 2))), "potential_var"),
        (
            posterior,
            dict(potential_var=None, potential_cov=-np.broadcast_to(I2, (4, 2, 2))),
            "potential_cov",
        ),
    ],
    ids=["prior_cov", "prior_nan", "posterior_var", "posterior_cov"],
)
def test_invalid_constants_captured_under_jit_are_rejected(build, kw, name):
    """Values known when the program is traced (constants, not jit arguments) are checked
    there too, as NumPyro's own distributions do (``jax.ensure_compile_time_eval``)."""
    with pytest.raises(ValueError, match=f"invalid {name} parameter"):
        jax.jit(lambda: build(validate_args=True, **kw).entropy())()


@pytest.mark.parametrize(
    "masks, msg",
    [
        (
            {"x": np.ones(4, bool)},
            r"\['x'\], which are not LDS sites of the model; its LDS sites are \['z'\]",
        ),
        (
            {"z": np.ones(5, bool)},
            r"potential_mask for site 'z' must have shape \(4,\).*got \(5,\)",
        ),
    ],
    ids=["guide_mask_site", "guide_mask_shape"],
)
def test_guide_rejects_bad_potential_masks(masks, msg):
    def model():
        numpyro.sample("z", prior())

    guide = AutoLDSGuide(model, potential_mask=lambda: masks)
    with pytest.raises(ValueError, match=msg):
        numpyro.handlers.seed(guide, rng_seed=0)()


@pytest.mark.parametrize("num_steps", [4, np.int32(4), np.int64(4), jnp.int32(4), np.array(4)])
def test_num_steps_accepts_any_concrete_integer_scalar(num_steps):
    d = prior(num_steps=num_steps)
    assert d.num_steps == 4 and type(d.num_steps) is int
    assert d.event_shape == (4, 2)


def test_num_steps_traced_under_jit_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match=r"num_steps must be a concrete integer, got a traced"):
        jax.jit(lambda n: prior(num_steps=n).entropy())(4)


def test_guide_warns_when_the_model_has_no_lds_site():
    def model(y):
        z = numpyro.sample("z", dist.Normal(jnp.zeros((4, 2)), 1.0).to_event(2))
        numpyro.sample("y", dist.Normal(z, 1.0).to_event(2), obs=y)

    guide = AutoLDSGuide(model)
    with pytest.warns(UserWarning, match=r"no LinearGaussianStateSpace .*z \(Normal\)"):
        numpyro.handlers.seed(guide, rng_seed=0)(jnp.zeros((4, 2)))


def test_guide_warns_when_a_univariate_series_broadcasts_the_latent():
    """``y`` of shape ``(T,)`` against ``z`` of shape ``(T, 1)``: a ``(T, T)`` log-density."""
    p = LinearGaussianStateSpace(np.zeros(1), np.eye(1), np.eye(1), np.eye(1), num_steps=6)

    def model(y):
        numpyro.sample("y", dist.Normal(numpyro.sample("z", p), 1.0).to_event(2), obs=y)

    guide = AutoLDSGuide(model)
    with pytest.warns(UserWarning, match=r"'y': its value of shape \(6,\) .*\(6, 1\).*\(6, 6\)"):
        numpyro.handlers.seed(guide, rng_seed=0)(jnp.zeros(6))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right shape passes silently
        numpyro.handlers.seed(AutoLDSGuide(model), rng_seed=0)(jnp.zeros((6, 1)))


@pytest.mark.parametrize("name", ["initial_cov", "transition_cov", "potential_cov"])
def test_non_symmetric_covariance_is_rejected_where_seen_else_symmetrized(name):
    """The contract: covariances are used through their symmetric part. Validation raises
    where it sees the value; traced under jit, the result is the symmetric part's."""
    P = np.array([[1.0, 0.5], [0.0, 1.0]])

    def build(c, validate_args):
        if name == "potential_cov":
            cov = (
                np.broadcast_to(c, (4, 2, 2))
                if isinstance(c, np.ndarray)
                else jnp.broadcast_to(c, (4, 2, 2))
            )
            return posterior(potential_var=None, potential_cov=cov, validate_args=validate_args)
        return prior(**{name: c}, validate_args=validate_args)

    with pytest.raises(ValueError, match=f"invalid {name} parameter"):
        build(P, True)
    traced = jax.jit(lambda c: build(c, True).entropy())(jnp.asarray(P))
    symmetric = build((P + P.T) / 2, True).entropy()
    np.testing.assert_allclose(traced, symmetric, rtol=1e-12)
