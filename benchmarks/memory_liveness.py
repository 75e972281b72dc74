"""What is alive at the memory peak of the KL value + gradient (issue: speed and scale).

XLA's memory estimate (``bench_kl.py``'s ``peak_mb``) is the size of one buffer that
holds every temporary, placed by the compiled program's schedule. This script compiles
the KL + gradient by Terms A–C (as SVI computes it, against a second prior object),
walks the scheduled entry computation of the optimized HLO in order, and prints the
large values (``≥ --min-mb``) alive at the instruction where their total peaks: what
defines each, where it was defined and last used (instruction numbers), and the source
lines of this package that made it (innermost first, from the HLO's stack-frame tables;
inside a custom VJP's rules only the call site is recorded), or else the JAX operation
XLA's metadata names. Aliases (bitcasts, tuples, loop results) count once.
Values inside loop bodies are small (one time step) and not counted.

    python benchmarks/memory_liveness.py --k 16 --T 100000
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from bench_kl import ours, problem  # noqa: E402

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "f32": 4, "s32": 4, "f64": 8, "s64": 8}
_ALIASES = ("bitcast", "get-tuple-element", "tuple", "while")


def _nbytes(shape):
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([0-9,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def _table(hlo_text, title):
    """``{id: text}`` of one of the HLO module's ``FileNames``/``StackFrames``/… tables."""
    m = re.search(rf"^{title}\n((?:\d+ .*\n)+)", hlo_text, re.M)
    rows = re.findall(r"^(\d+) (.*)$", m.group(1), re.M) if m else []
    return {int(i): text for i, text in rows}


def source_stacks(hlo_text, package="numpyro_lds"):
    """``{stack_frame_id: "file.py:line < file.py:line …"}``: the frames in ``package``,
    innermost first, of every stack the metadata names."""
    files = {i: t.strip('"') for i, t in _table(hlo_text, "FileNames").items()}
    locations, parents = {}, {}
    for i, t in _table(hlo_text, "FileLocations").items():
        f, line = re.search(r"file_name_id=(\d+).*?\bline=(\d+)", t).groups()
        locations[i] = (files.get(int(f), "?"), int(line))
    frames = {}  # id: file location; parents[id]: the caller's frame
    for i, t in _table(hlo_text, "StackFrames").items():
        loc, parent = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", t).groups()
        frames[i] = int(loc)
        parents[i] = int(parent)
    stacks = {}
    for i in frames:
        names, j, seen = [], i, set()
        while j in frames and j not in seen:
            seen.add(j)
            path, line = locations.get(frames[j], ("?", 0))
            if f"/{package}/" in path:
                names.append(f"{path.rsplit('/', 1)[-1]}:{line}")
            j = parents[j] - 1  # printed one above the parent's id; 0: none
        stacks[i] = " < ".join(names[:4])
    return stacks


def entry_instructions(hlo_text):
    """``[(name, shape, opcode, operands, where)]`` of the entry computation, in order;
    ``where``: the package's source lines (innermost first) or JAX's op name."""
    stacks = source_stacks(hlo_text)
    lines = hlo_text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) ([\w\-]+)\((.*)", line)
        if m is None:
            continue
        name, shape, opcode, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", re.split(r"metadata=|calls=", rest)[0])
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        where = stacks.get(int(frame.group(1)), "") if frame else ""
        out.append((name, shape, opcode, operands, where or (op_name.group(1) if op_name else "")))
    return out


def live_at_peak(instructions, min_bytes):
    """``(peak bytes, instruction at the peak, [(name, def, last use, shape, op_name)])``."""
    index = {name: i for i, (name, *_) in enumerate(instructions)}
    info = {name: (shape, opcode, ops, meta) for name, shape, opcode, ops, meta in instructions}

    def buffers(name):
        _, opcode, ops, _ = info[name]
        if opcode not in _ALIASES:
            return {name}
        return set().union(*(buffers(o) for o in ops if o in info)) if ops else set()

    last = {}  # instructions run in order: the latest use seen is the last
    for i, (_, _, _, ops, _) in enumerate(instructions):
        for o in ops:
            if o in info:
                for b in buffers(o):
                    last[b] = i
    size = {
        name: _nbytes(shape)
        for name, shape, opcode, _, _ in instructions
        if opcode not in _ALIASES + ("parameter", "constant")
    }
    big = [b for b, nbytes in size.items() if nbytes >= min_bytes]
    peak, at = 0, 0
    for i in range(len(instructions)):
        live = sum(size[b] for b in big if index[b] <= i <= last.get(b, index[b]))
        if live > peak:
            peak, at = live, i
    rows = [
        (b, index[b], last.get(b, index[b]), info[b][0].split("{")[0], info[b][3])
        for b in big
        if index[b] <= at <= last.get(b, index[b])
    ]
    return peak, instructions[at][0], rows


def main(args):
    p = problem(args.T, args.k, 1, jnp.float32)
    fn, fn_args = ours(p, args.schedule)[f"numpyro_lds KL+grad (Terms A-C) [{args.schedule}]"]
    compiled = jax.jit(fn).lower(*fn_args).compile()
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    print(f"jax {jax.__version__}; k = {args.k}, T = {args.T}, {args.schedule}, float32")
    temp = mem.temp_size_in_bytes
    print(f"XLA memory estimate: {total / 1e9:.3f} GB (temporaries {temp / 1e9:.3f})")
    peak, at, rows = live_at_peak(entry_instructions(compiled.as_text()), args.min_mb * 2**20)
    print(f"values >= {args.min_mb} MiB alive at their peak ({at}): {peak / 2**20:.0f} MiB")
    for name, first, last, shape, op_name in rows:
        print(f"  {name:34s} def {first:4d} last use {last:4d} {shape:22s} {op_name[:130]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--T", type=int, default=100_000)
    parser.add_argument("--schedule", default="sequential")
    parser.add_argument("--min-mb", type=float, default=50.0)
    main(parser.parse_args())
