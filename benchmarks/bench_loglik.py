"""The marginal log-likelihood and its gradient, side by side with dynamax and TFP.

Fitting an LDS by maximum likelihood (or a hyperparameter's type-II likelihood)
differentiates ``log p(y_{1:T})`` w.r.t. the dynamics and the noise. Ours is
``LDSPosterior(prior, y, potential_var=var).log_normalizer``, whose gradient is Fisher's
identity at the smoothed moments (no tangent recursion: ``docs/derivation.md``,
section 8); dynamax's is ``lgssm_filter(...).marginal_loglik`` and TFP's
``LinearGaussianStateSpaceModel.log_prob``, both differentiated by reverse mode through
their filters. The problem is ``bench_kl.problem``'s (emission ``I``, time-varying noise
``diag(var_t)``); the gradient is w.r.t. ``A``, ``Q`` and ``var``. Each peer's value and
gradient are checked against ours (relative differences, float32; the gradients w.r.t.
``Q`` symmetrized, see :func:`_symmetric_q`). The calls of the
methods of a size alternate (``bench_kl.interleaved_medians``); compile time is reported
apart. Peers that are not installed are skipped with a message.

    python benchmarks/bench_loglik.py   # writes benchmarks/results/bench_loglik.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench_kl
import jax
import jax.numpy as jnp

from numpyro_lds import LDSPosterior, LinearGaussianStateSpace

RESULTS = Path(__file__).parent / "results"


def ours(p):
    T = p["y"].shape[1]

    def loglik(A, Q, var):
        prior = LinearGaussianStateSpace(p["m0"], p["P0"], A, Q, num_steps=T, validate_args=False)
        q = LDSPosterior(prior, p["y"][0], potential_var=var, validate_args=False)
        return q.log_normalizer

    return {"numpyro_lds log_normalizer": loglik}


def dynamax(p):
    try:
        from dynamax.linear_gaussian_ssm.inference import lgssm_filter, make_lgssm_params
    except Exception as e:  # noqa: BLE001 - any import failure means "skip this peer"
        print(f"skipping dynamax: {type(e).__name__}: {e}")
        return {}
    eye = jnp.eye(p["m0"].shape[0], dtype=p["A"].dtype)

    def loglik(A, Q, var):
        params = make_lgssm_params(p["m0"], p["P0"], A, Q, eye, jax.vmap(jnp.diag)(var))
        return lgssm_filter(params, p["y"][0]).marginal_loglik

    return {"dynamax lgssm_filter marginal_loglik": loglik}


def tfp(p):
    tfp = bench_kl.import_tfp()
    if tfp is None:
        return {}

    def loglik(A, Q, var):
        return bench_kl.tfp_model(tfp, p, A, Q, var).log_prob(p["y"][0])

    return {"TFP LinearGaussianStateSpaceModel.log_prob": loglik}


def _symmetric_q(output):
    """The gradient w.r.t. ``Q`` as one w.r.t. a symmetric matrix, ``(G + Gᵀ)/2``.

    Ours and TFP's (through ``cholesky``) are symmetric already; dynamax uses ``Q`` as
    given, so its gradient is the unsymmetrized one (6% apart from ours at ``k = 4``,
    ``T = 1 000``; symmetrized, 4e-6): the same derivative along every symmetric direction.
    """
    value, (g_A, g_Q, g_var) = output
    return value, (g_A, (g_Q + g_Q.T) / 2, g_var)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def main(args):
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    lines = [
        "# Marginal log-likelihood + gradient (w.r.t. A, Q, var)",
        "",
        f"jax {jax.__version__}, {jax.devices()[0].platform}, float32, one sequence, "
        f"median of {args.repeats} interleaved calls. `rel. diff`: the largest difference "
        "from ours in value and in gradient, relative to ours' largest entry (gradients "
        "w.r.t. `Q` symmetrized: dynamax's is the unsymmetrized one).",
        "",
        "| k | T | method | compile s | median ms | ratio to dynamax | rel. diff value | "
        "rel. diff gradient |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in args.k:
        for T in args.T:
            p = bench_kl.problem(T, k, 1, jnp.float32)
            fargs = (p["A"], p["Q"], p["var"][0])
            fns = {**ours(p), **dynamax(p), **tfp(p)}
            compiled, outputs = {}, {}
            for name, fn in fns.items():
                call, compile_s, _, out = bench_kl.compile_once(
                    jax.value_and_grad(fn, argnums=(0, 1, 2)), fargs
                )
                compiled[name], outputs[name] = (call, fargs, compile_s), out
            medians = bench_kl.interleaved_medians(
                {n: (c[0], c[1]) for n, c in compiled.items()}, args.repeats
            )
            base = medians.get("dynamax lgssm_filter marginal_loglik")
            value, grads = _symmetric_q(outputs["numpyro_lds log_normalizer"])
            for name, (_, _, compile_s) in compiled.items():
                v, g = _symmetric_q(outputs[name])
                gdiff = max(
                    _rel(a, b)
                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads), strict=True)
                )
                ratio = "" if base is None else f"{medians[name] / base:.3f}"
                row = (
                    f"| {k} | {T} | {name} | {compile_s:.2f} | {medians[name] * 1e3:.2f} | "
                    f"{ratio} | {_rel(v, value):.1e} | {gdiff:.1e} |"
                )
                print(row, flush=True)
                lines.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_loglik.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'bench_loglik.md'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=7)
    main(ap.parse_args())
