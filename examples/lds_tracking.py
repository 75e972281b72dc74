"""2-D object tracking with a constant-velocity LDS, fitted by SVI with the exact KL.

The state is (x, y, vx, vy) (k = 4); only positions are observed, in noise. The structured
posterior (AutoLDSGuide; TraceMeanField_ELBO: the KL between the guide and the LDS prior is
exact) takes natural-gradient steps (NaturalGradientSVI: its potentials hold zero precision
for the unobserved velocities), while Adam learns the process-noise intensity and the
observation noise.
The fitted posterior is compared with the exact Kalman smoother at the learned noise levels,
and with NUTS (numpyro.infer.MCMC) on the same model; the figure shows the trajectory and
the position coordinates over time with 95% credible bands.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LDSPosterior, LinearGaussianStateSpace, NaturalGradientSVI

DT = 1.0
A = jnp.array([[1, 0, DT, 0], [0, 1, 0, DT], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
H = jnp.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
# white-noise acceleration: Q = q · Q_UNIT
Q_UNIT = jnp.kron(jnp.array([[DT**3 / 3, DT**2 / 2], [DT**2 / 2, DT]]), jnp.eye(2))


def prior(T, q):
    return LinearGaussianStateSpace(jnp.zeros(4), 10.0 * jnp.eye(4), A, q * Q_UNIT, num_steps=T)


def model(y):
    q = numpyro.param("process_noise", 1.0, constraint=dist.constraints.positive)
    r = numpyro.param("obs_sd", 1.0, constraint=dist.constraints.positive)
    z = numpyro.sample("z", prior(y.shape[0], q))
    numpyro.sample("y", dist.Normal(z @ H.T, r).to_event(2), obs=y)


def simulate(key, T, q=0.05, r=0.5):
    k1, k2 = jax.random.split(key)
    z = prior(T, q).sample(k1)
    return z, z @ H.T + r * jax.random.normal(k2, (T, 2))


def main(args):
    z_true, y = simulate(jax.random.key(0), args.num_timesteps)
    guide = AutoLDSGuide(model)
    svi = NaturalGradientSVI(
        model, guide, numpyro.optim.Adam(args.learning_rate), TraceMeanField_ELBO()
    )
    result = svi.run(jax.random.key(1), args.num_steps, y, progress_bar=False)
    for i in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {i:5d}  loss {float(result.losses[i]):10.2f}")
    p = result.params
    print(f"learned process noise {p['process_noise']:.3f} (true 0.05)")
    print(f"learned obs sd {p['obs_sd']:.3f} (true 0.5)")

    q = guide.get_posteriors(p, y)["z"]
    exact = LDSPosterior(
        prior(args.num_timesteps, p["process_noise"]),
        y,
        potential_var=jnp.full(y.shape, p["obs_sd"] ** 2),
        emission_matrix=H,
    )
    err = jnp.abs(q.mean - exact.mean) / jnp.sqrt(exact.variance)
    print(f"SVI vs exact smoother: max |mean diff| / sd = {float(err.max()):.3f}")

    # NUTS on the same model at the learned noise levels, on the first steps
    T_short = min(args.nuts_timesteps, args.num_timesteps)
    fixed = numpyro.handlers.substitute(model, data={k: p[k] for k in ("process_noise", "obs_sd")})
    mcmc = MCMC(
        NUTS(fixed), num_warmup=args.num_warmup, num_samples=args.num_samples, progress_bar=False
    )
    mcmc.run(jax.random.key(2), y[:T_short])
    z_nuts = mcmc.get_samples()["z"]
    exact_short = LDSPosterior(
        prior(T_short, p["process_noise"]),
        y[:T_short],
        potential_var=jnp.full((T_short, 2), p["obs_sd"] ** 2),
        emission_matrix=H,
    )
    err = jnp.abs(z_nuts.mean(0) - exact_short.mean) / jnp.sqrt(exact_short.variance)
    print(f"NUTS vs exact smoother (T={T_short}): max |mean diff| / sd = {float(err.max()):.3f}")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(z_true[:, 0], z_true[:, 1], "k-", label="true")
    axes[0].plot(y[:, 0], y[:, 1], ".", color="gray", label="observed")
    axes[0].plot(q.mean[:, 0], q.mean[:, 1], "C0-", label="SVI posterior mean")
    axes[0].set_title("trajectory (errors in the next panels)")
    axes[0].set_xlabel("x position (simulation units)")
    axes[0].set_ylabel("y position (simulation units)")
    axes[0].legend(fontsize=8, framealpha=0.6)
    t = np.arange(args.num_timesteps)
    for i, ax in zip((0, 1), axes[1:], strict=True):
        # errors relative to the true position, so the bands are visible at any scale
        m, s = q.mean[:, i] - z_true[:, i], jnp.sqrt(q.variance[:, i])
        ax.axhline(0.0, color="k", lw=1, label="true")
        ax.plot(t, y[:, i] - z_true[:, i], ".", color="gray", ms=3, label="observed")
        ax.plot(t, m, "C0-", lw=1, label="SVI mean")
        ax.plot(t, exact.mean[:, i] - z_true[:, i], "C3--", lw=1, label="exact smoother mean")
        ax.fill_between(t, m - 1.96 * s, m + 1.96 * s, color="C0", alpha=0.3, label="SVI 95%")
        lo, hi = jnp.percentile(z_nuts[:, :, i] - z_true[:T_short, i], jnp.array([2.5, 97.5]), 0)
        ax.fill_between(t[:T_short], lo, hi, color="C1", alpha=0.4, label=f"NUTS 95% (T={T_short})")
        ax.set_title(f"{'xy'[i]} position error")
        ax.set_xlabel("time step")
        ax.set_ylabel(f"estimate − true {'xy'[i]} (simulation units)")
        ax.legend(fontsize=7, ncol=2, loc="upper right", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-timesteps", type=int, default=100)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--nuts-timesteps", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--output", default="lds_tracking.png")
    main(parser.parse_args())
