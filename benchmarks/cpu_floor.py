"""What the CPU speed targets leave per step, against the least an exact KL + gradient runs.

Issue 5's CPU targets compare our KL value + gradient with dynamax's smoother (forward
only): at most 1/8 of it at ``k = 4, T = 10⁴``, 1/2 at ``k = 16, T = 1 000``, and 1/3 of it
``vmap``-ped over 64 sequences at ``k = 4, T = 1 000``. This script measures, in one process,
dynamax's smoother (the budget's base) and the cost of the covariance recursions that any
exact KL with its gradient w.r.t. per-step potential covariances runs one step after
another, with no means, no log-densities and no bookkeeping:

- **filter step**: ``P ← F P Fᵀ + S``, a Cholesky factor of ``P + R_t``, one triangular
  solve ``W = L⁻¹ P`` and ``P ← P − WᵀW`` (the fewest operations of any covariance-form
  Kalman step: dynamax's has more);
- **affine step**: ``X ← G_t X G_tᵀ + L_t``, two products. The smoothed covariances are
  one such backward recursion; the gradient w.r.t. ``R_t`` needs the adjoints of both
  covariance recursions, each again one (the derivative of ``P_t`` in ``P_{t−1}`` is
  ``X ↦ M_t X M_tᵀ``): three in all.

So ``floor = filter + 3 × affine`` is a lower bound for a sequential exact KL + gradient
(our sequential schedule). The blocked and parallel schedules do more work per step,
spread across blocks, so the bound does not cover them; the blocked KL + gradient is
timed beside it. Each step is written in the fastest form measured for it on this CPU: our
``linalg`` helpers inside a scan body (unrolled for ``k ≤ 8``, LAPACK and dot calls one
matrix at a time above), and a batch is run as the package runs one. Calls of a
size alternate (``bench_kl.interleaved_medians``); medians of ``--repeats``.

    python benchmarks/cpu_floor.py             # about 2 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse

import bench_kl
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_lds import linalg, schedules
from numpyro_lds._batch import batch_map

# (label, k, T, batch, fraction of dynamax's smoother the target allows)
TARGETS = (
    ("k = 4, T = 10 000", 4, 10_000, 1, 1 / 8),
    ("k = 16, T = 1 000", 16, 1_000, 1, 1 / 2),
    ("batch 64, k = 4, T = 1 000", 4, 1_000, 64, 1 / 3),
)


def _inputs(p):
    """Per-step inputs of the floor recursions from ``bench_kl.problem``'s problem:
    the potentials' variances, and a ``G_t`` and ``L_t`` for every step (values do not
    matter to the time; these keep the recursions bounded)."""
    k = p["m0"].shape[0]
    rng = np.random.default_rng(1)
    batch, T = p["var"].shape[:2]
    G = 0.5 * rng.normal(size=(batch, T, k, k)) / np.sqrt(k)
    return p["var"], jnp.asarray(G, p["A"].dtype), jnp.broadcast_to(p["Q"], (batch, T, k, k))


def filter_floor(F, S, P0):
    """The fewest-operation covariance filter over the variances ``r [T, k]``."""

    def step(P, r):
        P = linalg.quad_form(F, P) + S
        L = linalg.cholesky(P + r[..., None] * jnp.eye(P.shape[-1], dtype=P.dtype))
        W = linalg.solve_lower(L, P)
        P = linalg.symmetrize(P - linalg.matmul(linalg.transpose(W), W))
        return P, P

    return lambda r: schedules.scan_steps(step, P0, r, r.shape[0])[1]


def affine_floor(X0):
    """``X ← G_t X G_tᵀ + L_t`` over ``G, L [T, k, k]``: two products a step."""

    def step(X, x):
        G, L = x
        X = linalg.quad_form(G, X) + L
        return X, X

    return lambda G, L: schedules.scan_steps(step, X0, (G, L), G.shape[0])[1]


def batched(fn, *event_ndims):
    """``fn`` of one sequence over the leading (batch) axis of its arguments, as the
    package runs a batch (:func:`numpyro_lds._batch.batch_map`: unbatched for one,
    ``vmap`` with the batched forms for ``k ≤ 8``, one sequence at a time above)."""
    return lambda *args: batch_map(fn, args[0].shape[:1], args, event_ndims)


def measure(label, k, T, batch, fraction, repeats):
    p = bench_kl.problem(T, k, batch, jnp.float32)
    var, G, L = _inputs(p)
    methods = {
        "filter step (floor)": (batched(filter_floor(p["A"], p["Q"], p["P0"]), 2), (var,)),
        "affine step (floor)": (batched(affine_floor(p["P0"]), 3, 3), (G, L)),
    }
    ours = bench_kl.ours(p, "sequential")
    for name in ("numpyro_lds KL [sequential]", "numpyro_lds KL+grad [sequential]"):
        methods[name] = ours[name]
    if batch == 1:  # the blocked schedule, ours for long single sequences (not a bound)
        name = "numpyro_lds KL+grad [blocked]"
        methods[name] = bench_kl.ours(p, "blocked")[name]
    methods.update(bench_kl.dynamax_fns(p, parallel=False))
    dynamax = "dynamax smoother (sequential)"
    if dynamax not in methods:
        raise SystemExit("cpu_floor.py needs dynamax (pip install -e '.[bench]')")
    methods.pop("dynamax smoother (sequential, R shared)", None)
    calls = {name: bench_kl.compile_once(fn, args)[0] for name, (fn, args) in methods.items()}
    medians = bench_kl.interleaved_medians(
        {name: (calls[name], methods[name][1]) for name in calls}, repeats
    )
    ms = {name: 1e3 * t for name, t in medians.items()}
    budget = fraction * ms[dynamax]
    floor = ms["filter step (floor)"] + 3 * ms["affine step (floor)"]
    print(f"\n## {label} (float32, {repeats} interleaved rounds, medians)\n")
    print("| | ms | of the budget |\n|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {t / budget:.2f} |")
    print(f"| **budget**: {fraction:.3g} × dynamax | {budget:.2f} | 1.00 |")
    print(f"| **floor** = filter + 3 × affine | {floor:.2f} | {floor / budget:.2f} |")
    verdict = "above" if floor > budget else "below"
    ours_grad = ms["numpyro_lds KL+grad [sequential]"]
    print(
        f"\nThe floor is {verdict} the budget; our KL + gradient is {ours_grad / budget:.2f}× it."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.default_backend()}")
    for target in TARGETS:
        measure(*target, repeats=args.repeats)


if __name__ == "__main__":
    main()
