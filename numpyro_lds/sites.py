"""A sample site's distribution as NumPyro wraps it, taken apart and put back together.

The LDS sits inside ``to_event``, ``mask`` and ``expand`` layers.
"""

from __future__ import annotations

from numpyro.distributions import Distribution
from numpyro.distributions.distribution import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
)

__all__ = ["rewrap", "unwrap"]


def unwrap(fn: Distribution) -> tuple[Distribution, list[Distribution]]:
    """Split a site's distribution into the one inside and the wrappers around it.

    Args:
      fn: a site's distribution, e.g. ``LinearGaussianStateSpace(...).expand([N]).mask(m)``.

    Returns:
      ``(base, wrappers)``: the innermost distribution, and the ``Independent``,
      ``MaskedDistribution`` and ``ExpandedDistribution`` layers, outermost first.
    """
    wrappers = []
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        wrappers.append(fn)
        fn = fn.base_dist
    return fn, wrappers


def rewrap(q: Distribution, wrappers: list[Distribution]) -> Distribution:
    """Wrap ``q`` as :func:`unwrap` found another site's distribution wrapped.

    Args:
      q: the new innermost distribution (e.g. the guide's ``LDSPosterior``).
      wrappers: the layers from :func:`unwrap`, outermost first.

    Returns:
      ``q`` with the same ``to_event``, ``mask`` and ``expand`` layers.
    """
    for w in reversed(wrappers):
        if isinstance(w, Independent):
            q = q.to_event(w.reinterpreted_batch_ndims)
        elif isinstance(w, MaskedDistribution):
            q = q.mask(w._mask)
        else:
            q = q.expand(w.batch_shape)
    return q
