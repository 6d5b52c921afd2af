"""The one place where normjax computes means, variances and reciprocal stds.

Every normalization op calls :func:`moments` for its statistics and
:func:`normalize` to apply them, so the numerics are fixed once:

* Statistics are accumulated in at least float32, whatever the input dtype.
* The variance is the mean of squared deviations from a shift, never
  ``E[x^2] - E[x]^2``: data with mean 1e4 and std 1 keeps its std. The shift
  is one sample of the data (a constant row is then exactly constant: its
  variance is exactly 0), or 0 where a mask could hide that sample.
* Across devices the per-device (count, mean, M2) triples are combined with
  Chan et al.'s parallel formula: exact over the union of all devices'
  masked entries, not a mean of per-device means.
* Inputs so large that squared deviations overflow float32 (|x| ~ 1e30) are
  rescaled per group before squaring. The rescaled branch sits behind a
  ``lax.cond`` on the finiteness of the plain statistics, so the common case
  pays nothing for it.

References:
  Chan, Golub and LeVeque, "Algorithms for computing the sample variance:
  analysis and recommendations", The American Statistician 37(3), 1983.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Axes = int | Sequence[int]


class Moments(NamedTuple):
    """Statistics of ``x`` over the reduced axes, kept as size-1 dimensions.

    Attributes:
      mean: the mean (zeros when the moments are uncentered).
      var: the biased variance (the mean square when uncentered). May be
        ``inf`` when it exceeds float32's range; ``inv_std`` stays exact then.
      inv_std: ``1 / sqrt(var + epsilon)``, computed without overflow.
      count: the number of entries each statistic was computed from
        (after the mask and the cross-device sum), as float32.
    """

    mean: Array
    var: Array
    inv_std: Array
    count: Array


# ----------------------------------------------------------------------------
# Argument checks: all run at trace time on static shapes and Python values.


def check_floating(x: Any, name: str = "x") -> Array:
    """Returns ``x`` as an array, or raises TypeError if it is not floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating-point array, got dtype {x.dtype}.")
    return x


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Normalizes ``axes`` to sorted non-negative ints, checking the range."""
    axes_seq = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    out = []
    for a in axes_seq:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axes!r} is out of range for an input with {ndim} dimensions "
                f"(expected values in [{-ndim}, {ndim - 1}])."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axes!r} repeats an axis.")
    return tuple(sorted(out))


def check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float, np.floating)) and epsilon > 0):
        raise ValueError(f"`epsilon` must be a positive number, got {epsilon!r}.")


def check_param_shape(param: Array | None, expected: tuple[int, ...], name: str) -> None:
    if param is not None and tuple(jnp.shape(param)) != tuple(expected):
        raise ValueError(
            f"`{name}` must have the feature shape {tuple(expected)}, "
            f"got shape {tuple(jnp.shape(param))}."
        )


def broadcast_mask(mask: Array | None, shape: tuple[int, ...]) -> Array | None:
    """Checks that ``mask`` is boolean and broadcastable to ``shape``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`mask` must be a boolean array, got dtype {mask.dtype}.")
    try:
        np.broadcast_shapes(mask.shape, shape)
        if np.broadcast_shapes(mask.shape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"`mask` of shape {tuple(mask.shape)} is not broadcastable to the input "
            f"shape {tuple(shape)}."
        ) from None
    return jnp.broadcast_to(mask, shape)


def feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of scale, bias and running statistics: ``x``'s at the feature axes."""
    return tuple(shape[a] for a in feature_axes)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Statistics.


def _local_moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, center: bool
) -> tuple[Array, Array, Array]:
    """Per-device (count, mean, M2) over ``axes``, keepdims, in x's dtype."""
    if mask is None:
        n = jnp.asarray(float(np.prod([x.shape[a] for a in axes])), x.dtype)
        n = jnp.broadcast_to(n, tuple(1 if a in axes else d for a, d in enumerate(x.shape)))
        if not center:
            return n, jnp.zeros_like(n), jnp.sum(lax.square(x), axes, keepdims=True)
        # Two passes: the mean, then the squared deviations from it. Summing
        # deviations from one sample (not x itself) makes the mean of a constant
        # row exactly that constant, so its variance is exactly 0. Each pass
        # reads x afresh (no shared ``x - shift`` intermediate): XLA then fuses
        # each into one reduction kernel instead of writing a full-size buffer.
        shift = lax.stop_gradient(_first(x, axes))
        mean = shift + jnp.sum(x - shift, axes, keepdims=True) / n
        m2 = jnp.sum(lax.square(x - mean), axes, keepdims=True)
        return n, mean, m2
    w = mask
    n = jnp.sum(w, axes, keepdims=True, dtype=x.dtype)
    safe_n = jnp.maximum(n, 1)
    xm = jnp.where(w, x, 0)
    if not center:
        return n, jnp.zeros_like(n), jnp.sum(lax.square(xm), axes, keepdims=True)
    mean = jnp.sum(xm, axes, keepdims=True) / safe_n
    m2 = jnp.sum(jnp.where(w, lax.square(x - mean), 0), axes, keepdims=True)
    return n, mean, m2


def _first(x: Array, axes: tuple[int, ...]) -> Array:
    """The entry at index 0 of every axis in ``axes``, keepdims."""
    for a in axes:
        x = lax.slice_in_dim(x, 0, 1, axis=a)
    return x


def _combine(
    n: Array,
    mean: Array,
    m2: Array,
    axis_name: Hashable | None,
    axis_index_groups: Any,
    center: bool,
) -> tuple[Array, Array, Array]:
    """Total (count, mean, biased var) over all devices on ``axis_name``."""
    if axis_name is None:
        safe_n = jnp.maximum(n, 1)
        return n, mean, m2 / safe_n
    psum = lambda v: lax.psum(v, axis_name, axis_index_groups=axis_index_groups)
    total_n, total_sum = psum((n, n * mean))
    safe_n = jnp.maximum(total_n, 1)
    global_mean = total_sum / safe_n
    if center:
        # Chan et al.: M2 = sum_i M2_i + n_i (mean_i - mean)^2.
        m2 = m2 + n * lax.square(mean - global_mean)
    return total_n, global_mean, psum(m2) / safe_n


def moments(
    x: Array,
    axes: tuple[int, ...],
    *,
    epsilon: float,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    center: bool = True,
) -> Moments:
    """Mean, biased variance and reciprocal std of ``x`` over ``axes``.

    Args:
      x: a floating array; the statistics are computed in
        ``stat_dtype(x.dtype)`` (at least float32).
      axes: the reduced axes, canonical (see :func:`canonicalize_axes`).
      epsilon: added to the variance inside ``inv_std``.
      mask: optional boolean array of x's shape; only True entries count.
      axis_name: reduce across devices on this named axis too (pmap,
        shard_map, vmap).
      axis_index_groups: as in ``lax.psum``.
      center: False gives the uncentered mean square (RMS norm).

    Returns:
      :class:`Moments`, each of x's rank with size-1 reduced axes.
    """
    x_in = x  # the rescaled branch converts its own copy: a float32 x captured by
    # the lax.cond would be materialized at full size for a bfloat16 input.
    x = x.astype(stat_dtype(x.dtype))

    def stats(x: Array, scale: Array | None) -> Moments:
        xs = x if scale is None else x / scale
        n, mean, var = _combine(
            *_local_moments(xs, axes, mask, center), axis_name, axis_index_groups, center
        )
        if scale is None:
            return Moments(mean, var, inverse_std(var, epsilon), n)
        # x = scale * xs: rsqrt(var + eps) = rsqrt(var_s + eps / scale^2) / scale,
        # floored at the smallest normal so a zero variance stays finite.
        tiny = jnp.finfo(x.dtype).tiny
        inv_std = lax.rsqrt(var + jnp.maximum(epsilon / lax.square(scale), tiny)) / scale
        return Moments(mean * scale, var * lax.square(scale), inv_std, n)

    plain = stats(x, None)

    def rescaled(_: Any) -> Moments:
        x = x_in.astype(stat_dtype(x_in.dtype))
        # The scale is a constant to autodiff (pmax has no derivative rule).
        absx = jnp.abs(lax.stop_gradient(x))
        absx = absx if mask is None else jnp.where(mask, absx, 0)
        scale = jnp.max(absx, axes, keepdims=True)
        if axis_name is not None:
            scale = lax.pmax(scale, axis_name, axis_index_groups=axis_index_groups)
        scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
        return stats(x, lax.stop_gradient(scale))

    overflowed = jnp.any(jnp.isinf(plain.var)) & jnp.all(jnp.isfinite(plain.mean))
    if axis_name is not None:
        # Every device must take the same branch: the branches hold collectives.
        overflowed = lax.psum(overflowed.astype(jnp.int32), axis_name) > 0
    return lax.cond(overflowed, rescaled, lambda _: plain, None)


def normalize(
    x: Array,
    stats: Moments,
    scale: Array | None,
    bias: Array | None,
    feature_axes: tuple[int, ...],
    dtype: Any,
) -> Array:
    """``(x - mean) * inv_std * scale + bias`` in the statistics' dtype, cast to ``dtype``.

    ``scale`` and ``bias`` have the feature shape and are broadcast along
    ``feature_axes``; the subtraction comes before the multiply so that data
    far from zero keeps its precision.
    """
    compute_dtype = stats.inv_std.dtype
    mul = stats.inv_std
    if scale is not None:
        mul = mul * _broadcast_feature(scale, x.ndim, feature_axes).astype(compute_dtype)
    y = (x.astype(compute_dtype) - stats.mean) * mul
    if bias is not None:
        y = y + _broadcast_feature(bias, x.ndim, feature_axes).astype(compute_dtype)
    return y.astype(dtype)


def standardize(
    x: Array,
    axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    scale: Array | None,
    bias: Array | None,
    *,
    epsilon: float,
    dtype: Any,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    center: bool = True,
) -> tuple[Array, Moments]:
    """:func:`moments` then :func:`normalize`, with the analytic derivative.

    The values are exactly those of ``normalize(x, moments(x, ...), ...)``.
    The derivative is the closed form of batch/layer normalization's
    (a ``jax.custom_jvp``, so forward mode, reverse mode and higher orders all
    work): with ``xhat = (x - mean) * inv_std`` and means over the counted
    (masked-in, all-device) entries,

        d xhat = inv_std * (dx - mean(dx) - xhat * mean(xhat * dx)).

    Autodiff through :func:`moments` would differentiate the shifted sums
    and the overflow ``lax.cond`` instead, which XLA compiles into several
    more full-size passes and buffers; the closed form needs two reductions.

    Args:
      x: a floating array.
      axes: the reduced axes, canonical.
      feature_axes: the axes ``scale`` and ``bias`` span, canonical.
      scale: optional, of x's shape at ``feature_axes``.
      bias: optional, of x's shape at ``feature_axes``.
      epsilon, mask, axis_name, axis_index_groups, center: as in :func:`moments`.
      dtype: the output dtype.

    Returns:
      ``(y, stats)``: the normalized array and its :class:`Moments`, both
      differentiable.

    Reference: Ioffe and Szegedy 2015, arXiv:1502.03167, section 3 (the
    gradient of the batch-normalizing transform).
    """

    def forward(x: Array, scale: Array | None, bias: Array | None, mask: Array | None):
        stats = moments(
            x, axes, epsilon=epsilon, mask=mask, axis_name=axis_name,
            axis_index_groups=axis_index_groups, center=center,
        )  # fmt: skip
        return normalize(x, stats, scale, bias, feature_axes, dtype), stats

    op = jax.custom_jvp(forward)

    @op.defjvp
    def op_jvp(primals: tuple, tangents: tuple) -> tuple:
        x, scale, bias, mask = primals
        dx, dscale, dbias, _ = tangents
        y, stats = op(x, scale, bias, mask)
        cdt = stats.inv_std.dtype
        inv = stats.inv_std
        xc = x.astype(cdt)
        xhat = ((xc - stats.mean) if center else xc) * inv
        dxc = dx.astype(cdt)

        def counted_mean(v: Array) -> Array:
            if mask is not None:
                v = jnp.where(mask, v, 0)
            total = jnp.sum(v, axes, keepdims=True)
            if axis_name is not None:
                total = lax.psum(total, axis_name, axis_index_groups=axis_index_groups)
            return total / jnp.maximum(stats.count, 1)

        # In terms of u = inv_std * dx (inv_std is constant along the reduced
        # axes): d xhat = u - mean(u) - xhat * mean(xhat * u), whose transpose
        # has the same two reductions. mean(xhat * u) = -d inv_std / inv_std;
        # nothing multiplies inv_std twice, so a tiny inv_std (|x| ~ 1e30)
        # does not underflow on the way.
        u = inv * dxc
        s = counted_mean(xhat * u)
        mean_u = counted_mean(u) if center else None
        dxhat = (u - mean_u if center else u) - xhat * s
        dstats = Moments(
            mean=mean_u / inv if center else jnp.zeros_like(stats.mean),
            var=2 * s / lax.square(inv),
            inv_std=-inv * s,
            count=jnp.zeros_like(stats.count),
        )
        if scale is not None:
            scale_b = _broadcast_feature(scale, x.ndim, feature_axes).astype(cdt)
            dscale_b = _broadcast_feature(dscale, x.ndim, feature_axes).astype(cdt)
            dy = dxhat * scale_b + xhat * dscale_b
        else:
            dy = dxhat
        if bias is not None:
            dy = dy + _broadcast_feature(dbias, x.ndim, feature_axes).astype(cdt)
        return (y, stats), (dy.astype(y.dtype), dstats)

    return op(x, scale, bias, mask)


def _broadcast_feature(p: Array, ndim: int, feature_axes: tuple[int, ...]) -> Array:
    shape = [1] * ndim
    for a, d in zip(feature_axes, jnp.shape(p), strict=True):
        shape[a] = d
    return jnp.reshape(p, shape)


def inverse_std(var: Array, epsilon: float) -> Array:
    """``1 / sqrt(var + epsilon)``: the factor every normalization multiplies by."""
    return lax.rsqrt(var + epsilon)


def running_moments(
    mean: Array, var: Array, epsilon: float, feature_axes: tuple[int, ...], x: Array
) -> Moments:
    """Stored feature-shaped statistics as :class:`Moments` broadcastable to ``x``."""
    dtype = jnp.promote_types(stat_dtype(x.dtype), jnp.result_type(mean))
    mean = _broadcast_feature(mean, x.ndim, feature_axes).astype(dtype)
    var = _broadcast_feature(var, x.ndim, feature_axes).astype(dtype)
    return Moments(mean, var, inverse_std(var, epsilon), jnp.zeros((), dtype))
