"""Exact KL (TraceMeanField_ELBO) vs sampled KL (Trace_ELBO) on the same LDS models.

(a) Gradient variance. A 2-D rotating LDS (T = 100) observed in Gaussian noise of sd
``r``; guide: :class:`~numpyro_lds.AutoLDSGuide` with free potentials, at its initial
(non-optimal) parameters. For each ``r`` the ELBO gradient w.r.t. every guide parameter
is computed for ``--seeds`` random keys with each ELBO; reported is the total variance
(sum over parameter coordinates of the per-coordinate variance across seeds) and the ratio
sampled / exact, with a bootstrap 90% interval. Where observations are precise the
likelihood term dominates and the ratio tends to 1; where they are noisy the KL dominates.

(b) Time to a fixed ELBO. The constant-velocity tracking model of
``examples/lds_tracking.py`` (k = 4, T = 100, noise levels learned), fitted by SVI with
Adam from the same start with each ELBO and each learning rate of ``--learning-rates``
(the same grid for both: a gradient of lower variance may tolerate a larger step, and
comparing each ELBO at its own best step size is the fair comparison; the table also
lists every run, so the same-rate comparison is there too). Every ``--eval-every`` steps
the exact ELBO (TraceMeanField_ELBO, 64 particles, fixed key) is evaluated; reported are
the steps and the wall-clock (steps × the median time of one SVI step, the two ELBOs' steps
timed interleaved, apart from the fits) to first reach a target ELBO: the best value of
any run minus 1% of its improvement over the common start. The tracks are simulated with
each observation noise of ``--tracking-obs-sd``: the example's 0.5 (precise: the likelihood
dominates the gradient's variance) and 5.0 (noisy: the KL's share grows); for each, the
gradient-variance ratio at the common start is reported too.

    python benchmarks/exact_vs_sampled_kl.py            # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.initialization import init_to_value

from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace

RESULTS = Path(__file__).parent / "results"
ELBOS = {
    "exact KL (TraceMeanField_ELBO)": TraceMeanField_ELBO,
    "sampled KL (Trace_ELBO)": Trace_ELBO,
}


# ----------------------------------------------------------------- (a) gradient variance


def rotation_prior(T):
    th = 0.2
    A = 0.98 * jnp.array([[jnp.cos(th), -jnp.sin(th)], [jnp.sin(th), jnp.cos(th)]])
    return LinearGaussianStateSpace(jnp.zeros(2), jnp.eye(2), A, 0.1 * jnp.eye(2), num_steps=T)


def variance_model(y, r):
    z = numpyro.sample("z", rotation_prior(y.shape[0]))
    numpyro.sample("y", dist.Normal(z, r).to_event(2), obs=y)


def gradient_variance(r, T, seeds, elbo_cls):
    z = rotation_prior(T).sample(jax.random.key(0))
    y = z + r * jax.random.normal(jax.random.key(1), z.shape)
    guide = AutoLDSGuide(variance_model)
    svi = SVI(variance_model, guide, numpyro.optim.Adam(1e-3), elbo_cls())
    params = svi.get_params(svi.init(jax.random.key(2), y, r))
    loss = elbo_cls()

    def grad(key):
        g = jax.grad(lambda p: loss.loss(key, p, variance_model, guide, y, r))(params)
        return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])

    grads = np.asarray(jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(3), seeds)))
    return grads


def total_variance(grads):
    return float(np.sum(np.var(grads, axis=0, ddof=1)))


def bootstrap_ratio(g_sampled, g_exact, rng, n=500):
    s = g_sampled.shape[0]
    out = []
    for _ in range(n):
        i, j = rng.integers(0, s, s), rng.integers(0, s, s)
        out.append(total_variance(g_sampled[i]) / total_variance(g_exact[j]))
    return np.percentile(out, [5, 95])


def part_a(args):
    rows = []
    rng = np.random.default_rng(0)
    for r in args.obs_sd:
        g = {name: gradient_variance(r, args.T, args.seeds, cls) for name, cls in ELBOS.items()}
        ge, gs = g["exact KL (TraceMeanField_ELBO)"], g["sampled KL (Trace_ELBO)"]
        ve, vs = total_variance(ge), total_variance(gs)
        lo, hi = bootstrap_ratio(gs, ge, rng)
        rows.append((r, ve, vs, vs / ve, lo, hi))
        print(
            f"obs sd {r:8.3f}: var exact {ve:.4e} sampled {vs:.4e} ratio {vs / ve:8.2f} "
            f"(90% CI {lo:.2f}–{hi:.2f})",
            flush=True,
        )
    return rows


# --------------------------------------------------------------- (b) time to an ELBO


def fit(name, elbo_cls, learning_rate, args, model, y, z0, evaluator):
    """One SVI run: the ELBO curve, every ``--eval-every`` steps."""
    svi, state = _svi(elbo_cls, learning_rate, model, y, z0)
    update = jax.jit(svi.update)

    def elbo_of(s):
        return -evaluator.loss(jax.random.key(9), svi.get_params(s), model, svi.guide, y)

    elbo = jax.jit(elbo_of)
    curve = [(0, float(elbo(state)))]
    for step in range(1, args.tracking_steps + 1):
        state, _ = update(state, y)
        if step % args.eval_every == 0:
            value = float(elbo(state))
            curve.append((step, value if np.isfinite(value) else -np.inf))
    print(f"{name}, lr {learning_rate}: best ELBO {max(v for _, v in curve):.2f}", flush=True)
    return curve


def _svi(elbo_cls, learning_rate, model, y, z0):
    guide = AutoLDSGuide(model, init_loc_fn=init_to_value(values={"z": z0}), init_scale=1.0)
    svi = SVI(model, guide, numpyro.optim.Adam(learning_rate), elbo_cls())
    return svi, svi.init(jax.random.key(1), y)


def step_times(args, model, y, z0):
    """Median time of one compiled SVI step per ELBO, the ELBOs' steps interleaved.

    Timed apart from the fits, in alternating blocks of ``--timing-block`` steps, so that
    the shared machine's slow and fast spells fall on both alike (timed run by run, the
    same code's median moved by 1.5x between runs) while each block runs warm, as a fit
    does.
    """
    updates = {}
    for name, cls in ELBOS.items():
        svi, state = _svi(cls, args.learning_rates[0], model, y, z0)
        update = jax.jit(svi.update)
        jax.block_until_ready(update(state, y))  # compile
        updates[name] = (update, state)
    times = {name: [] for name in ELBOS}
    for _ in range(max(1, args.timing_repeats // args.timing_block)):
        for name, (update, state) in updates.items():
            for _ in range(args.timing_block):
                t0 = time.perf_counter()
                jax.block_until_ready(update(state, y))
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, secs in medians.items():
        print(f"{name}: median {1e3 * secs:.3f} ms/step (interleaved)", flush=True)
    return medians


def start_variance_ratio(model, y, z0, seeds):
    """Sampled / exact total variance of the ELBO gradient at the fits' common start."""
    variances = {}
    for name, cls in ELBOS.items():
        svi, state = _svi(cls, 0.01, model, y, z0)
        params, loss = svi.get_params(state), cls()

        def grad(key, params=params, loss=loss, guide=svi.guide):
            g = jax.grad(lambda p: loss.loss(key, p, model, guide, y))(params)
            return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])

        keys = jax.random.split(jax.random.key(4), seeds)
        variances[name] = total_variance(np.asarray(jax.jit(jax.vmap(grad))(keys)))
    exact, sampled = variances.values()
    return sampled / exact


def part_b(args, obs_sd):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from lds_tracking import model, simulate

    print(f"tracking model, observations simulated with sd {obs_sd}", flush=True)
    _, y = simulate(jax.random.key(0), args.tracking_T, r=obs_sd)
    z0 = jnp.concatenate([y, jnp.zeros_like(y)], axis=-1)
    evaluator = TraceMeanField_ELBO(num_particles=64)
    ratio = start_variance_ratio(model, y, z0, args.seeds)
    print(f"gradient variance at the start, sampled / exact: {ratio:.2f}", flush=True)
    step_time = step_times(args, model, y, z0)
    runs = {
        (name, lr): (fit(name, cls, lr, args, model, y, z0, evaluator), step_time[name])
        for name, cls in ELBOS.items()
        for lr in args.learning_rates
    }
    start = next(iter(runs.values()))[0][0][1]
    best = max(v for curve, _ in runs.values() for _, v in curve)
    target = best - 0.01 * (best - start)
    reached = {}
    for key, (curve, secs_per_step) in runs.items():
        step = next((s for s, v in curve if v >= target), None)
        reached[key] = (step, None if step is None else step * secs_per_step)
    best_lr = {}
    for name in ELBOS:
        done = [(secs, lr) for (n, lr), (_, secs) in reached.items() if n == name and secs]
        best_lr[name] = min(done)[1] if done else None
        print(f"{name}: target ELBO {target:.2f}, fastest at lr {best_lr[name]}")
    return runs, target, reached, best_lr, ratio


# ---------------------------------------------------------------------------- output


def write(args, rows, b):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    header = f"jax {jax.__version__}, numpyro {numpyro.__version__}, {jax.devices()[0].platform}"
    lines = ["# Exact vs sampled KL", "", header, ""]
    lines += [
        f"## (a) ELBO-gradient variance, {args.seeds} seeds, T = {args.T}, k = 2",
        "",
        "| obs sd | total var (exact KL) | total var (sampled KL) | ratio sampled/exact | 90% CI |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r} | {ve:.4e} | {vs:.4e} | {q:.2f} | {lo:.2f}–{hi:.2f} |"
        for r, ve, vs, q, lo, hi in rows
    ]
    panels = 1 + len(b)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    rs = [row[0] for row in rows]
    ax.loglog(rs, [row[3] for row in rows], "o-", label="sampled / exact")
    ax.fill_between(rs, [row[4] for row in rows], [row[5] for row in rows], alpha=0.3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("observation noise sd")
    ax.set_ylabel("ELBO-gradient variance ratio")
    ax.set_title(f"gradient variance, {args.seeds} seeds")
    ax.legend()
    for panel, (obs_sd, (runs, target, reached, best_lr, ratio)) in enumerate(b.items(), 1):
        grid = ", ".join(str(lr) for lr in args.learning_rates)
        table_head = [
            "| ELBO | lr | median ms/step | steps to target | wall-clock to target (s) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            "",
            f"## (b) Tracking model (k = 4, T = {args.tracking_T}), observations simulated "
            f"with sd {obs_sd}, Adam, lr grid {grid}",
            "",
            f"ELBO-gradient variance at the common start ({args.seeds} seeds), sampled / "
            f"exact: {ratio:.2f}.",
            "",
            f"Target ELBO {target:.2f} (exact ELBO, 64 particles, fixed key): the best value "
            "of any run minus 1% of its improvement over the common start.",
            "",
            f"Median ms/step: one SVI step, {args.timing_repeats} per ELBO, the two ELBOs "
            f"alternating in blocks of {args.timing_block}, timed apart from the fits.",
            "",
            "Each ELBO at its fastest learning rate of the grid:",
            "",
            *table_head,
        ]

        def row(name, lr, runs=runs, reached=reached):
            step, secs = reached[(name, lr)]
            secs_s = "not reached" if secs is None else f"{secs:.2f}"
            ms = 1e3 * runs[(name, lr)][1]
            return f"| {name} | {lr} | {ms:.2f} | {step} | {secs_s} |"

        lines += [row(name, lr) for name, lr in best_lr.items() if lr is not None]
        lines += ["", "Every run:", "", *table_head]
        lines += [row(name, lr) for name, lr in runs]
        ax = axes[0, panel]
        for name, lr in best_lr.items():
            if lr is None:
                continue
            curve, step_time = runs[(name, lr)]
            s, v = zip(*curve, strict=True)
            ax.plot(np.asarray(s) * step_time, v, label=f"{name}, lr {lr}")
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("ELBO (64-particle estimate)")
        shown = [runs[(n, lr)][0] for n, lr in best_lr.items() if lr is not None]
        hi = max(v for c in shown for _, v in c)
        lo = min(target, *(v for c in shown for _, v in c[len(c) // 10 :]))
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_title(f"tracking model, obs sd {obs_sd}: each ELBO at its fastest lr")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "exact_vs_sampled_kl.png", dpi=100)
    (RESULTS / "exact_vs_sampled_kl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args):
    rows = part_a(args)
    b = {} if args.skip_tracking else {r: part_b(args, r) for r in args.tracking_obs_sd}
    write(args, rows, b)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--obs-sd", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
    )
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--seeds", type=int, default=256)
    p.add_argument("--tracking-T", type=int, default=100)
    p.add_argument(
        "--tracking-obs-sd",
        type=float,
        nargs="+",
        default=[0.5, 5.0],
        help="observation noise of the simulated tracks: the example's 0.5, and a noisy one",
    )
    p.add_argument("--tracking-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--timing-repeats", type=int, default=1000, help="SVI steps timed per ELBO")
    p.add_argument("--timing-block", type=int, default=50, help="consecutive steps per ELBO")
    p.add_argument(
        "--learning-rates", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1]
    )
    p.add_argument("--skip-tracking", action="store_true")
    main(p.parse_args())
