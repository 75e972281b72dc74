"""The three schedules on which every recursion over time runs, and their scan helpers.

Each recursion over the T steps of a sequence (the filter, a chain's moments, a path,
the gradient's tangents) has an associative form, an operator on per-step elements
folded by :func:`prefix_scan` on one of three schedules:

- ``"sequential"``: one ``lax.scan`` step per element.
- ``"parallel"``: recursive doubling (Särkkä & García-Fernández 2021) in blocks of
  :data:`PARALLEL_BLOCK` elements and then across the block totals: ``O(log T)`` depth,
  and each operator traced three times whatever ``T``, so compile time does not grow
  with ``T``: for GPUs and long sequences.
- ``"blocked"``: a two-level scan: ``≈√T`` blocks scanned side by side, then the block
  totals carried across blocks. ``O(√T)`` sequential steps of vectorized work, cheap to
  compile: for CPUs.

All three compute the same quantities. Where stepping a state is cheaper than composing
two elements, a sequential scan steps the state with the same per-step function: the
Kalman filter (one update per step, where composing two filter elements costs several
``k × k`` solves, ``benchmarks/sequential_filter_fold.py``) and, on ``"sequential"`` and
``"blocked"``, the affine recursions. ``docs/performance.md`` lists what each recursion
shares across the schedules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from numpyro_lds.linalg import (
    tracing,
)

__all__ = [
    "PARALLEL_BLOCK",
    "SCHEDULES",
    "check_schedule",
    "prefix_scan",
    "require_schedule",
    "resolve_schedule",
]


#: The values ``schedule=`` takes (None picks one by backend, see :func:`resolve_schedule`).
SCHEDULES = ("sequential", "blocked", "parallel")


#: Block length of the ``"parallel"`` schedule (see :func:`prefix_scan`).
PARALLEL_BLOCK = 16


def check_schedule(schedule):
    """Return ``schedule`` if it is None or one of :data:`SCHEDULES`, else raise ValueError.

    Args:
      schedule: the ``schedule=`` argument as given.

    Returns:
      ``schedule`` itself, None or one of :data:`SCHEDULES`.

    Raises:
      ValueError: for any other value.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {schedule!r}")
    return schedule


def require_schedule(schedule):
    """Return ``schedule`` if it is one of :data:`SCHEDULES`, else raise ValueError.

    The core functions that check their schedule take an explicit one: the distributions
    keep a user's ``None`` and resolve it (:func:`resolve_schedule`) when they compute.

    Args:
      schedule: the schedule a core function was given.

    Returns:
      ``schedule`` itself.

    Raises:
      ValueError: for ``None`` or any value not in :data:`SCHEDULES`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {SCHEDULES} (resolve None with resolve_schedule), "
            f"got {schedule!r}"
        )
    return schedule


def resolve_schedule(schedule):
    """The schedule to run: ``schedule`` itself, or the default for JAX's default backend.

    The default is ``"sequential"`` on CPU and ``"parallel"`` on GPU/TPU, chosen by the
    measurements in ``benchmarks/results/`` (README, "Speed").

    Args:
      schedule: None or one of :data:`SCHEDULES`.

    Returns:
      One of :data:`SCHEDULES`, a string.

    Raises:
      ValueError: for a ``schedule`` that is neither (:func:`check_schedule`).
    """
    if check_schedule(schedule) is not None:
        return schedule
    return "sequential" if jax.default_backend() == "cpu" else "parallel"


def prefix_scan(op, elems, schedule):
    """Inclusive prefix ``e_1, e_1∘e_2, …, e_1∘…∘e_n`` of an associative ``op``.

    Args:
      op: associative ``op(a, b)`` (``a`` earlier in time) on pytrees whose leaves carry
        any leading batch axes.
      elems: pytree of arrays with a leading axis of length ``n`` (the time axis: ``n`` is
        ``T`` for a recursion over the states), ``[n, ...]``.
      schedule: ``"sequential"`` (one scan step per element), ``"parallel"`` (blocks of
        :data:`PARALLEL_BLOCK` elements, then the block totals, each by recursive
        doubling) or ``"blocked"`` (two-level scan), see module docs.

    Returns:
      The prefixes, with the structure and shapes of ``elems`` (``[n, ...]`` leaf by
      leaf): entry ``i`` is ``e_1∘…∘e_{i+1}``.

    Raises:
      ValueError: for ``schedule=None`` (resolve it first, :func:`resolve_schedule`) or
        any value not in :data:`SCHEDULES`.
    """
    require_schedule(schedule)
    n = jax.tree.leaves(elems)[0].shape[0]
    if schedule == "parallel":
        if n <= PARALLEL_BLOCK:
            return _doubling_prefix_scan(op, elems)
        return _two_level_prefix_scan(
            op, elems, n, PARALLEL_BLOCK, _doubling_prefix_scan, _doubling_prefix_scan
        )
    if schedule == "blocked" and n >= 16:
        size = -(-n // math.isqrt(n))
        return _two_level_prefix_scan(op, elems, n, size, _sequential_in_blocks, _sequential)

    def step(carry, e):
        carry = op(carry, e)
        return carry, carry

    first = jax.tree.map(lambda x: x[0], elems)
    _, rest = scan_steps(step, first, jax.tree.map(lambda x: x[1:], elems), n - 1)
    return cat_first(first, rest)


def scan_steps(step, init, xs, length, reverse=False):
    """``lax.scan`` of ``length`` steps, its body traced as a loop body (``linalg.matmul``).

    A leaf of ``xs`` with a time axis of length 1 is shared by every step: it is closed
    over, never broadcast along time (a ``[T, k, k]`` copy per shared matrix, and its
    reverse-mode cotangent accumulated in ``[1, k, k]``).
    """
    leaves, treedef = jax.tree.flatten(xs)
    shared = [x.shape[0] == 1 != length for x in leaves]
    scanned = [x for x, s in zip(leaves, shared, strict=True) if not s]
    fixed = [x[0] for x, s in zip(leaves, shared, strict=True) if s]

    def body(carry, xs_t):
        it_t, it_fixed = iter(xs_t), iter(fixed)
        x = [next(it_fixed) if s else next(it_t) for s in shared]
        with tracing(loop=True):
            return step(carry, jax.tree.unflatten(treedef, x))

    return lax.scan(body, init, scanned, length=length, reverse=reverse)


def from_start(step_x, num_steps):
    """Scan inputs for a recursion whose outputs start at ``t = 1`` (the filter).

    ``step_x`` are inputs of the steps ``t → t + 1`` (time axis ``T − 1``, or 1 when
    shared); they gain a placeholder (zeros) at the front, so that step ``t`` of a scan
    over all ``T`` steps reads step ``t − 1 → t``; the flag it gets first says ``t = 1``,
    where the step starts from the initial value instead. The scan then writes all ``T``
    outputs itself: no concatenation with the first element, which is a second
    ``[T, k, k]`` buffer per output.
    """

    def pad(x):
        return (
            x
            if x.shape[0] == 1
            else jnp.concatenate([jnp.zeros_like(x, shape=(1,) + x.shape[1:]), x])
        )

    return (jnp.arange(num_steps) == 0,) + jax.tree.map(pad, step_x)


def _doubling_prefix_scan(op, elems):
    """Prefixes along the leading axis by recursive doubling (Hillis & Steele 1986).

    Round ``r`` combines each element with the one ``2ʳ`` places earlier, ``⌈log₂ n⌉``
    rounds in a ``fori_loop`` over arrays of one fixed shape, so ``op`` is traced once,
    whatever ``n``; ``lax.associative_scan`` traces it ``≈ 2 log₂ n`` times over shrinking
    shapes, which is what its compile time grew with. The work is ``n log₂ n`` combinations
    instead of ``≈ 2n``: :func:`prefix_scan` runs it on short blocks, then on block totals.
    The first ``2ʳ`` elements keep their value; their combination with the rolled-around
    end of the sequence (valid elements too, so finite) is computed and discarded.
    """
    n = jax.tree.leaves(elems)[0].shape[0]
    position = jnp.arange(n)

    def round_(r, x):
        shift = jnp.left_shift(1, r)
        earlier = jax.tree.map(lambda a: jnp.roll(a, shift, axis=0), x)
        later = position >= shift

        def keep(combined, a):
            return jnp.where(later.reshape((n,) + (1,) * (a.ndim - 1)), combined, a)

        return jax.tree.map(keep, op(earlier, x), x)

    return lax.fori_loop(0, max(n - 1, 0).bit_length(), round_, elems)


def _sequential(op, elems):
    return prefix_scan(op, elems, "sequential")


def _sequential_in_blocks(op, elems):
    """One scan over the leading axis, vectorized across the blocks of the next one."""
    with tracing(batched=True):
        return _sequential(op, elems)


def _two_level_prefix_scan(op, elems, n, size, scan_within, scan_across):
    """Prefixes of ``n`` elements in blocks of ``size``.

    ``scan_within`` (a prefix scan along the leading axis) in every block at once, ``scan_across``
    over the block totals, then each block's prefixes combined with the total of the blocks before
    it.
    """
    num_blocks = -(-n // size)
    pad = num_blocks * size - n

    def to_blocks(x):
        # Padded at the end with copies of a valid element: no prefix up to n includes them.
        x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
        return jnp.swapaxes(x.reshape((num_blocks, size) + x.shape[1:]), 0, 1)

    tree = jax.tree
    within = scan_within(op, tree.map(to_blocks, elems))  # [size, blocks]
    carried = scan_across(op, tree.map(lambda x: x[-1], within))  # [blocks]
    later = tree.map(lambda x: x[:, 1:], within)
    before = tree.map(lambda c, w: jnp.broadcast_to(c[:-1], w.shape), carried, later)
    first_block = tree.map(lambda x: x[:, :1], within)
    out = tree.map(lambda a, b: jnp.concatenate([a, b], 1), first_block, op(before, later))
    return tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])[:n], out)


def cat_first(first, rest):
    """Prepend ``first`` to ``rest`` along the leading (time) axis, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def cat_last(rest, last):
    """Append ``last`` to ``rest`` along the leading (time) axis, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), rest, last)


def along_time(x, n):
    """Broadcast a leading time axis of length 1 (shared) to length ``n``."""
    return jnp.broadcast_to(x, (n,) + x.shape[1:])
