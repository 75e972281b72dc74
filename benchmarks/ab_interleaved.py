"""Two versions of numpyro_lds side by side in one process, their calls alternated.

Whole benchmark runs on a shared machine differ by 10-40%, more than most single changes
gain. This script compiles the same functions as ``bench_kl.py`` (``bench_kl.ours``) from
the package at a git revision and from the working tree, then alternates their calls, so
that any drift in the machine's speed hits both alike; it prints the median of each and
its compile time. Changes to the core are measured this way against the commit before
them (``docs/performance.md``, introduction).

    python benchmarks/ab_interleaved.py --base HEAD~1 --k 4 --T 10000 --schedule sequential

Each version is copied into a temporary folder under its own module name (``nlds_base``,
``nlds_new``), so both are imported at once.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import bench_kl
import jax
import jax.numpy as jnp
from numpyro.distributions.kl import kl_divergence

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "KL",
    "KL+grad",
    "KL+grad (Terms A-C)",
    "KL+grad (square-root potentials)",
    "sample",
    "sample+grad",
    "log Z+grad",
)


def _install(files: dict[str, str], name: str, folder: Path):
    """Write the package's ``files`` as module ``name`` (its absolute imports renamed)."""
    package = folder / name
    package.mkdir()
    for filename, text in files.items():
        (package / filename).write_text(text.replace("numpyro_lds", name))


def _files_at(revision: str) -> dict[str, str]:
    archive = subprocess.run(
        ["git", "archive", revision, "numpyro_lds"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        return {
            Path(m.name).name: tar.extractfile(m).read().decode()
            for m in tar.getmembers()
            if m.isfile() and m.name.endswith(".py")
        }


def _working_tree_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in (ROOT / "numpyro_lds").glob("*.py")}


def _gradients_of_draw_and_log_z(module, p, schedule):
    """Two more methods, not in ``bench_kl`` (the peers have no gradient to compare): the
    gradient of a draw (``rsample``, as a guide's in SVI) and of the log-normalizer (a
    marginal likelihood), w.r.t. the potentials, and the KL with the guide's square-root
    potentials (``emission_matrix = diag(g)``)."""
    T = p["y"].shape[1]
    prior = module.LinearGaussianStateSpace(
        p["m0"], p["P0"], p["A"], p["Q"], num_steps=T, schedule=schedule, validate_args=False
    )

    def posterior(y, var):
        return module.LDSPosterior(prior, y, potential_var=var, validate_args=False)

    def draw(y, var):
        return jnp.sum(jnp.sin(posterior(y, var).rsample(jax.random.key(0))))

    def log_z(y, var):
        return jnp.sum(posterior(y, var).log_normalizer)

    rebuilt = module.LinearGaussianStateSpace(
        p["m0"], p["P0"], p["A"], p["Q"], num_steps=T, schedule=schedule, validate_args=False
    )

    def kl_root(y, var):
        # AutoLDSGuide's free potentials: exp(-½‖g y − g z‖²), g = var^(-1/2), as H = diag(g).
        g = 1.0 / jnp.sqrt(var)
        q = module.LDSPosterior(
            prior,
            g * y,
            potential_var=jnp.ones_like(var),
            emission_matrix=g[..., None] * jnp.eye(g.shape[-1], dtype=g.dtype),
            validate_args=False,
        )
        return jnp.sum(kl_divergence(q, rebuilt))

    tag = f" [{schedule}]"
    args = (p["y"], p["var"])
    return {
        "numpyro_lds sample+grad" + tag: (jax.value_and_grad(draw, argnums=(0, 1)), args),
        "numpyro_lds log Z+grad" + tag: (jax.value_and_grad(log_z, argnums=(0, 1)), args),
        "numpyro_lds KL+grad (square-root potentials)" + tag: (
            jax.value_and_grad(kl_root, argnums=(0, 1)),
            args,
        ),
    }


def main(args):
    folder = Path(tempfile.mkdtemp(prefix="nlds_ab_"))
    _install(_files_at(args.base), "nlds_base", folder)
    _install(_working_tree_files(), "nlds_new", folder)
    sys.path.insert(0, str(folder))
    p = bench_kl.problem(args.T, args.k, args.batch, jnp.dtype(args.dtype))
    compiled = {}
    for version in ("nlds_base", "nlds_new"):
        module = importlib.import_module(version)
        bench_kl.LDSPosterior = module.LDSPosterior
        bench_kl.LinearGaussianStateSpace = module.LinearGaussianStateSpace
        fns = bench_kl.ours(p, args.schedule)
        fns.update(_gradients_of_draw_and_log_z(module, p, args.schedule))
        for method in args.methods:
            fn, fn_args = fns[f"numpyro_lds {method} [{args.schedule}]"]
            t0 = time.perf_counter()
            call = jax.jit(fn).lower(*fn_args).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(call(*fn_args))  # warm-up
            compiled[version, method] = (call, fn_args, compile_s, [])
    for _ in range(args.rounds):
        for call, fn_args, _, times in compiled.values():
            t0 = time.perf_counter()
            jax.block_until_ready(call(*fn_args))
            times.append(time.perf_counter() - t0)
    print(
        f"{args.dtype} batch={args.batch} k={args.k} T={args.T} schedule={args.schedule}, "
        f"{args.rounds} alternated calls each; base = {args.base}, new = working tree"
    )
    for method in args.methods:
        cells = []
        for version in ("nlds_base", "nlds_new"):
            _, _, compile_s, times = compiled[version, method]
            cells.append(
                f"{version[5:]} {statistics.median(times) * 1e3:9.3f} ms "
                f"(compile {compile_s:4.1f} s)"
            )
        print(f"  {method:22s} " + " | ".join(cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision of the old version")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--T", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--schedule", default="sequential")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    main(parser.parse_args())
