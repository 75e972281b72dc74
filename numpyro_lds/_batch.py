"""The one place where single-sequence functions are batched."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from numpyro_lds.linalg import UNROLL_MAX_K, tracing


def _uses_lapack(args, event_ndims):
    """Whether any per-sequence matrix is larger than the unrolled linear algebra takes."""
    return any(
        nd >= 2 and jnp.shape(x)[-1] > UNROLL_MAX_K
        for x, nd in zip(jax.tree.leaves(args), jax.tree.leaves(event_ndims), strict=True)
    )


def _sequence_map(fn, args, in_axes):
    """``vmap(fn, in_axes)(*args)`` computed one sequence at a time (``lax.map``)."""
    leaves, treedef = jax.tree.flatten(args)
    axes = treedef.flatten_up_to(in_axes)  # an unbatched leaf's axis is None

    def one(batched):
        it = iter(batched)
        full = [next(it) if ax == 0 else x for x, ax in zip(leaves, axes, strict=True)]
        return fn(*jax.tree.unflatten(treedef, full))

    return jax.lax.map(one, [x for x, ax in zip(leaves, axes, strict=True) if ax == 0])


def batch_map(fn, batch_shape, args, event_ndims):
    """Apply single-sequence ``fn(*args)`` over ``batch_shape``.

    Args:
      fn: function of unbatched arguments; returns a pytree of arrays.
      batch_shape: the broadcast batch shape of all arguments.
      args: tuple of pytrees of arrays. A leaf of shape ``batch + event`` is broadcast to
        ``batch_shape + event``; a leaf with no batch dimensions is shared (not copied).
      event_ndims: tuple of pytrees of ints with the structure of ``args``: the number of
        trailing (per-sequence) dimensions of each leaf.

    Returns:
      ``fn``'s output with ``batch_shape`` prepended to every leaf.
    """
    batch_shape = tuple(batch_shape)
    if not batch_shape:
        return fn(*args)
    size = math.prod(batch_shape)

    def has_batch(x, nd):
        return jnp.ndim(x) > nd

    def flatten(x, nd):
        x = jnp.asarray(x)
        if not has_batch(x, nd):
            return x
        x = jnp.broadcast_to(x, batch_shape + x.shape[x.ndim - nd :])
        return x.reshape((size,) + x.shape[len(batch_shape) :])

    if not any(jax.tree.leaves(jax.tree.map(has_batch, args, event_ndims))):
        # Only the batch shape was expanded: compute once, broadcast the result.
        out = fn(*args)
        return jax.tree.map(lambda y: jnp.broadcast_to(y, batch_shape + y.shape), out)
    if size == 1:
        # A batch of one runs unbatched: XLA compiles the vmapped per-step algebra of a
        # size-1 batch to slower code on CPU (docs/performance.md, design notes).
        squeeze = lambda x, nd: x.reshape(x.shape[x.ndim - nd :]) if has_batch(x, nd) else x  # noqa: E731
        out = fn(*jax.tree.map(lambda x, nd: squeeze(jnp.asarray(x), nd), args, event_ndims))
        return jax.tree.map(lambda y: y.reshape(batch_shape + y.shape), out)
    flat_args = jax.tree.map(flatten, args, event_ndims)
    in_axes = jax.tree.map(lambda x, nd: 0 if has_batch(x, nd) else None, args, event_ndims)
    if jax.default_backend() == "cpu" and _uses_lapack(args, event_ndims):
        # One sequence after another: vmapped, the single-matrix LAPACK calls of k > 8
        # become batched ones, and two running at once deadlock jaxlib 0.10 on 2 threads
        # (seen: batch 64, k = 16, blocked KL gradient). See numpyro_lds.linalg.
        out = _sequence_map(fn, flat_args, in_axes)
    else:
        with tracing(batched=True):
            out = jax.vmap(fn, in_axes=in_axes)(*flat_args)
    return jax.tree.map(lambda y: y.reshape(batch_shape + y.shape[1:]), out)


@partial(jax.jit, static_argnames=("fn", "batch_shape", "event_ndims", "num_steps", "schedule"))
def jit_batch_map(fn, batch_shape, args, event_ndims, num_steps, schedule):
    """:func:`batch_map` of ``fn(*args, num_steps, schedule)``, compiled once per shape.

    ``fn`` must be hashable and stable (a module-level function or a classmethod), so that
    eager calls (``q.mean`` outside ``jit``) reuse the compiled scan instead of tracing anew.
    Inside an outer ``jit`` this is inlined.
    """
    return batch_map(lambda *a: fn(*a, num_steps, schedule), batch_shape, args, event_ndims)
