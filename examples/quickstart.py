"""Quickstart: fit an LDS model with SVI and the exact closed-form KL.

A 2-D latent rotation is observed in noise. The model learns the process and
observation noise; the guide is the prior conditioned on learned Gaussian potentials,
and TraceMeanField_ELBO uses the registered exact KL between the two chains.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceMeanField_ELBO

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

T, k = 100, 2
A = 0.99 * jnp.array([[jnp.cos(0.1), -jnp.sin(0.1)], [jnp.sin(0.1), jnp.cos(0.1)]])


def prior():
    q = numpyro.param("process_var", 0.5, constraint=dist.constraints.positive)
    return LinearGaussianStateSpace(jnp.zeros(k), jnp.eye(k), A, q * jnp.eye(k), num_steps=T)


def model(y):
    z = numpyro.sample("z", prior())
    r = numpyro.param("obs_sd", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("y", dist.Normal(z, r).to_event(2), obs=y)


def guide(y):
    mean = numpyro.param("potential_mean", y)
    var = numpyro.param("potential_var", jnp.ones((T, k)), constraint=dist.constraints.positive)
    numpyro.sample("z", LDSPosterior(prior(), mean, potential_var=var))


def main(args):
    z = LinearGaussianStateSpace(jnp.zeros(k), jnp.eye(k), A, 0.05 * jnp.eye(k), num_steps=T)
    z = z.sample(jax.random.key(0))
    y = z + 0.5 * jax.random.normal(jax.random.key(1), z.shape)
    svi = SVI(model, guide, numpyro.optim.Adam(0.02), TraceMeanField_ELBO())
    result = svi.run(jax.random.key(2), args.num_steps, y, progress_bar=False)
    for step in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {step:5d}  loss {float(result.losses[step]):9.2f}")
    p = result.params
    print(f"process var {p['process_var']:.3f} (true 0.05), obs sd {p['obs_sd']:.3f} (true 0.5)")
    q = numpyro.handlers.substitute(guide, data=p)
    q = numpyro.handlers.trace(numpyro.handlers.seed(q, 0)).get_trace(y)["z"]["fn"]
    mean, sd = q.mean, jnp.sqrt(q.variance)
    fig, axes = plt.subplots(k, 1, figsize=(8, 5), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(y[:, i], ".", color="gray", label="observed")
        ax.plot(z[:, i], "k-", label="true latent")
        ax.plot(mean[:, i], "C0-", label="posterior mean ± 2 sd")
        ax.fill_between(range(T), mean[:, i] - 2 * sd[:, i], mean[:, i] + 2 * sd[:, i], alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--output", default="quickstart.png")
    main(parser.parse_args())
