"""Does ``AutoLDSGuide(model)`` with ``Adam(0.02)`` and 2 000 steps converge?

The grid of the defaults' acceptance: linear-Gaussian models with ``k = 1, 2, 4`` (a random
walk, a damped rotation, constant-velocity tracking observing positions only), data
simulated from them and standardized, observation sd from 0.1 to 10 (in the simulation's
units, before standardizing), float32, ``TraceMeanField_ELBO``. Each fit is compared with
the exact smoother (``LDSPosterior`` with the true potentials, float64): the largest error
of the means in posterior sds, and the largest relative error of the sds. Targets: 0.25
and 10%.

    python benchmarks/adam_defaults.py [--forms full diagonal] [--steps 2000]

Writes ``benchmarks/results/adam_defaults.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceMeanField_ELBO

from numpyro_lds import AutoLDSGuide, LDSPosterior, LinearGaussianStateSpace

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def dynamics(name):
    """``(A, Q, H)`` of one of the grid's models, in the simulation's units."""
    if name == "random walk":
        return np.eye(1), 0.1 * np.eye(1), np.eye(1)
    if name == "rotation":
        th = 0.2
        A = 0.98 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        return A, 0.1 * np.eye(2), np.eye(2)
    if name == "tracking":
        dt = 0.1
        A = np.block([[np.eye(2), dt * np.eye(2)], [np.zeros((2, 2)), np.eye(2)]])
        Q = 0.1 * np.block(
            [
                [dt**3 / 3 * np.eye(2), dt**2 / 2 * np.eye(2)],
                [dt**2 / 2 * np.eye(2), dt * np.eye(2)],
            ]
        )
        return A, Q, np.hstack([np.eye(2), np.zeros((2, 2))])
    raise ValueError(name)


def problem(name, obs_sd, T, seed):
    """Standardized data and the model in the data's standardized units."""
    A, Q, H = dynamics(name)
    k = A.shape[0]
    rng = np.random.default_rng(seed)
    z = np.zeros((T, k))
    z[0] = rng.normal(size=k)
    for t in range(1, T):
        z[t] = A @ z[t - 1] + rng.multivariate_normal(np.zeros(k), Q)
    y = z @ H.T + obs_sd * rng.normal(size=(T, H.shape[0]))
    centre, scale = y.mean(0), y.std()
    y = (y - centre) / scale
    m0 = np.zeros(k)
    m0[: H.shape[0]] = -centre / scale  # the prior's mean in standardized units
    P0 = np.eye(k) / scale**2
    return y, (m0, P0, A, Q / scale**2, H, obs_sd / scale)


def make_model(params, dtype):
    m0, P0, A, Q, H, s = (jnp.asarray(x, dtype) for x in params)

    def model(y):
        prior = LinearGaussianStateSpace(m0, P0, A, Q, num_steps=y.shape[0])
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Normal(z @ H.T, s).to_event(2), obs=y)

    return model


def exact_posterior(y, params):
    m0, P0, A, Q, H, s = (jnp.asarray(x, jnp.float64) for x in params)
    T, d = y.shape
    prior = LinearGaussianStateSpace(m0, P0, A, Q, num_steps=T)
    return LDSPosterior(
        prior, jnp.asarray(y), potential_var=jnp.full((T, d), s**2), emission_matrix=H
    )


def errors(guide, fitted, y, exact):
    q = guide.get_posteriors(fitted, jnp.asarray(y, fitted[next(iter(fitted))].dtype))["z"]
    sd = np.sqrt(np.asarray(exact.variance))
    mean_err = np.max(np.abs(np.asarray(q.mean, np.float64) - np.asarray(exact.mean)) / sd)
    sd_err = np.max(np.abs(np.sqrt(np.asarray(q.variance, np.float64)) / sd - 1))
    return mean_err, sd_err


def main(args):
    jax.config.update("jax_enable_x64", True)  # the exact smoother in float64; fits in float32
    rows = []
    for name, obs_sd, form in itertools.product(args.models, args.obs_sds, args.forms):
        y, params = problem(name, obs_sd, args.T, args.seed)
        exact = exact_posterior(y, params)
        dtype = jnp.dtype(args.dtype)
        model = make_model(params, dtype)
        guide = AutoLDSGuide(model, potential_form=form, init_potentials=args.init)
        svi = SVI(model, guide, numpyro.optim.Adam(args.lr), TraceMeanField_ELBO())
        y32 = jnp.asarray(y, dtype)
        t0 = time.perf_counter()
        result = svi.run(jax.random.key(args.seed), args.steps, y32, progress_bar=False)
        jax.block_until_ready(result.params)
        seconds = time.perf_counter() - t0
        start = errors(guide, svi.get_params(svi.init(jax.random.key(args.seed), y32)), y, exact)
        mean_err, sd_err = errors(guide, result.params, y, exact)
        ok = mean_err <= 0.25 and sd_err <= 0.10
        rows.append((name, obs_sd, form, *start, mean_err, sd_err, ok, seconds))
        print(
            f"{name:12s} sd {obs_sd:5.1f} {form:9s} start {start[0]:.3f}/{start[1]:.3f} "
            f"end: means {mean_err:.3f} sd, sds {100 * sd_err:.1f}%  {'ok' if ok else 'FAIL'} "
            f"({seconds:.1f} s)",
            flush=True,
        )
    if args.write:
        path = os.path.join(RESULTS, "adam_defaults.md")
        with open(path, "w") as f:
            f.write(
                f"# Adam({args.lr}), {args.steps} steps, AutoLDSGuide(init_potentials="
                f"{args.init!r}), float32, T = {args.T}\n\n"
                "`python benchmarks/adam_defaults.py` (this project's 2-core CPU). Errors against "
                "the exact smoother: the largest over all steps and components of |mean error| / "
                "posterior sd, and of |sd ratio - 1|. Targets: 0.25 and 10%.\n\n"
                "| model | obs sd | potential_form | start: means | start: sds | means | sds "
                "| within targets |\n|---|---|---|---|---|---|---|---|\n"
            )
            for name, s, form, m0, s0, m, sd, ok, _ in rows:
                f.write(
                    f"| {name} | {s} | {form} | {m0:.3f} | {100 * s0:.1f}% | {m:.3f} | "
                    f"{100 * sd:.1f}% | {'yes' if ok else 'no'} |\n"
                )
        print("wrote", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["random walk", "rotation", "tracking"])
    parser.add_argument("--obs-sds", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    parser.add_argument("--forms", nargs="+", default=["full", "diagonal"])
    parser.add_argument("--init", default="newton")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--write", action="store_true")
    main(parser.parse_args())
