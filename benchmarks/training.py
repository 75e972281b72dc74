"""Training speed: steps and wall-clock to a target ELBO, every method in one run.

Problems (each with the defaults a user gets: ``AutoLDSGuide(model)``):

- ``tracking``: constant-velocity tracking (``k = 4``, ``T = 100``, positions observed),
  learned process-noise intensity and observation sd (``examples/lds_tracking.py``).
- ``nile``: a local-level model of the Nile's annual flow (1871-1970, 100 points, in its
  own units, 10⁸ m³), both variances learned from 1.0.
- ``poisson``: a Poisson LDS of population spike counts (``k = 4``, 50 neurons,
  ``T = 1 000``, log link), loadings known: the posterior alone is fitted.
- ``svae``: the structured VAE of ``examples/svae.py`` (16 sequences of 50 frames of 32
  pixels, an MLP decoder, learned dynamics): the encoder's potentials (the example's guide)
  against free potentials per sequence, which ``NaturalGradientSVI`` steps (full ``k x k``,
  as the decoder couples the latents) while Adam trains the decoder and the dynamics.

Methods: ``NaturalGradientSVI`` (Adam for the model's parameters), ``SVI`` with the exact KL
(``TraceMeanField_ELBO``) and with the sampled one (``Trace_ELBO``), each with Adam at every
rate of a grid (the comparison takes each method's best), and NumPyro's
``AutoMultivariateNormal`` (``Trace_ELBO``) where its ``T·k`` dimensions fit (tracking,
nile). Every run is compiled once (its compile time
is reported apart), then timed in chunks of steps; a chunk's mean loss is its ELBO. The
target of a problem is fixed before any timing is read: the best final ELBO of the
structured guide's runs less 1% of its improvement over their start.

    python benchmarks/training.py [--problems tracking nile poisson]

Writes ``benchmarks/results/training.md`` and ``training.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal

from numpyro_lds import AutoLDSGuide, LinearGaussianStateSpace, NaturalGradientSVI

RESULTS = os.path.join(os.path.dirname(__file__), "results")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

# The Nile's annual flow at Aswan, 1871-1970, 10⁸ m³ (Durbin & Koopman 2012, ch. 2).
NILE = np.array(
    [1120, 1160, 963, 1210, 1160, 1160, 813, 1230, 1370, 1140, 995, 935, 1110, 994, 1020,
     960, 1180, 799, 958, 1140, 1100, 1210, 1150, 1250, 1260, 1220, 1030, 1100, 774, 840,
     874, 694, 940, 833, 701, 916, 692, 1020, 1050, 969, 831, 726, 456, 824, 702, 1120,
     1100, 832, 764, 821, 768, 845, 864, 862, 698, 845, 744, 796, 1040, 759, 781, 865,
     845, 944, 984, 897, 822, 1010, 771, 676, 649, 846, 812, 742, 801, 1040, 860, 874,
     848, 890, 744, 749, 838, 1050, 918, 986, 797, 923, 975, 815, 1020, 906, 901, 1170,
     912, 746, 919, 718, 714, 740],
    dtype=np.float32,
)  # fmt: skip


def nile_problem():
    def model(y):
        obs_var = numpyro.param("obs_var", 1.0, constraint=dist.constraints.positive)
        level_var = numpyro.param("level_var", 1.0, constraint=dist.constraints.positive)
        prior = LinearGaussianStateSpace(
            jnp.array([1000.0]), jnp.array([[1e6]]), jnp.eye(1), level_var * jnp.eye(1),
            num_steps=y.shape[0],
        )  # fmt: skip
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Normal(z, jnp.sqrt(obs_var)).to_event(2), obs=y)

    return model, (jnp.asarray(NILE[:, None]),)


def tracking_problem():
    import lds_tracking

    _, y = lds_tracking.simulate(jax.random.key(0), 100)
    return lds_tracking.model, (y,)


def poisson_problem():
    import poisson_lds

    k, n, T = 4, 50, 1000
    _, _, y = poisson_lds.simulate(jax.random.key(0), k, n, T)
    C = 0.5 * jax.random.normal(jax.random.split(jax.random.key(0), 3)[1], (n, k))

    def model(y):
        z = numpyro.sample("z", poisson_lds.prior(k, y.shape[0]))
        numpyro.sample("y", dist.Poisson(jnp.exp(z @ C.T + jnp.log(2.0))).to_event(2), obs=y)

    return model, (y,)


def svae_problem():
    import svae

    _, x = svae.make_video(jax.random.key(0), 16, 50, 32)
    return svae.model, (x,)


PROBLEMS = {
    "tracking": tracking_problem,
    "nile": nile_problem,
    "poisson": poisson_problem,
    "svae": svae_problem,
}


def svae_methods(model, args):
    """The structured VAE: free potentials (natural or Adam steps) and the example's encoder."""
    import svae

    def encoder_guide():
        return AutoLDSGuide(model, encoder=svae.encoder, create_plates=svae.plates)

    out = {}
    for lr in args.rates:
        out[f"natural gradient, Adam({lr})"] = NaturalGradientSVI(
            model,
            AutoLDSGuide(model, potential_form="full", create_plates=svae.plates),
            numpyro.optim.Adam(lr),
            TraceMeanField_ELBO(),
            natural_step_size=0.5,
        )
        out[f"exact KL, Adam({lr})"] = SVI(
            model,
            AutoLDSGuide(model, create_plates=svae.plates),
            numpyro.optim.Adam(lr),
            TraceMeanField_ELBO(),
        )
        out[f"exact KL, encoder, Adam({lr})"] = SVI(
            model, encoder_guide(), numpyro.optim.Adam(lr), TraceMeanField_ELBO()
        )
        out[f"sampled KL, encoder, Adam({lr})"] = SVI(
            model, encoder_guide(), numpyro.optim.Adam(lr), Trace_ELBO()
        )
    return {label: (svi, args.svae_steps) for label, svi in out.items()}


def methods(problem, model, args):
    """``{label: (svi, num_steps)}``; the Adam runs over a grid of rates."""
    if problem == "svae":
        return svae_methods(model, args)
    full = problem == "poisson"
    form = "full" if full else "diagonal"
    step_size = 0.5 if full else 1.0
    steps = args.poisson_steps if problem == "poisson" else args.steps
    out = {}
    for lr in args.rates:
        out[f"natural gradient, Adam({lr})"] = (
            NaturalGradientSVI(
                model,
                AutoLDSGuide(model, potential_form=form),
                numpyro.optim.Adam(lr),
                TraceMeanField_ELBO(),
                natural_step_size=step_size,
            ),  # fmt: skip
            steps,
        )
    for lr in args.rates:
        out[f"exact KL, Adam({lr})"] = (
            SVI(model, AutoLDSGuide(model), numpyro.optim.Adam(lr), TraceMeanField_ELBO()),
            steps,
        )
        out[f"sampled KL, Adam({lr})"] = (
            SVI(model, AutoLDSGuide(model), numpyro.optim.Adam(lr), Trace_ELBO()),
            steps,
        )
        if problem != "poisson":
            out[f"AutoMultivariateNormal, Adam({lr})"] = (
                SVI(model, AutoMultivariateNormal(model), numpyro.optim.Adam(lr), Trace_ELBO()),
                steps,
            )
    return out


_METHOD_COLORS = {
    "natural gradient": "C0",
    "exact KL, encoder": "C4",
    "sampled KL, encoder": "C5",
    "exact KL": "C1",
    "sampled KL": "C2",
    "AutoMultivariateNormal": "C3",
}


def _line_style(label, rates):
    """One colour per method, one line style per learning rate."""
    color = next(c for m, c in _METHOD_COLORS.items() if label.startswith(m))
    styles = ["-", "--", ":", "-."]
    rate = next((i for i, r in enumerate(rates) if f"Adam({r})" in label), 0)
    return color, styles[rate % len(styles)]


def _figure_legend(fig, rates):
    """Colours name the methods, line styles the learning rates (one legend for all panels)."""
    from matplotlib.lines import Line2D

    for legend in fig.legends:
        legend.remove()
    handles = [Line2D([], [], color=c, label=m) for m, c in _METHOD_COLORS.items()]
    handles += [
        Line2D(
            [],
            [],
            color="gray",
            ls=_line_style(f"exact KL, Adam({r})", rates)[1],
            label=f"Adam({r})",
        )
        for r in rates
    ]
    handles.append(Line2D([], [], color="k", ls=":", lw=1, label="target"))
    fig.legend(handles=handles, loc="lower center", ncol=(len(handles) + 1) // 2, fontsize=8)


def timed_run(svi, num_steps, data, chunk, seed=0):
    """ELBO per chunk of steps and the cumulative seconds after it; compile time apart."""
    state = svi.init(jax.random.key(seed), *data)

    @jax.jit
    def run_chunk(state):
        return lax.scan(lambda s, _: svi.update(s, *data), state, None, length=chunk)

    t0 = time.perf_counter()
    jax.block_until_ready(run_chunk(state))
    compile_s = time.perf_counter() - t0
    elbos, seconds, elapsed = [], [], 0.0
    for _ in range(num_steps // chunk):
        t0 = time.perf_counter()
        state, losses = run_chunk(state)
        losses = np.asarray(jax.block_until_ready(losses))
        elapsed += time.perf_counter() - t0
        elbos.append(-float(np.mean(losses)))
        seconds.append(elapsed)
    return np.array(elbos), np.array(seconds), compile_s


def main(args):
    import matplotlib.pyplot as plt

    report = [
        "# Training speed: wall-clock to a target ELBO",
        "",
        "`python benchmarks/training.py` (this project's 2-core CPU, float32, one process; "
        f"chunks of {args.chunk} steps, a chunk's mean loss as its ELBO). Target: the best "
        "final ELBO less 1% of its improvement over the start. Times exclude "
        "compilation (column `compile`). `-`: the target was not reached. The target and the "
        "start come from the structured guide's runs (AutoMultivariateNormal's diverged at "
        "some rates: its Trace_ELBO at a singular covariance).",
        "",
    ]
    cols = min(2, len(args.problems))
    rows_ = -(-len(args.problems) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(7 * cols, 5.5 * rows_), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(args.problems) :]:
        ax.set_visible(False)
    for ax, problem in zip(axes, args.problems, strict=True):
        curves = os.path.join(RESULTS, f"{args.name}_{problem}.npz")
        if args.replot:  # the curves of the last run, for a figure change without rerunning
            saved = np.load(curves)
            runs = {
                str(label): (saved[f"elbos{i}"], saved[f"seconds{i}"], float(saved[f"compile{i}"]))
                for i, label in enumerate(saved["labels"])
            }
        else:
            model, data = PROBLEMS[problem]()
            runs = {}
            for label, (svi, steps) in methods(problem, model, args).items():
                runs[label] = timed_run(svi, steps, data, args.chunk)
                print(f"{problem}: {label}: final ELBO {runs[label][0][-1]:.1f}", flush=True)
            os.makedirs(RESULTS, exist_ok=True)
            arrays = {"labels": np.array(list(runs))}
            for i, (elbos, seconds, compile_s) in enumerate(runs.values()):
                arrays.update(
                    {f"elbos{i}": elbos, f"seconds{i}": seconds, f"compile{i}": compile_s}
                )
            np.savez(curves, **arrays)
        # The target comes from the structured guide's runs: a diverged AutoMultivariateNormal
        # run's loss can reach -1e25 (its Trace_ELBO at a singular covariance).
        ours = [r for label, r in runs.items() if not label.startswith("AutoMultivariate")]
        start = np.nanmedian([r[0][0] for r in ours])
        best = max(np.nanmax(r[0][-3:]) for r in ours)
        target = best - 0.01 * (best - start)
        rows = []
        for label, (elbos, seconds, compile_s) in runs.items():
            # a run whose ELBO leaves the range of the structured runs has diverged
            diverged = bool(np.nanmax(elbos) > best + abs(best - start))
            hit = np.nonzero(elbos >= target)[0] if not diverged else np.array([], int)
            if diverged:
                label += " (diverged)"
            if np.isnan(elbos).any():
                label += f" ({int(np.isnan(elbos).sum())} chunks with a NaN loss)"
            steps = (hit[0] + 1) * args.chunk if hit.size else None
            wall = seconds[hit[0]] if hit.size else None
            rows.append((label, steps, wall, compile_s, elbos[-1], seconds[-1] / len(elbos)))
            color, style = _line_style(label, args.rates)
            finite = np.where(np.isfinite(elbos), elbos, np.nan)
            if not diverged:  # a diverged run's curve is a vertical line off the scale
                ax.plot(seconds, finite, color=color, ls=style, label=label, lw=1.2)
        ax.axhline(target, color="k", ls=":", lw=0.8, label="target")
        ax.set_xscale("log")
        low = target - 3 * abs(best - target) - 0.02 * abs(best - start)
        if np.isfinite(low) and np.isfinite(best):
            ax.set_ylim(low, best + abs(best - target))
            below = {}
            for r in rows:
                if not np.isfinite(r[4]) or r[4] < low:
                    method, _, rate = r[0].split(" (")[0].rpartition(", Adam(")
                    below.setdefault(method, []).append(rate.rstrip(")"))
            if below:
                lines = [f"{m}: Adam({', '.join(rs)})" for m, rs in below.items()]
                ax.text(
                    0.99,
                    0.02,
                    "ending below this window:\n" + "\n".join(lines),
                    transform=ax.transAxes,
                    fontsize=7,
                    ha="right",
                    va="bottom",
                    bbox=dict(facecolor="white", alpha=0.8, lw=0),
                )
        ax.set_xlabel("wall-clock, compile excluded (s)")
        ax.set_ylabel("ELBO (nats)")
        ax.set_title(problem)
        adam = [r for r in rows if r[0].startswith("exact KL") and r[2] is not None]
        natural = [r for r in rows if r[0].startswith("natural") and r[2] is not None]
        best_adam = min(adam, key=lambda r: r[2]) if adam else None
        natural = min(natural, key=lambda r: r[2]) if natural else None
        report += [
            f"## {problem}",
            "",
            f"Target ELBO {target:.2f} (start {start:.2f}, best {best:.2f}).",
            "",
            "| method | steps to target | wall-clock to target (s) | compile (s) "
            "| final ELBO | s per chunk |",
            "|---|---|---|---|---|---|",
        ]
        for label, steps, wall, compile_s, final, per_chunk in rows:
            report.append(
                f"| {label} | {steps or '-'} | {'-' if wall is None else f'{wall:.3f}'} | "
                f"{compile_s:.1f} | {final:.2f} | {per_chunk:.4f} |"
            )
        if best_adam and natural:
            report += [
                "",
                f"Best natural-gradient run ({natural[0]}) against the best Adam run with the "
                f"exact KL ({best_adam[0]}): **{best_adam[2] / natural[2]:.1f}x** less "
                f"wall-clock, {best_adam[1] / natural[1]:.1f}x fewer steps.",
            ]
        elif natural:
            report += ["", "No Adam run with the exact KL reached the target."]
        report.append("")
        # written after every problem, so that a later failure keeps the earlier results
        _figure_legend(fig, args.rates)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        os.makedirs(RESULTS, exist_ok=True)
        fig.savefig(os.path.join(RESULTS, args.name + ".png"), dpi=100)
        with open(os.path.join(RESULTS, args.name + ".md"), "w") as f:
            f.write("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--rates", nargs="+", type=float, default=[0.005, 0.02, 0.05])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--poisson-steps", type=int, default=1500)
    parser.add_argument("--svae-steps", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--name", default="training")
    parser.add_argument(
        "--replot", action="store_true", help="redraw from the saved curves of the last run"
    )
    main(parser.parse_args())
