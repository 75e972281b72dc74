"""Side-by-side CPU/GPU timings: numpyro_lds vs dynamax and TFP-on-JAX, in one run.

numpyro_lds, for each ``--schedule`` (sequential, blocked, parallel): the KL value, the
KL value + gradient (w.r.t. the potentials), and one posterior sample. ``KL(q ‖ q.prior)``
takes the identity ``Σ E_q log φ − log Z``; "KL+grad (Terms A-C)" is the same KL against a
second, equal prior object, as in SVI (the model's prior and the guide's are separate
objects), which takes the general formula. Peers (optional extra ``bench``; skipped with a
message if missing): dynamax's sequential ``lgssm_smoother`` and its parallel smoother (up
to ``--dynamax-parallel-max-T``: on a 2-core CPU it hangs at T = 10 000) and TFP's
``posterior_marginals``. The peers solve the same problem as ours: each sequence's
potentials are their time-varying emissions (covariances ``diag(var_t)``), and their
smoothed means are checked against ours (column ``max_abs_diff_means``).
Each function is jitted; compile time (lowering + XLA compilation) is reported apart from
the steady state, the median of ``--repeats`` calls after a warm-up call; the calls of all
methods of a size alternate (one call of each per round), so that ours and the peers share
the machine's slow and fast spells. Reported: ns per
sequence-step, the ratio to dynamax's sequential smoother, and XLA's memory estimate
(arguments + outputs + temporaries of the compiled function) as peak memory.

To keep a run bounded, a method is skipped (with a message) at a T where its time at the
previous T, scaled linearly, exceeds ``--budget-s``, and a size is skipped where
``T·batch·k²`` exceeds ``--max-elements`` (memory).

    python benchmarks/bench_kl.py --T 100 1000 10000 --k 4 16 --batch 1 --dtype float32
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.kl import kl_divergence

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace


def problem(T, k, batch, dtype, seed=0):
    rng = np.random.default_rng(seed)
    A = 0.95 * np.linalg.qr(rng.normal(size=(k, k)))[0]
    return dict(
        A=jnp.asarray(A, dtype),
        Q=jnp.asarray(0.1 * np.eye(k), dtype),
        m0=jnp.zeros(k, dtype),
        P0=jnp.eye(k, dtype=dtype),
        y=jnp.asarray(rng.normal(size=(batch, T, k)), dtype),
        var=jnp.asarray(rng.uniform(0.5, 2.0, size=(batch, T, k)), dtype),
    )


def ours(p, schedule):
    T = p["y"].shape[1]
    prior = LinearGaussianStateSpace(
        p["m0"], p["P0"], p["A"], p["Q"], num_steps=T, schedule=schedule, validate_args=False
    )

    # The same prior, built a second time: what SVI compares (the guide's prior and the
    # model's are separate objects), so the KL takes the general formula, Terms A-C.
    rebuilt = LinearGaussianStateSpace(
        p["m0"], p["P0"], p["A"], p["Q"], num_steps=T, schedule=schedule, validate_args=False
    )

    def kl(y, var, p_dist=prior):
        q = LDSPosterior(prior, y, potential_var=var, validate_args=False)
        return jnp.sum(kl_divergence(q, p_dist))

    def kl_general(y, var):
        return kl(y, var, rebuilt)

    def sample(y, var):
        return LDSPosterior(prior, y, potential_var=var, validate_args=False).sample(
            jax.random.key(0)
        )

    tag = f" [{schedule}]"
    return {
        "numpyro_lds KL" + tag: (kl, (p["y"], p["var"])),
        "numpyro_lds KL+grad" + tag: (jax.value_and_grad(kl, argnums=(0, 1)), (p["y"], p["var"])),
        "numpyro_lds KL+grad (Terms A-C)" + tag: (
            jax.value_and_grad(kl_general, argnums=(0, 1)),
            (p["y"], p["var"]),
        ),
        "numpyro_lds sample" + tag: (sample, (p["y"], p["var"])),
    }


def dynamax_fns(p, parallel):
    """dynamax's smoothers on the same problem: the potentials as time-varying emissions.

    Each sequence's potential covariances ``diag(var_t)`` are its emission covariances
    (``[T, k, k]``, vmapped with the data), so the covariance recursion is per sequence, as
    in ours. "(R shared)" is the problem of earlier runs, kept for batches only: one fixed
    emission covariance, whose covariance recursion does not depend on the data, so that
    ``vmap`` computes it once for the whole batch (a different, easier problem).
    """
    try:
        from dynamax.linear_gaussian_ssm import lgssm_smoother
        from dynamax.linear_gaussian_ssm.inference import make_lgssm_params
        from dynamax.linear_gaussian_ssm.parallel_inference import lgssm_smoother as par_smoother
    except Exception as e:  # noqa: BLE001 - any import failure means "skip this peer"
        print(f"skipping dynamax: {type(e).__name__}: {e}")
        return {}
    k = p["m0"].shape[0]
    eye = jnp.eye(k, dtype=p["A"].dtype)

    def params(emission_cov):
        return make_lgssm_params(p["m0"], p["P0"], p["A"], p["Q"], eye, emission_cov)

    def smoother(run):
        def fn(y, var):
            one = lambda yy, vv: run(params(jax.vmap(jnp.diag)(vv)), yy).smoothed_means  # noqa: E731
            return jax.vmap(one)(y, var)

        return fn

    def shared(y, var):
        return jax.vmap(lambda yy: lgssm_smoother(params(eye), yy).smoothed_means)(y)

    out = {"dynamax smoother (sequential)": (smoother(lgssm_smoother), (p["y"], p["var"]))}
    if parallel:
        out["dynamax smoother (parallel)"] = (smoother(par_smoother), (p["y"], p["var"]))
    if p["y"].shape[0] > 1:
        out["dynamax smoother (sequential, R shared)"] = (shared, (p["y"], p["var"]))
    return out


def import_tfp():
    """TFP on JAX, or ``None`` (with a message) where it does not import."""
    try:
        import tensorflow_probability.substrates.jax as tfp
    except Exception as e:  # noqa: BLE001 - any import failure means "skip this peer"
        print(f"skipping TFP: {type(e).__name__}: {e}")
        return None
    return tfp


def tfp_model(tfp, p, A, Q, var):
    """TFP's ``LinearGaussianStateSpaceModel`` of ``p``'s problem for one sequence: the
    potentials as step-by-step emissions (as :func:`dynamax_fns`)."""
    tfd = tfp.distributions
    T, k = p["y"].shape[1], p["m0"].shape[0]
    return tfd.LinearGaussianStateSpaceModel(
        num_timesteps=T,
        transition_matrix=tfp.tf2jax.linalg.LinearOperatorFullMatrix(A),
        transition_noise=tfd.MultivariateNormalTriL(scale_tril=jnp.linalg.cholesky(Q)),
        observation_matrix=tfp.tf2jax.linalg.LinearOperatorIdentity(k, dtype=A.dtype),
        observation_noise=lambda t: tfd.MultivariateNormalDiag(scale_diag=jnp.sqrt(var[t])),
        initial_state_prior=tfd.MultivariateNormalTriL(p["m0"], jnp.linalg.cholesky(p["P0"])),
    )


def tfp_fns(p):
    tfp = import_tfp()
    if tfp is None:
        return {}

    def marginals(y, var):
        return tfp_model(tfp, p, p["A"], p["Q"], var).posterior_marginals(y)[0]

    return {"TFP posterior_marginals": (jax.vmap(marginals), (p["y"], p["var"]))}


def compile_once(fn, args):
    """(compiled call, compile seconds, XLA memory estimate in bytes, warm-up output)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    output = jax.block_until_ready(compiled(*args))  # warm-up
    return compiled, compile_s, peak, output


def interleaved_medians(calls, repeats):
    """Median seconds of each ``(compiled, args)`` in ``calls`` (a dict), their calls
    alternated: one call of each method per round, so that a slow or fast spell of the
    shared machine falls on every method of a size alike. Timed one method after another,
    a peer's median moved by 1.6x between whole runs (dynamax, k = 16, T = 1 000: 24 ms
    against 14-16 ms), and with it every ratio of that size."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (compiled, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def posterior_means(p):
    """Our smoothed means, which every peer's output is checked against."""
    T = p["y"].shape[1]
    prior = LinearGaussianStateSpace(p["m0"], p["P0"], p["A"], p["Q"], num_steps=T)
    mean = jax.jit(lambda y, var: LDSPosterior(prior, y, potential_var=var).mean)
    return mean(p["y"], p["var"])


def plot(rows, out):
    """Log-log plots of median time vs T (float32): one panel per (batch, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dtype"] == "float32"]
    batches = sorted({int(r["batch"]) for r in rows})
    ks = sorted({int(r["k"]) for r in rows})
    fig, axes = plt.subplots(
        len(batches), len(ks), figsize=(4 * len(ks), 3.5 * len(batches)), squeeze=False
    )
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for (i, b), (j, k) in itertools.product(enumerate(batches), enumerate(ks)):
        ax = axes[i, j]
        for m_idx, name in enumerate(methods):
            pts = [
                (int(r["T"]), float(r["median_ms"]))
                for r in rows
                if r["method"] == name and int(r["k"]) == k and int(r["batch"]) == b
            ]
            if pts:
                style = "--" if not name.startswith("numpyro_lds") else "-"
                ax.loglog(
                    *zip(*pts, strict=True),
                    style,
                    marker="o",
                    ms=3,
                    label=name,
                    color=plt.get_cmap("tab20")(m_idx % 20),
                )
        if not ax.lines:
            ax.set_axis_off()
            continue
        ax.set_title(f"batch {b}, k = {k}", fontsize=9)
        ax.set_xlabel("T")
        ax.set_ylabel("median time (ms)")
    legend = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(Path(out) / "bench_kl.png", dpi=90)
    plt.close(fig)


def main(args):
    if args.plot_only:
        with open(Path(args.out) / "bench_kl.csv") as f:
            plot(list(csv.DictReader(f)), args.out)
        return
    if "float64" in args.dtype:
        jax.config.update("jax_enable_x64", True)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device {device.device_kind} ({device.platform})")
    rows = []
    if args.append and (Path(args.out) / "bench_kl.csv").exists():
        with open(Path(args.out) / "bench_kl.csv") as f:
            rows = list(csv.DictReader(f))
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        for batch in args.batch:
            for k in args.k:
                last = {}  # method -> (T, median seconds) at the previous T
                for T in args.T:
                    if T * batch * k * k > args.max_elements:
                        print(f"skip {dtype_name} B={batch} k={k} T={T}: T·batch·k² too large")
                        continue
                    p = problem(T, k, batch, dtype)
                    fns = {}
                    for schedule in args.schedule:
                        fns.update(ours(p, schedule))
                    if not args.skip_peers:
                        fns.update(dynamax_fns(p, T <= args.dynamax_parallel_max_T))
                        fns.update(tfp_fns(p))
                    base, new_rows = None, []
                    reference = None if args.skip_peers else posterior_means(p)
                    compiled = {}
                    for name, (fn, fargs) in fns.items():
                        if name in last and last[name][1] * T / last[name][0] > args.budget_s:
                            print(f"skip {name} at T={T}: over the {args.budget_s} s budget")
                            continue
                        call, compile_s, peak, output = compile_once(fn, fargs)
                        # Same problem, same answer: a peer's smoothed means against ours.
                        diff = None
                        if not name.startswith("numpyro_lds") and "R shared" not in name:
                            diff = float(jnp.max(jnp.abs(output - reference)))
                        del output
                        compiled[name] = (call, fargs, compile_s, peak, diff)
                    medians = interleaved_medians(
                        {name: (c[0], c[1]) for name, c in compiled.items()}, args.repeats
                    )
                    for name, (_, _, compile_s, peak, diff) in compiled.items():
                        med = medians[name]
                        last[name] = (T, med)
                        if name == "dynamax smoother (sequential)":
                            base = med
                        new_rows.append(
                            dict(
                                method=name,
                                dtype=dtype_name,
                                batch=batch,
                                k=k,
                                T=T,
                                compile_s=round(compile_s, 3),
                                median_ms=round(med * 1e3, 3),
                                ns_per_step=round(med / (T * batch) * 1e9, 1),
                                peak_mb=None if peak is None else round(peak / 2**20, 1),
                                max_abs_diff_means=None if diff is None else f"{diff:.1e}",
                            )
                        )
                        print(
                            f"{dtype_name} B={batch} k={k} T={T} {name:48s} "
                            f"compile {compile_s:6.2f}s  median {med * 1e3:9.2f} ms  "
                            f"{med / (T * batch) * 1e9:9.0f} ns/step"
                            + ("" if diff is None else f"  max |Δmean| vs ours {diff:.1e}"),
                            flush=True,
                        )
                    if base is None:  # peers skipped: the dynamax row of an earlier run
                        base = next(
                            (
                                float(r["median_ms"]) / 1e3
                                for r in rows
                                if r["method"] == "dynamax smoother (sequential)"
                                and (r["dtype"], int(r["batch"]), int(r["k"]), int(r["T"]))
                                == (dtype_name, batch, k, T)
                            ),
                            None,
                        )
                    for r in new_rows:
                        ratio = None if base is None else r["median_ms"] / (base * 1e3)
                        r["ratio_to_dynamax_seq"] = None if ratio is None else round(ratio, 3)
                    # A rerun of a size replaces its earlier rows (--append).
                    new_keys = {_key(r) for r in new_rows}
                    rows = [r for r in rows if _key(r) not in new_keys] + new_rows
                    write(rows, args.out, device)
    print(f"wrote {args.out}/bench_kl.csv, .md, .png")


def _key(row):
    return (row["method"], row["dtype"], int(row["batch"]), int(row["k"]), int(row["T"]))


def write(rows, out, device):
    """CSV, markdown table and plot of all rows so far (rewritten after every size)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(c for r in rows for c in r))
    with open(out / "bench_kl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(out / "bench_kl.md", "w") as f:
        flags = os.environ.get("XLA_FLAGS", "")
        setting = f", XLA_FLAGS={flags!r}" if flags else ""
        f.write(f"jax {jax.__version__}, {device.device_kind} ({device.platform}){setting}\n\n")
        f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for r in rows:
            cells = ("" if r.get(c) is None else str(r.get(c)) for c in fields)
            f.write("| " + " | ".join(cells) + " |\n")
    plot(rows, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--T", type=int, nargs="+", default=[100, 1_000, 10_000, 100_000])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 16, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--schedule", nargs="+", default=["sequential", "blocked", "parallel"], help="ours"
    )
    ap.add_argument("--dynamax-parallel-max-T", type=int, default=1_000)
    ap.add_argument("--budget-s", type=float, default=10.0, help="per call, extrapolated")
    ap.add_argument("--max-elements", type=float, default=1e8, help="T·batch·k² limit")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV")
    ap.add_argument("--append", action="store_true", help="add to (or replace) the rows in the CSV")
    ap.add_argument("--skip-peers", action="store_true", help="time numpyro_lds only")
    main(ap.parse_args())
