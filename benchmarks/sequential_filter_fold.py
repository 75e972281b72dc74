"""The sequential Kalman filter two ways: one Kalman step per scan step (what
``kalman_filter`` runs), or a scan that folds the parallel filter's associative elements
with ``_combine_filter`` (``prefix_scan(..., "sequential")``, as the blocked and parallel
schedules fold them). Same results; this measures what folding would cost.

Both versions are compiled in one process and their calls alternated (``--rounds``), for
the filter alone and for the KL + gradient (``bench_kl.ours``, whose forward pass runs the
filter once). Prints the medians, their ratio and the compile times.

    python benchmarks/sequential_filter_fold.py --k 4 --T 10000
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_kl
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace, kalman
from numpyro_lds.schedules import prefix_scan

STEPWISE = kalman._sequential_filter


def folded_filter(chain, y, R, H, mask):
    """The sequential filter as a fold of the associative elements."""
    elements = kalman._filter_elements(chain, y, R, H, mask)
    filtered = prefix_scan(kalman._combine_filter, elements, "sequential")
    return filtered.b, filtered.C, filtered.log_c[-1]


def compiled(fn, args, version):
    """``fn`` jitted and compiled with the sequential filter of ``version``."""
    kalman._sequential_filter = STEPWISE if version == "stepwise" else folded_filter
    try:
        t0 = time.perf_counter()
        # Nothing traced with the other version may be reused: the package's own jitted
        # helpers (_batch.jit_batch_map) cache their traces by function.
        jax.clear_caches()
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
        call = lowered.compile()
        seconds = time.perf_counter() - t0
        return call, seconds, len(lowered.as_text())
    finally:
        kalman._sequential_filter = STEPWISE


def main(args):
    p = bench_kl.problem(args.T, args.k, 1, jnp.dtype(args.dtype))
    prior = LinearGaussianStateSpace(
        p["m0"], p["P0"], p["A"], p["Q"], num_steps=args.T, validate_args=False
    )

    def filter_only(y, var):
        q = LDSPosterior(prior, y, potential_var=var, validate_args=False)
        (chain, potentials), _ = q.sequence_args()
        potentials = jax.tree.map(lambda x: x[0] if x.ndim > 1 else x, potentials)
        return kalman.kalman_filter(chain, potentials, "sequential")

    fns = {
        "filter": filter_only,
        "KL+grad": bench_kl.ours(p, "sequential")["numpyro_lds KL+grad [sequential]"][0],
    }
    xs = (p["y"], p["var"])
    results = {}
    for name, fn in fns.items():
        calls = {v: compiled(fn, xs, v) for v in ("stepwise", "folded")}
        outs = {v: jax.block_until_ready(c(*xs)) for v, (c, _, _) in calls.items()}
        sizes = {v: c[2] for v, c in calls.items()}
        if sizes["stepwise"] == sizes["folded"]:
            raise RuntimeError(f"{name}: both versions lowered to the same program ({sizes})")
        for a, b in zip(*(jax.tree.leaves(o) for o in outs.values()), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # float32, same function
        times = {v: [] for v in calls}
        for _ in range(args.rounds):
            for v, (call, _, _) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(call(*xs))
                times[v].append(time.perf_counter() - t0)
        results[name] = {v: (statistics.median(times[v]), calls[v][1]) for v in calls}
    print(f"{args.dtype} k={args.k} T={args.T}, {args.rounds} alternated calls each")
    for name, r in results.items():
        (s, cs), (f, cf) = r["stepwise"], r["folded"]
        print(
            f"  {name:8s} stepwise {s * 1e3:8.2f} ms (compile {cs:4.1f} s) | "
            f"folded {f * 1e3:8.2f} ms (compile {cf:4.1f} s) | folded / stepwise {f / s:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--T", type=int, default=10_000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=30)
    main(parser.parse_args())
