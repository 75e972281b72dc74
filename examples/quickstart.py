"""Quickstart: a 2-D latent rotation observed in noise, fitted by SVI with the exact KL.

AutoLDSGuide conditions the model's LDS prior on learned potentials; TraceMeanField_ELBO
uses the closed-form KL between the two chains. Learns the process and observation noise.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace

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
    guide = AutoLDSGuide(model, init_scale=1.0)
    svi = SVI(model, guide, numpyro.optim.Adam(0.02), TraceMeanField_ELBO())
    result = svi.run(jax.random.key(2), args.num_steps, y, progress_bar=False)
    for step in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {step:5d}  loss {float(result.losses[step]):9.2f}")
    p = result.params
    print(f"process var {p['process_var']:.3f} (true 0.05), obs sd {p['obs_sd']:.3f} (true 0.5)")
    q = guide.get_posteriors(p, y)["z"]
    mean, sd = q.mean, jnp.sqrt(q.variance)
    for i in range(k):
        plt.plot(y[:, i], ".", color=f"C{i}", alpha=0.5)
        plt.plot(z[:, i], "k-", lw=1)
        plt.fill_between(range(T), mean[:, i] - 2 * sd[:, i], mean[:, i] + 2 * sd[:, i], alpha=0.4)
    plt.title("observations (dots), true latents (black), posterior ± 2 sd (bands)")
    plt.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--output", default="quickstart.png")
    main(parser.parse_args())
