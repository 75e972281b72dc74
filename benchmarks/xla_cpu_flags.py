"""XLA's CPU fusion emitters on and off: numpyro_lds and dynamax side by side in each.

jaxlib 0.10's XLA:CPU compiles elementwise fusions with its newer MLIR "fusion emitters".
For the small-matrix algebra of a Kalman step (``k ≤ 8``, written as sums of elementwise
products, see docs/performance.md) they emit scalar code where the older loop emitters
emit SIMD (``<4 x float>`` at ``k = 4``). ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false``
selects the older ones for the whole process. This script runs ``bench_kl.py`` at the
sizes of the speed targets under each setting, in separate processes, the settings
alternating for ``--rounds`` rounds (this machine's timings move between processes),
and reports each setting's smallest median per function, its compile time, and the ratio
to dynamax's sequential smoother measured in the same setting. Whole SVI steps are timed
the same way (``TraceMeanField_ELBO``): the tracking model of ``examples/lds_tracking.py``
and the structured VAE of ``examples/svae.py`` (``k = 2``, with its neural networks),
since the flag applies to everything the process compiles.

    python benchmarks/xla_cpu_flags.py          # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpyro
from bench_kl import measure
from numpyro.infer import SVI, TraceMeanField_ELBO
from numpyro.infer.initialization import init_to_value

from numpyro_lds import AutoLDSGuide

HERE = Path(__file__).parent
SETTINGS = {
    "XLA defaults": "",
    "fusion emitters off": "--xla_cpu_use_fusion_emitters=false",
}
# bench_kl.py arguments of each stage: the sizes of the speed targets.
STAGES = [
    ["--batch", "1", "--k", "4", "--T", "1000", "10000", "--schedule", "sequential", "blocked"],
    ["--batch", "1", "--k", "16", "--T", "1000", "--schedule", "sequential"],
    ["--batch", "64", "--k", "4", "--T", "1000", "--schedule", "sequential", "blocked"],
]
BASE = "dynamax smoother (sequential)"


def _env(flags):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
    return env


def run_stage(stage, flags, out, timeout):
    cmd = [sys.executable, str(HERE / "bench_kl.py"), "--repeats", "5", "--dtype", "float32"]
    cmd += ["--dynamax-parallel-max-T", "0", "--out", str(out), *stage]
    print(f"[{flags or 'defaults'}] {' '.join(stage)}", flush=True)
    try:
        subprocess.run(cmd, env=_env(flags), check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print("  stopped at the timeout; the rows written so far are kept", flush=True)
    path = Path(out) / "bench_kl.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def svi_cases():
    """``{name: (svi, data)}``: the examples' models with their SVI guides."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    import lds_tracking
    import svae

    _, y = lds_tracking.simulate(jax.random.key(0), 100)
    z0 = jax.numpy.concatenate([y, jax.numpy.zeros_like(y)], axis=-1)
    cases = {
        "SVI step, tracking model (k = 4, T = 100)": (
            lds_tracking.model,
            AutoLDSGuide(lds_tracking.model, init_loc_fn=init_to_value(values={"z": z0})),
            y,
        )
    }
    for n, T in [(16, 50), (64, 200)]:
        x = svae.make_video(jax.random.key(0), n, T, 32)[1]
        guide = AutoLDSGuide(svae.model, encoder=svae.encoder, create_plates=svae.plates)
        cases[f"SVI step, structured VAE (k = 2, {n} sequences, T = {T})"] = (svae.model, guide, x)
    return {
        name: (SVI(model, guide, numpyro.optim.Adam(1e-3), TraceMeanField_ELBO()), data)
        for name, (model, guide, data) in cases.items()
    }


def svi_worker(repeats):
    """Time one compiled SVI step per case; print CSV rows (this process's XLA_FLAGS)."""
    writer = csv.writer(sys.stdout)
    for name, (svi, data) in svi_cases().items():
        state = svi.init(jax.random.key(1), data)
        compile_s, median, _, _ = measure(svi.update, (state, data), repeats)
        writer.writerow([name, 1e3 * median, compile_s])


def run_svi(flags, timeout):
    print(f"[{flags or 'defaults'}] SVI steps", flush=True)
    cmd = [sys.executable, __file__, "--svi-worker"]
    done = subprocess.run(cmd, env=_env(flags), check=True, timeout=timeout, capture_output=True)
    return [
        dict(batch=0, k=0, T=0, method=name, median_ms=ms, compile_s=c)
        for name, ms, c in csv.reader(done.stdout.decode().splitlines())
    ]


def summarize(runs):
    """``{(batch, k, T, method): {setting: (min median ms, median compile s)}}``."""
    table: dict = {}
    for setting, rows in runs:
        for r in rows:
            key = (int(r["batch"]), int(r["k"]), int(r["T"]), r["method"])
            table.setdefault(key, {}).setdefault(setting, []).append(
                (float(r["median_ms"]), float(r["compile_s"]))
            )
    return {
        key: {s: (min(m for m, _ in v), statistics.median(c for _, c in v)) for s, v in per.items()}
        for key, per in table.items()
    }


def write(summary, rounds, path):
    names = list(SETTINGS)
    lines = [
        "# XLA's CPU fusion emitters on and off",
        "",
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
        f"float32; `bench_kl.py` per setting in separate processes, {rounds} rounds "
        "alternating the settings; each cell is the smallest of the rounds' medians "
        "(compile: the median of the rounds). Ratio: to dynamax's sequential smoother "
        "in the same setting. Setting 2 is `XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`.",
        "",
        "| batch | k | T | function | "
        + " | ".join(f"{n}: ms | compile s | ratio" for n in names)
        + " | speed-up |",
        "|---|---|---|---|" + "---|---|---|" * len(names) + "---|",
    ]
    for key in sorted(summary):
        b, k, T, method = key
        per = summary[key]
        cells = []
        for n in names:
            if n not in per:
                cells += ["", "", ""]
                continue
            ms, comp = per[n]
            base = summary.get((b, k, T, BASE), {}).get(n)
            ratio = "" if base is None else f"{ms / base[0]:.3f}"
            cells += [f"{ms:.2f}", f"{comp:.1f}", ratio]
        both = all(n in per for n in names)
        speedup = f"{per[names[0]][0] / per[names[1]][0]:.2f}" if both else ""
        size = "| | | " if T == 0 else f"| {b} | {k} | {T} "
        lines.append(f"{size}| {method} | " + " | ".join(cells) + f" | {speedup} |")
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(args):
    if args.svi_worker:
        svi_worker(args.svi_repeats)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(SETTINGS.items())
            if r % 2:
                order.reverse()
            for name, flags in order:
                for i, stage in enumerate(STAGES):
                    out = Path(tmp) / f"{r}-{i}-{name.replace(' ', '_')}"
                    runs.append((name, run_stage(stage, flags, out, args.timeout)))
                runs.append((name, run_svi(flags, args.timeout)))
    write(summarize(runs), args.rounds, args.out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    ap.add_argument("--svi-repeats", type=int, default=200, help="SVI steps timed per case")
    ap.add_argument("--svi-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "xla_cpu_flags.md"))
    main(ap.parse_args())
