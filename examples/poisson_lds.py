"""Latent dynamics of a population of spiking neurons: a Poisson LDS fitted by natural gradients.

Spike counts of ``N`` neurons in bins, ``y_{t,n} ~ Poisson(exp(c_n · z_t + b_n))``, driven by a
``k``-dimensional latent rotation ``z_t`` with an LDS prior. The structured guide
(``AutoLDSGuide`` with full ``k × k`` potentials: every neuron mixes the latents) takes
conjugate-computation steps (``NaturalGradientSVI``, damped, ``β = 0.5``): no learning rate
to tune for the latents, and a few dozen steps to the structured family's optimum. The
loading matrix ``C`` and the baselines ``b`` are learned with Adam beside them. The figure
shows the inferred latents (aligned to the truth by least squares, since ``C`` is learned
only up to an invertible map) and the inferred rates of four neurons against the truth.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace, NaturalGradientSVI


def rotation(k, speed=0.1, damping=0.99):
    """A block-diagonal rotation of ``k // 2`` planes at different speeds."""
    A = np.zeros((k, k))
    for i in range(k // 2):
        th = speed * (i + 1)
        A[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = damping * np.array(
            [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
        )
    return jnp.asarray(A)


def prior(k, T):
    return LinearGaussianStateSpace(
        jnp.zeros(k), jnp.eye(k), rotation(k), 0.02 * jnp.eye(k), num_steps=T
    )


def model(y, k):
    T, n = y.shape
    C = numpyro.param("loadings", 0.1 * jnp.ones((n, k)) + 0.05 * jnp.eye(n, k))
    b = numpyro.param("baselines", jnp.log(jnp.mean(y, 0) + 0.1))
    z = numpyro.sample("z", prior(k, T))
    numpyro.sample("y", dist.Poisson(jnp.exp(z @ C.T + b)).to_event(2), obs=y)


def simulate(key, k, n, T):
    k1, k2, k3 = jax.random.split(key, 3)
    z = prior(k, T).sample(k1)
    C = 0.5 * jax.random.normal(k2, (n, k))
    b = jnp.log(2.0) * jnp.ones(n)
    rates = jnp.exp(z @ C.T + b)
    return z, rates, jax.random.poisson(k3, rates).astype(jnp.float32)


def main(args):
    z, rates, y = simulate(jax.random.key(0), args.latent_dim, args.num_neurons, args.num_bins)
    guide = AutoLDSGuide(model, potential_form="full")
    svi = NaturalGradientSVI(
        model,
        guide,
        numpyro.optim.Adam(args.learning_rate),
        TraceMeanField_ELBO(),
        natural_step_size=args.natural_step_size,
    )
    result = svi.run(jax.random.key(1), args.num_steps, y, args.latent_dim, progress_bar=False)
    for i in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {i:5d}  loss {float(result.losses[i]):10.1f}")
    p = result.params
    q = guide.get_posteriors(p, y, args.latent_dim)["z"]
    mean, var = q.mean, q.marginal_covariance
    C, b = p["loadings"], p["baselines"]
    fitted_rates = jnp.exp(mean @ C.T + b + 0.5 * jnp.einsum("nk,tkl,nl->tn", C, var, C))
    rel = jnp.abs(fitted_rates - rates) / rates
    print(f"inferred rates: median relative error {float(jnp.median(rel)):.3f}")
    # latents are identified up to an invertible map: align them to the truth
    design = jnp.concatenate([mean, jnp.ones((mean.shape[0], 1))], axis=1)
    coef, *_ = jnp.linalg.lstsq(design, z)
    aligned = design @ coef
    r2 = 1 - jnp.sum((aligned - z) ** 2) / jnp.sum((z - z.mean(0)) ** 2)
    print(f"inferred latents (aligned): R^2 = {float(r2):.3f}")

    t = np.arange(args.num_bins)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i in range(min(2, args.latent_dim)):
        axes[0].plot(t, z[:, i], color=f"C{i}", lw=1, label=f"true $z_{{{i + 1}}}$")
        axes[0].plot(t, aligned[:, i], "--", color=f"C{i}", lw=1, label=f"inferred $z_{{{i + 1}}}$")
    axes[0].set_ylabel("latent state (a.u.)")
    axes[0].legend(fontsize=8, ncol=4, loc="lower right", bbox_to_anchor=(1, 1), frameon=False)
    for i in range(min(4, args.num_neurons)):
        axes[1].plot(t, rates[:, i], color=f"C{i}", lw=1)
        axes[1].plot(t, fitted_rates[:, i], "--", color=f"C{i}", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("rate (spikes per bin, log scale)")
    axes[1].set_xlabel("time bin $t$")
    axes[1].set_title("rates of four neurons: true (solid) and inferred (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--num-neurons", type=int, default=50)
    parser.add_argument("--num-bins", type=int, default=500)
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--natural-step-size", type=float, default=0.5)
    parser.add_argument("--output", default="poisson_lds.png")
    main(parser.parse_args())
