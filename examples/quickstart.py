"""Quickstart: a 2-D latent rotation observed in noise, fitted with the exact KL.

AutoLDSGuide conditions the model's LDS prior on free potentials; TraceMeanField_ELBO uses
the closed-form KL between the two chains. NaturalGradientSVI sets the potentials by
conjugate-computation steps (for this Gaussian likelihood: the exact smoother at the
current noise levels, every step) and fits the process and observation noise with Adam.
``--optimizer adam`` fits everything with plain SVI and Adam instead.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LDSPosterior, LinearGaussianStateSpace, NaturalGradientSVI

T, k = 100, 2
A = 0.99 * jnp.array([[jnp.cos(0.1), -jnp.sin(0.1)], [jnp.sin(0.1), jnp.cos(0.1)]])


def model(y):
    q = numpyro.param("process_var", 0.5, constraint=dist.constraints.positive)
    r = numpyro.param("obs_sd", 1.0, constraint=dist.constraints.positive)
    prior = LinearGaussianStateSpace(jnp.zeros(k), jnp.eye(k), A, q * jnp.eye(k), num_steps=T)
    z = numpyro.sample("z", prior)
    numpyro.sample("y", dist.Normal(z, r).to_event(2), obs=y)


def main(args):
    truth = LinearGaussianStateSpace(jnp.zeros(k), jnp.eye(k), A, 0.05 * jnp.eye(k), num_steps=T)
    z = truth.sample(jax.random.key(0))
    y = z + 0.5 * jax.random.normal(jax.random.key(1), z.shape)
    guide = AutoLDSGuide(model)
    Fit = NaturalGradientSVI if args.optimizer == "natural" else SVI
    svi = Fit(model, guide, numpyro.optim.Adam(0.02), TraceMeanField_ELBO())
    result = svi.run(jax.random.key(2), args.num_steps, y, progress_bar=False)
    for step in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {step:5d}  loss {float(result.losses[step]):9.2f}")
    p = result.params
    print(f"process var {p['process_var']:.3f} (true 0.05), obs sd {p['obs_sd']:.3f} (true 0.5)")
    q = guide.get_posteriors(p, y)["z"]
    prior = LinearGaussianStateSpace(
        jnp.zeros(k), jnp.eye(k), A, p["process_var"] * jnp.eye(k), num_steps=T
    )
    exact = LDSPosterior(prior, y, potential_var=jnp.full(y.shape, p["obs_sd"] ** 2))
    mean, sd = q.mean, jnp.sqrt(q.variance)
    err = jnp.abs(mean - exact.mean) / jnp.sqrt(exact.variance)
    sd_err = jnp.abs(sd / jnp.sqrt(exact.variance) - 1)
    print(
        f"vs the exact smoother at the learned noise: means within {float(err.max()):.3f} sd, "
        f"sds within {100 * float(sd_err.max()):.1f}%"
    )
    fig, axes = plt.subplots(k, 1, figsize=(8, 5), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(y[:, i], ".", color="gray", ms=4, label="observed")
        ax.plot(z[:, i], "k-", lw=1, label="true latent")
        ax.fill_between(
            range(T), mean[:, i] - 2 * sd[:, i], mean[:, i] + 2 * sd[:, i], alpha=0.4,
            color="C0", label="posterior ± 2 sd",
        )  # fmt: skip
        ax.set_ylabel(f"$z_{{t,{i + 1}}}$ (a.u.)")
    axes[0].legend(fontsize=8, ncol=3, loc="lower right", bbox_to_anchor=(1, 1), frameon=False)
    axes[-1].set_xlabel("time step $t$")
    axes[0].set_title(
        "2-D latent rotation: observations, truth and the fitted posterior", loc="left", pad=18
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--optimizer", choices=["natural", "adam"], default="natural")
    parser.add_argument("--output", default="quickstart.png")
    main(parser.parse_args())
