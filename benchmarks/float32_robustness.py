"""Float32 vs float64 on a hard long sequence (issue: robust in float32).

T = 100 000 (default), k = 4, spectral radius 0.999, process noise 1e-4·I, potential
variances log-uniform over 1e-4 … 1e4, 30% of steps masked. Runs the same code in float32
and float64 and reports NaN/Inf, the KL's relative error, the gradient's relative error
(for the KL against the posterior's own prior, and by the general formula, Terms A–C,
against an equal second prior), the posterior's log-density at a float64 posterior draw and
its gradient (w.r.t. the potentials and the draw), and whether the float32 marginal
covariances are symmetric positive definite.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from numpyro.distributions.kl import kl_divergence  # noqa: E402

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace  # noqa: E402


def hard_problem(T, k=4, seed=0):
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(k // 2):
        th = rng.uniform(0.05, 0.3)
        blocks.append(0.999 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]))
    A = np.zeros((k, k))
    for i, b in enumerate(blocks):
        A[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = b
    Qm = 1e-4 * np.eye(k)
    z = np.zeros((T, k))
    z[0] = rng.normal(size=k)
    noise = rng.normal(size=(T, k)) * 1e-2
    for t in range(1, T):
        z[t] = A @ z[t - 1] + noise[t]
    var = 10.0 ** rng.uniform(-4, 4, size=(T, k))
    y = z + np.sqrt(var) * rng.normal(size=(T, k))
    mask = rng.uniform(size=T) >= 0.3
    return dict(A=A, Q=Qm, y=y, var=var, mask=mask, k=k, T=T)


def build(prob, dtype, schedule=None):
    c = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    prior = LinearGaussianStateSpace(
        c(np.zeros(prob["k"])),
        c(np.eye(prob["k"])),
        c(prob["A"]),
        c(prob["Q"]),
        num_steps=prob["T"],
        schedule=schedule,
        validate_args=False,
    )
    return prior


def run(prob, dtype, schedule=None, z=None):
    """Every metric's raw values; ``log q`` at ``z`` (default: this run's own draw)."""
    prior = build(prob, dtype, schedule)
    # A second, equal prior object: kl_divergence(q, rebuilt) takes the general formula
    # (Terms A-C), kl_divergence(q, prior) the identity Σ E_q log φ − log Z.
    rebuilt = build(prob, dtype, schedule)

    def kl_fn(y, var, p=prior):
        q = LDSPosterior(
            prior, y, potential_var=var, mask=jnp.asarray(prob["mask"]), validate_args=False
        )
        return kl_divergence(q, p)

    y, var = jnp.asarray(prob["y"], dtype), jnp.asarray(prob["var"], dtype)
    f = jax.jit(jax.value_and_grad(kl_fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    kl, (gy, gv) = jax.block_until_ready(f(y, var))
    elapsed = time.perf_counter() - t0
    general = jax.jit(jax.value_and_grad(lambda y, var: kl_fn(y, var, rebuilt), argnums=(0, 1)))
    kl_terms, (gy_terms, gv_terms) = general(y, var)
    q = LDSPosterior(
        prior, y, potential_var=var, mask=jnp.asarray(prob["mask"]), validate_args=False
    )
    cov = jax.jit(lambda q: q.marginal_covariance)(q)
    mean = jax.jit(lambda q: q.mean)(q)
    sample = jax.jit(lambda q: q.sample(jax.random.key(0)))(q)
    z = sample if z is None else jnp.asarray(z, dtype)

    def log_q(y, var, z):
        q = LDSPosterior(
            prior, y, potential_var=var, mask=jnp.asarray(prob["mask"]), validate_args=False
        )
        return q.log_prob(z)

    lp, lp_grads = jax.jit(jax.value_and_grad(log_q, argnums=(0, 1, 2)))(y, var, z)
    return dict(
        kl=kl,
        gy=gy,
        gv=gv,
        kl_terms=kl_terms,
        gy_terms=gy_terms,
        gv_terms=gv_terms,
        cov=cov,
        mean=mean,
        sample=sample,
        lp=lp,
        lp_grads=lp_grads,
        seconds=elapsed,
    )


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def compare(T, schedule=None):
    """Float32 (``schedule``) vs float64 (sequential) metrics on ``hard_problem(T)``."""
    prob = hard_problem(T)
    r64 = run(prob, jnp.float64, "sequential")
    r32 = run(prob, jnp.float32, schedule, z=r64["sample"])
    names = ("kl", "gy", "gv", "kl_terms", "gy_terms", "gv_terms", "cov", "mean", "sample", "lp")
    cov = np.asarray(r32["cov"], np.float64)
    return dict(
        T=T,
        k=prob["k"],
        schedule=schedule,
        finite={n: bool(np.all(np.isfinite(np.asarray(r32[n])))) for n in names},
        kl32=float(r32["kl"]),
        kl64=float(r64["kl"]),
        kl_rel_err=rel(r32["kl"], r64["kl"]),
        grad_y_rel_err=rel(r32["gy"], r64["gy"]),
        grad_var_rel_err=rel(r32["gv"], r64["gv"]),
        kl_terms_rel_err=rel(r32["kl_terms"], r64["kl_terms"]),
        grad_terms_rel_err=max(
            rel(r32["gy_terms"], r64["gy_terms"]), rel(r32["gv_terms"], r64["gv_terms"])
        ),
        log_prob_rel_err=rel(r32["lp"], r64["lp"]),
        grad_log_prob_rel_err=max(map(rel, r32["lp_grads"], r64["lp_grads"])),
        mean_rel_err=rel(r32["mean"], r64["mean"]),
        cov_rel_err=rel(r32["cov"], r64["cov"]),
        max_asymmetry=float(np.max(np.abs(cov - np.swapaxes(cov, -1, -2)))),
        min_eigenvalue=float(np.min(np.linalg.eigvalsh(cov))),
        seconds32=r32["seconds"],
        seconds64=r64["seconds"],
    )


def main(args):
    for schedule in args.schedule:
        report(compare(args.T, schedule))


def report(r):
    print(
        f"T={r['T']} k={r['k']} float32 schedule={r['schedule']} vs float64 sequential "
        f"(jax {jax.__version__}, {jax.devices()[0].platform})"
    )
    print(f"finite (float32): {r['finite']}")
    print(f"KL float64 {r['kl64']:.6e}  float32 {r['kl32']:.6e}  rel err {r['kl_rel_err']:.2e}")
    print(f"grad rel err: d/dy {r['grad_y_rel_err']:.2e}  d/dvar {r['grad_var_rel_err']:.2e}")
    print(
        f"general formula (Terms A-C): KL rel err {r['kl_terms_rel_err']:.2e}, "
        f"grad rel err {r['grad_terms_rel_err']:.2e}"
    )
    print(
        f"log q at a float64 draw: rel err {r['log_prob_rel_err']:.2e}, grad rel err "
        f"(potentials, draw) {r['grad_log_prob_rel_err']:.2e}"
    )
    print(f"mean rel err {r['mean_rel_err']:.2e}  cov rel err {r['cov_rel_err']:.2e}")
    print(
        f"float32 marginal covs: max asymmetry {r['max_asymmetry']:.1e}, "
        f"min eigenvalue {r['min_eigenvalue']:.3e}"
    )
    print(
        f"first call (compile + run): float32 {r['seconds32']:.1f}s float64 {r['seconds64']:.1f}s"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, default=100_000)
    p.add_argument(
        "--schedule", nargs="+", default=["sequential", "blocked", "parallel"], help="float32 runs"
    )
    main(p.parse_args())
