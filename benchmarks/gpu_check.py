"""GPU check: correctness against a CPU float64 run, and timings of KL value + gradient.

Run on a machine with a GPU (``python benchmarks/gpu_check.py``); prints one line per
measurement and stops starting new work after ``--deadline`` seconds (default 270, so the
whole run stays under 5 minutes). It checks that the GPU results of each schedule
(sequential, blocked and parallel-in-time), in float32, match a float64 sequential run
on the CPU (the same code), as does ``LDSPosterior.log_prob`` with its gradient
(``--check-log-prob``), then times the KL value + gradient (w.r.t. the potentials)
with ``jit`` at that length and at each of ``--runs``: compile time separately, then the
median of repeats, and the device's peak memory. Each check and run names its formula:
``shortcut`` (the KL against the guide's own prior, ``Σ E_q log φ − log Z``) or
``general`` (against the same prior built a second time, as in SVI, where the guide's
prior and the model's are separate objects: Terms A-C).
Timings run in the order of ``--runs`` (most important first); a (schedule, k, formula)
stops once one run takes longer than ``--budget``.
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


def build_prior(T, k, A, put, schedule):
    """The problem's LDS prior, its arrays placed by ``put`` (dtype and device)."""
    return LinearGaussianStateSpace(
        put(np.zeros(k)),
        put(np.eye(k)),
        put(A),
        put(0.1 * np.eye(k)),
        num_steps=T,
        schedule=schedule,
        validate_args=False,
    )


def kl_value_and_grad(T, k, dtype, device, schedule, formula="shortcut"):
    """``formula="general"``: the KL against the same prior built a second time, as in SVI
    (the guide's prior and the model's are separate objects), so it takes Terms A-C."""
    A, y, var, mask = problem(T, k)
    put = lambda x: jax.device_put(jnp.asarray(x, dtype), device)  # noqa: E731
    prior = build_prior(T, k, A, put, schedule)
    p = prior if formula == "shortcut" else build_prior(T, k, A, put, schedule)
    mask = jax.device_put(jnp.asarray(mask), device)

    def kl(y, var):
        q = LDSPosterior(prior, y, potential_var=var, mask=mask, validate_args=False)
        return kl_divergence(q, p)

    return jax.jit(jax.value_and_grad(kl, argnums=(0, 1))), (put(y), put(var))


def log_prob_value_and_grad(T, k, dtype, device, schedule):
    """``LDSPosterior.log_prob`` at a fixed path and its gradient w.r.t. the potentials and
    the path (the written-out gradient of ``posterior.posterior_log_prob``)."""
    A, y, var, mask = problem(T, k)
    put = lambda x: jax.device_put(jnp.asarray(x, dtype), device)  # noqa: E731
    prior = build_prior(T, k, A, put, schedule)
    mask = jax.device_put(jnp.asarray(mask), device)
    z = 0.5 * np.random.default_rng(1).normal(size=(T, k))

    def log_q(y, var, z):
        q = LDSPosterior(prior, y, potential_var=var, mask=mask, validate_args=False)
        return q.log_prob(z)

    return jax.jit(jax.value_and_grad(log_q, argnums=(0, 1, 2))), (put(y), put(var), put(z))


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
    start = time.perf_counter()
    gpu = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    print(f"jax {jax.__version__}; device: {gpu.device_kind} ({gpu.platform})", flush=True)
    # correctness: GPU (each schedule, float32) vs CPU float64 sequential
    references = {}
    for check in args.check:
        schedule, k, formula = check.split(":")
        k = int(k)
        if k not in references:
            f_ref, a_ref = kl_value_and_grad(args.check_T, k, jnp.float64, cpu, "sequential")
            references[k] = f_ref(*a_ref)
        ref_kl, (ref_gy, ref_gv) = references[k]
        for dtype in args.check_dtype:
            f, a = kl_value_and_grad(args.check_T, k, dtype, gpu, schedule, formula)
            compile_s, med = timed(f, a, args.repeats)
            kl, (gy, gv) = f(*a)
            print(
                f"check T={args.check_T} k={k} {schedule} {formula} {dtype}: "
                f"KL rel err {rel(kl, ref_kl):.1e}, grad rel err {rel(gy, ref_gy):.1e} / "
                f"{rel(gv, ref_gv):.1e}, "
                f"finite {bool(np.isfinite(kl) and np.all(np.isfinite(gy)))}; "
                f"compile {compile_s:.2f}s, median {med * 1e3:.1f} ms",
                flush=True,
            )
    # the posterior's log-density and its gradient, each schedule in float32
    if args.check_log_prob:
        f_ref, a_ref = log_prob_value_and_grad(args.check_T, 4, jnp.float64, cpu, "sequential")
        ref_lp, ref_g = f_ref(*a_ref)
        for schedule in args.check_log_prob:
            f, a = log_prob_value_and_grad(args.check_T, 4, jnp.float32, gpu, schedule)
            lp, g = f(*a)
            errs = " / ".join(f"{rel(x, r):.1e}" for x, r in zip(g, ref_g, strict=True))
            print(
                f"check T={args.check_T} k=4 {schedule} log q float32: rel err "
                f"{rel(lp, ref_lp):.1e}, grad rel err (y / var / z) {errs}, "
                f"finite {bool(np.isfinite(lp) and all(np.all(np.isfinite(x)) for x in g))}",
                flush=True,
            )
    # timings, float32, in the order given (most important first)
    too_slow = set()
    for run in args.runs:
        schedule, k, T, *formula = run.split(":")
        k, T, formula = int(k), int(T), (formula or ["shortcut"])[0]
        if time.perf_counter() - start > args.deadline:
            print(f"skip T={T} k={k} {schedule}: past the {args.deadline} s deadline")
            continue
        if (schedule, k, formula) in too_slow:
            print(f"skip T={T} k={k} {schedule} {formula}: a smaller T took over {args.budget} s")
            continue
        f, a = kl_value_and_grad(T, k, jnp.float32, gpu, schedule, formula)
        compile_s, med = timed(f, a, args.repeats)
        stats = gpu.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", float("nan")) / 2**20
        print(
            f"time T={T} k={k} float32 {schedule} {formula}: compile {compile_s:.2f}s, "
            f"median {med * 1e3:.1f} ms, {med / T * 1e9:.0f} ns/step, "
            f"peak device memory so far {peak:.0f} MiB",
            flush=True,
        )
        if med > args.budget:
            too_slow.add((schedule, k, formula))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--runs",
        nargs="+",
        default=[
            "parallel:4:1000000:general",
            "parallel:16:1000000:general",
            "sequential:4:10000:general",
            "blocked:4:100000:general",
            "parallel:4:1000000",
            "blocked:16:100000:general",
            "sequential:16:10000:general",
        ],
        help="schedule:k:T[:formula] timings in order; formula shortcut (default) or general",
    )
    p.add_argument(
        "--check",
        nargs="+",
        default=[
            "parallel:4:general",
            "sequential:4:general",
            "blocked:4:general",
            "parallel:16:general",
        ],
        help="schedule:k:formula checks against CPU float64 (formula: shortcut or general)",
    )
    p.add_argument(
        "--check-log-prob",
        nargs="*",
        default=["parallel", "sequential"],
        help="schedules whose LDSPosterior.log_prob (value + gradient) is checked, k = 4",
    )
    p.add_argument("--check-T", type=int, default=1_000, help="checked, then timed")
    p.add_argument("--check-dtype", nargs="+", default=["float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=5.0, help="seconds per run before stopping")
    p.add_argument("--deadline", type=float, default=270.0, help="start nothing after this")
    main(p.parse_args())
