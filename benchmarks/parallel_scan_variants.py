"""Ways to run the parallel schedule's prefix scan, timed side by side (for a GPU).

``schedule="parallel"`` runs every recursion through ``schedules.prefix_scan``, which combines
the per-step elements by recursive doubling in blocks of ``schedules.PARALLEL_BLOCK`` and then
across the block totals ("two-level", the shipped code). This script times the KL value +
gradient (against a separately built prior: Terms A-C, as SVI computes it; float32; the
problem of ``gpu_check.py``) with ``prefix_scan``'s parallel branch replaced by each of:

- ``two-level``: the shipped code (unpatched);
- ``associative``: ``lax.associative_scan`` over the whole sequence (the code before);
- ``doubling``: recursive doubling over the whole sequence (``n log₂ n`` combinations);
- ``hybrid``: ``lax.associative_scan`` within blocks of 32, doubling across them.

Compile time (first call minus the median) is reported apart from the median of
``--repeats`` calls. Each variant runs in a process of its own: JAX caches the traces of
the custom VJP rules by function, so a second variant in one process would reuse the
first one's. ``python benchmarks/parallel_scan_variants.py`` runs all of them in turn;
``--check`` also compares each with a CPU float64 sequential run at ``T = 500``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

VARIANTS = ("two-level", "associative", "doubling", "hybrid")


def patch(variant):
    """Replace ``schedules.prefix_scan``'s parallel branch by ``variant``."""
    import jax
    from jax import lax

    from numpyro_lds import chains, kalman, schedules

    shipped = schedules.prefix_scan

    def whole(op, elems, n):
        if variant == "associative":
            return lax.associative_scan(op, elems)
        return schedules._doubling_prefix_scan(op, elems)

    def hybrid(op, elems, n):
        return schedules._two_level_prefix_scan(
            op, elems, n, 32, lax.associative_scan, schedules._doubling_prefix_scan
        )

    def prefix_scan(op, elems, schedule):
        if schedule != "parallel" or variant == "two-level":
            return shipped(op, elems, schedule)
        n = jax.tree.leaves(elems)[0].shape[0]
        if variant == "hybrid" and n > 32:
            return hybrid(op, elems, n)
        return whole(op, elems, n)

    # Every module that folds a recursion imported the name: patch it there.
    for module in (schedules, chains, kalman):
        module.prefix_scan = prefix_scan


def run_variant(args):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_check import kl_value_and_grad, rel, timed

    patch(args.variant)
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    name = f"{args.variant} on {device.device_kind}"
    if args.check:
        for k in (4, 16):
            f_ref, a_ref = kl_value_and_grad(500, k, jnp.float64, cpu, "sequential", "general")
            ref = jax.tree.leaves(f_ref(*a_ref))
            f, a = kl_value_and_grad(500, k, jnp.float32, device, "parallel", "general")
            out = jax.tree.leaves(f(*a))
            errs = [rel(x, r) for x, r in zip(out, ref, strict=True)]
            print(
                f"check {name} k={k} T=500 float32: KL rel err {errs[0]:.1e}, grad rel err "
                f"{max(errs[1:]):.1e}, finite {all(np.all(np.isfinite(x)) for x in out)}",
                flush=True,
            )
    for run in args.runs:
        k, T = map(int, run.split(":"))
        f, a = kl_value_and_grad(T, k, jnp.float32, device, "parallel", "general")
        compile_s, med = timed(f, a, args.repeats)
        print(
            f"time {name} k={k} T={T}: compile {compile_s:.2f} s, median {med * 1e3:.2f} ms",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", choices=VARIANTS, help="run this one (else all, in turn)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--runs",
        nargs="+",
        default=["4:1000", "4:10000", "4:1000000", "16:10000", "16:1000000"],
        help="k:T sizes, in order",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.variant:
        return run_variant(args)
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)]
        subprocess.run(cmd + ["--runs", *args.runs] + ["--check"] * args.check, check=True)


if __name__ == "__main__":
    main()
