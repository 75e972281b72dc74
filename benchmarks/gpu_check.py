"""GPU check: correctness against a CPU float64 run, and timings of KL value + gradient.

Run on a machine with a GPU (``python benchmarks/gpu_check.py``); prints one line per
measurement and finishes in a few minutes. It checks that float32 and float64 results on
the GPU match a float64 run on the CPU (the same code), then times the KL value + gradient
(w.r.t. the potentials) with ``jit``: compile time separately, then the median of repeats.
Sizes run in increasing T and stop growing once one run takes longer than ``--budget``.

Only the sequential formulation exists so far; the parallel-in-time option is future work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from numpyro.distributions.kl import kl_divergence  # noqa: E402

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace  # noqa: E402


def problem(T, k, seed=0):
    rng = np.random.default_rng(seed)
    A = 0.95 * np.linalg.qr(rng.normal(size=(k, k)))[0]
    y = rng.normal(size=(T, k))
    var = 10.0 ** rng.uniform(-2, 2, size=(T, k))
    mask = rng.uniform(size=T) > 0.3
    return A, y, var, mask


def kl_value_and_grad(T, k, dtype, device):
    A, y, var, mask = problem(T, k)
    put = lambda x: jax.device_put(jnp.asarray(x, dtype), device)  # noqa: E731
    prior = LinearGaussianStateSpace(
        put(np.zeros(k)),
        put(np.eye(k)),
        put(A),
        put(0.1 * np.eye(k)),
        num_steps=T,
        validate_args=False,
    )
    mask = jax.device_put(jnp.asarray(mask), device)

    def kl(y, var):
        q = LDSPosterior(prior, y, potential_var=var, mask=mask, validate_args=False)
        return kl_divergence(q, prior)

    return jax.jit(jax.value_and_grad(kl, argnums=(0, 1))), (put(y), put(var))


def timed(f, args, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return max(first - med, 0.0), med


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main(args):
    gpu = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    print(f"jax {jax.__version__}; device: {gpu.device_kind} ({gpu.platform})", flush=True)
    # correctness: GPU float32 / float64 vs CPU float64, same code
    for k in args.k:
        f_ref, a_ref = kl_value_and_grad(args.check_T, k, jnp.float64, cpu)
        ref_kl, (ref_gy, ref_gv) = f_ref(*a_ref)
        for dtype in (jnp.float64, jnp.float32):
            f, a = kl_value_and_grad(args.check_T, k, dtype, gpu)
            kl, (gy, gv) = f(*a)
            print(
                f"check T={args.check_T} k={k} {jnp.dtype(dtype).name}: KL rel err "
                f"{rel(kl, ref_kl):.1e}, grad rel err {rel(gy, ref_gy):.1e} / "
                f"{rel(gv, ref_gv):.1e}, "
                f"finite {bool(np.isfinite(kl) and np.all(np.isfinite(gy)))}",
                flush=True,
            )
    # timings, float32
    for k in args.k:
        for T in args.T:
            f, a = kl_value_and_grad(T, k, jnp.float32, gpu)
            compile_s, med = timed(f, a, args.repeats)
            print(
                f"time T={T} k={k} float32 sequential: compile {compile_s:.2f}s, "
                f"median {med * 1e3:.1f} ms, {med / T * 1e9:.0f} ns/step",
                flush=True,
            )
            if med > args.budget:
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--k", type=int, nargs="+", default=[4, 16])
    p.add_argument("--check-T", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per run before stopping")
    main(p.parse_args())
