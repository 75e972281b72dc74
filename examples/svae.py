"""A structured VAE (Johnson et al. 2016): LDS latents, an MLP decoder, an encoder's potentials.

Synthetic "video": a bright dot moves along a line of pixels; its position is the first
coordinate of a 2-D latent oscillator. The generative model is an LDS prior (transition
matrix A and process noise learned) and a flax MLP decoder (through
``numpyro.contrib.module.flax_module``) from latents to frames. The guide is AutoLDSGuide
with an MLP encoder that maps each frame to a Gaussian potential; the structured posterior
is the learned prior conditioned on those potentials. TraceMeanField_ELBO uses the exact
KL between the guide and the prior; ``--mc-kl`` trains the same model with Trace_ELBO (a
sampled KL) for comparison. ``--batch-size B`` trains on minibatches of B sequences (a
subsampled plate; the encoder takes the minibatch's frames with ``numpyro.subsample``).
Figures: the ELBO curve, latent trajectories, reconstructions.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import flax_module
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace

K = 2  # latent dimension


class MLP(nn.Module):
    features: int
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.features)(x)


def make_video(key, num_sequences, num_timesteps, num_pixels, noise=0.05):
    """Frames of a Gaussian bump at position z_t[0] of a damped rotation."""
    th = 0.2
    rot = 0.995 * jnp.array([[jnp.cos(th), -jnp.sin(th)], [jnp.sin(th), jnp.cos(th)]])
    k1, k2 = jax.random.split(key)
    prior = LinearGaussianStateSpace(
        jnp.zeros(K), jnp.eye(K), rot, 0.01 * jnp.eye(K), num_steps=num_timesteps
    )
    z = prior.sample(k1, (num_sequences,))
    grid = jnp.linspace(-3, 3, num_pixels)
    frames = jnp.exp(-0.5 * ((grid - z[..., :1]) / 0.4) ** 2)
    return z, frames + noise * jax.random.normal(k2, frames.shape)


def model(x, batch_size=None):
    N, T, D = x.shape
    A = numpyro.param("A", 0.9 * jnp.eye(K))
    q = numpyro.param("process_var", 0.1 * jnp.ones(K), constraint=dist.constraints.positive)
    decoder = flax_module("decoder", MLP(D), input_shape=(1, K))
    sd = numpyro.param("obs_sd", 0.3, constraint=dist.constraints.positive)
    prior = LinearGaussianStateSpace(jnp.zeros(K), jnp.eye(K), A, jnp.diag(q), num_steps=T)
    with numpyro.plate("sequences", N, subsample_size=batch_size):
        z = numpyro.sample("z", prior)
        x_batch = numpyro.subsample(x, event_dim=2)
        numpyro.sample("x", dist.Normal(decoder(z), sd).to_event(2), obs=x_batch)


def plates(x, batch_size=None):
    """The guide's plate, subsampled as the model's (AutoLDSGuide's ``create_plates``)."""
    return numpyro.plate("sequences", x.shape[0], subsample_size=batch_size)


def encoder(x, batch_size=None):
    net = flax_module("encoder", MLP(2 * K), input_shape=(1, x.shape[-1]))
    out = net(numpyro.subsample(x, event_dim=2))
    return {"z": (out[..., :K], jax.nn.softplus(out[..., K:]) + 1e-3)}


def main(args):
    z_true, x = make_video(
        jax.random.key(0), args.num_sequences, args.num_timesteps, args.num_pixels
    )
    guide = AutoLDSGuide(model, encoder=encoder, create_plates=plates)
    loss = Trace_ELBO() if args.mc_kl else TraceMeanField_ELBO()
    print(f"training with {'a sampled' if args.mc_kl else 'the exact'} KL ({type(loss).__name__})")
    svi = SVI(model, guide, numpyro.optim.Adam(args.learning_rate), loss)
    result = svi.run(jax.random.key(1), args.num_steps, x, args.batch_size, progress_bar=False)
    for i in range(0, args.num_steps, max(1, args.num_steps // 10)):
        print(f"step {i:5d}  loss {float(result.losses[i]):12.2f}")

    q = guide.get_posteriors(result.params, x, None)["z"]  # every sequence
    recon = numpyro.handlers.substitute(flax_module, data=result.params)
    decoder = recon("decoder", MLP(args.num_pixels), input_shape=(1, K))
    x_hat = decoder(q.mean)
    print(f"reconstruction RMSE {float(jnp.sqrt(jnp.mean((x_hat - x) ** 2))):.4f}")

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    elbo = -np.asarray(result.losses)
    axes[0].plot(elbo, lw=0.8)
    # a linear axis on the ELBO's range after the first tenth of training; the start,
    # orders of magnitude lower, would flatten the rest
    later = elbo[len(elbo) // 10 :]
    low, high = np.nanpercentile(later, [1, 100])
    axes[0].set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    axes[0].set_title("training (first tenth off the bottom)")
    axes[0].set_xlabel("SVI step")
    axes[0].set_ylabel("ELBO, one-sample estimate (nats)")
    for i in range(min(3, args.num_sequences)):
        axes[1].plot(q.mean[i, :, 0], q.mean[i, :, 1], label=f"sequence {i}")
    axes[1].set_title("posterior mean latent trajectories")
    axes[1].set_xlabel("latent z[0]")
    axes[1].set_ylabel("latent z[1]")
    axes[1].legend(fontsize=8)
    axes[2].imshow(np.asarray(x[0]).T, aspect="auto", cmap="gray")
    axes[2].set_title("frames (sequence 0)")
    axes[2].set_xlabel("time step")
    axes[2].set_ylabel("pixel")
    axes[3].imshow(np.asarray(x_hat[0]).T, aspect="auto", cmap="gray")
    axes[3].set_title("reconstruction")
    axes[3].set_xlabel("time step")
    axes[3].set_ylabel("pixel")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-sequences", type=int, default=16)
    parser.add_argument("--num-timesteps", type=int, default=50)
    parser.add_argument("--num-pixels", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=3000)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--mc-kl", action="store_true", help="sampled KL (Trace_ELBO) instead")
    parser.add_argument("--output", default="svae.png")
    main(parser.parse_args())
