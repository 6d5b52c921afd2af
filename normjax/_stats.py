"""The one place where normjax computes means, variances and reciprocal stds.

Every normalization op calls :func:`moments` (or :func:`standardize`, which
adds the analytic derivative) for its statistics and :func:`normalize` to
apply them, so the numerics are fixed once:

* Statistics are accumulated in at least float32, whatever the input dtype.
* The variance is the mean of squared deviations from the mean, in two
  passes, never ``E[x^2] - E[x]^2``: data with mean 1e4 and std 1 keeps its
  std. The mean is held as a shift (one sample of the data) plus an offset,
  so a constant set is exactly constant (variance exactly 0) and the
  normalized output keeps the precision of the deviations.
* Where squared deviations overflow float32 (|x| ~ 1e30), they are summed
  again divided by the largest |x|. That pass sits behind a ``lax.cond`` on
  the finiteness of the plain statistics, so ordinary data does not pay for it.
* Across devices the sums and counts are combined with ``psum`` in both
  passes, so the statistics are exact over the union of all devices'
  masked entries, not a mean of per-device means.

References:
  Chan, Golub and LeVeque, "Algorithms for computing the sample variance:
  analysis and recommendations", The American Statistician 37(3), 1983.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Axes = int | Sequence[int]


class Moments(NamedTuple):
    """Statistics of ``x`` over the reduced axes, kept as size-1 dimensions.

    The mean is held as ``shift + offset``: normalization subtracts the two
    one after the other, so data far from zero (1e4 + N(0, 1)) keeps the
    precision its deviations have, not that of its mean rounded to float32.

    Attributes:
      shift: a constant near the mean (no gradient); zeros when uncentered.
      offset: the mean minus ``shift``; zeros when uncentered.
      var: the biased variance (the mean square when uncentered). May be
        ``inf`` when it exceeds float32's range; ``inv_std`` stays exact then.
      inv_std: ``1 / sqrt(var + epsilon)``, computed without overflow.
      count: the number of entries each statistic was computed from
        (after the mask and the cross-device sum), in the statistics' dtype.
    """

    shift: Array
    offset: Array
    var: Array
    inv_std: Array
    count: Array

    @property
    def mean(self) -> Array:
        return self.shift + self.offset


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


def _psum(v: Any, axis_name: Hashable | None, groups: Any) -> Any:
    return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=groups)


def _pmax(v: Array, axis_name: Hashable | None, groups: Any) -> Array:
    return v if axis_name is None else lax.pmax(v, axis_name, axis_index_groups=groups)


def _shared_sample(sample: Array, axis_name: Hashable | None, groups: Any) -> Array:
    """One device's ``sample`` on every device of ``axis_name``.

    The first device's, so that a batch split across devices in order is
    shifted exactly as on one device; within index groups, the largest
    (one of the samples all the same).
    """
    if axis_name is None:
        return sample
    if groups is not None:
        return lax.pmax(sample, axis_name, axis_index_groups=groups)
    first = lax.axis_index(axis_name) == 0
    return lax.psum(jnp.where(first, sample, 0), axis_name)


def _first(x: Array, axes: tuple[int, ...]) -> Array:
    """The entry at index 0 of every axis in ``axes``, keepdims."""
    for a in axes:
        x = lax.slice_in_dim(x, 0, 1, axis=a)
    return x


def _scale_above(largest: Array) -> Array:
    """A divisor that keeps squares of values up to ``largest`` inside the float range.

    It is 1 for ordinary data (nothing is rescaled), and ``largest`` itself
    above 1: the squares of the rescaled values are then at most 4, and the
    one extra rounding it costs is far below the statistics' own.
    """
    return jnp.maximum(largest, 1)


def _count(
    x: Array, axes: tuple[int, ...], mask: Array | None, axis_name: Hashable | None, groups: Any
) -> Array:
    if mask is None:
        n = jnp.full(_reduced_shape(x.shape, axes), np.prod([x.shape[a] for a in axes]), x.dtype)
    else:
        n = jnp.sum(mask, axes, keepdims=True, dtype=x.dtype)
    return _psum(n, axis_name, groups)


def _reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in axes else d for a, d in enumerate(shape))


def _centered(
    raw: Array, axes: tuple[int, ...], mask: Array | None, axis_name: Hashable | None, groups: Any
) -> tuple[Array, Array, Array, Array, Array]:
    """(count, shift, offset, scaled variance, scale): mean = shift + offset,
    variance = scaled variance * scale^2.

    Two passes over x: the offset of the mean from a shift, then the squared
    deviations from the mean. Normalization subtracts shift and offset
    separately, so the mean's precision is not capped by rounding it to x's
    dtype.
    """
    x = raw.astype(stat_dtype(raw.dtype))
    n = _count(x, axes, mask, axis_name, groups)
    safe_n = jnp.maximum(n, 1)
    if mask is None:
        # One sample of the data as the shift: a constant set is then exactly
        # constant (offset 0, variance 0).
        shift = _shared_sample(lax.stop_gradient(_first(x, axes)), axis_name, groups)
        offset = _psum(jnp.sum(x - shift, axes, keepdims=True), axis_name, groups) / safe_n

        def mean_square(x: Array, inv_scale: Array) -> Array:
            m2 = jnp.sum(lax.square(((x - shift) - offset) * inv_scale), axes, keepdims=True)
            return _psum(m2, axis_name, groups) / safe_n

    else:
        # A hidden entry may hold anything (NaN, 1e30), so the shift is the mean
        # of the counted entries, and the offset corrects for its rounding
        # (Chan, Golub and LeVeque's corrected two-pass algorithm).
        total = _psum(jnp.sum(jnp.where(mask, x, 0), axes, keepdims=True), axis_name, groups)
        shift = lax.stop_gradient(total / safe_n)
        sum_d = jnp.sum(jnp.where(mask, x - shift, 0), axes, keepdims=True)
        offset = _psum(sum_d, axis_name, groups) / safe_n

        def mean_square(x: Array, inv_scale: Array) -> Array:
            d = jnp.where(mask, (x - shift) * inv_scale, 0)
            sq = _psum(jnp.sum(lax.square(d), axes, keepdims=True), axis_name, groups)
            return jnp.maximum(sq / safe_n - lax.square(offset * inv_scale), 0)

    var, scale = _without_overflow(mean_square, x, raw, axes, mask, axis_name, groups)
    return n, shift, offset, var, scale


def _mean_square(
    raw: Array, axes: tuple[int, ...], mask: Array | None, axis_name: Hashable | None, groups: Any
) -> tuple[Array, Array, Array]:
    """(count, scaled mean square, scale), mean square = scaled * scale^2."""
    x = raw.astype(stat_dtype(raw.dtype))
    n = _count(x, axes, mask, axis_name, groups)
    safe_n = jnp.maximum(n, 1)

    def mean_square(x: Array, inv_scale: Array) -> Array:
        xm = x if mask is None else jnp.where(mask, x, 0)
        sq = jnp.sum(lax.square(xm * inv_scale), axes, keepdims=True)
        return _psum(sq, axis_name, groups) / safe_n

    ms, scale = _without_overflow(mean_square, x, raw, axes, mask, axis_name, groups)
    return n, ms, scale


def _without_overflow(
    mean_square: Callable[[Array, Array], Array],
    x: Array,
    raw: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    axis_name: Hashable | None,
    groups: Any,
) -> tuple[Array, Array]:
    """``(mean_square(x, 1), 1)``, or where a square overflowed, ``(mean_square(x, 1/s), s)``.

    ``s`` is :func:`_scale_above` the largest counted ``|x|``. The rescaled pass
    sits behind a ``lax.cond``, so ordinary data pays one comparison on the
    (small) statistics for it. The branch converts ``raw`` (x in its own
    dtype) itself: capturing the converted ``x`` would make XLA keep a
    full-size float32 copy of a bfloat16 input.
    """
    plain = mean_square(x, jnp.ones((), x.dtype))

    def rescaled(_: Any) -> tuple[Array, Array]:
        xs = raw.astype(x.dtype)
        magnitude = jnp.abs(lax.stop_gradient(xs))
        if mask is not None:
            magnitude = jnp.where(mask, magnitude, 0)
        largest = _pmax(jnp.max(magnitude, axes, keepdims=True), axis_name, groups)
        scale = _scale_above(largest)
        return mean_square(xs, 1 / scale), scale

    overflowed = jnp.any(jnp.isinf(plain))
    if axis_name is not None:
        # Every device must take the same branch: the branches hold collectives.
        overflowed = lax.psum(overflowed.astype(jnp.int32), axis_name) > 0
    return lax.cond(overflowed, rescaled, lambda _: (plain, jnp.ones_like(plain)), None)


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
        shard_map, vmap): the statistics are those of the union of every
        device's counted entries.
      axis_index_groups: as in ``lax.psum``.
      center: False gives the uncentered mean square (RMS norm).

    Returns:
      :class:`Moments`, each of x's rank with size-1 reduced axes. A group
      with no counted entry has ``inv_std`` 0, so it normalizes to the bias.
    """
    if center:
        n, shift, offset, var, scale = _centered(x, axes, mask, axis_name, axis_index_groups)
    else:
        n, var, scale = _mean_square(x, axes, mask, axis_name, axis_index_groups)
        shift = offset = jnp.zeros_like(var)
    # rsqrt(var + eps) = rsqrt(var_s + eps / scale^2) / scale, with the term
    # floored at the smallest normal so that a zero variance stays finite.
    tiny = jnp.finfo(var.dtype).tiny
    inv_std = lax.rsqrt(var + jnp.maximum(epsilon / lax.square(scale), tiny)) / scale
    inv_std = jnp.where(n > 0, inv_std, 0)
    return Moments(shift, offset, var * lax.square(scale), inv_std, n)


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
    y = ((x.astype(compute_dtype) - stats.shift) - stats.offset) * mul
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
        xhat = ((xc - stats.shift) - stats.offset) * inv
        dxc = dx.astype(cdt)

        def counted_mean(v: Array) -> Array:
            if mask is not None:
                v = jnp.where(mask, v, 0)
            total = jnp.sum(v, axes, keepdims=True)
            if axis_name is not None:
                total = lax.psum(total, axis_name, axis_index_groups=axis_index_groups)
            return total / jnp.maximum(stats.count, 1)

        # d xhat = inv_std * (dx - mean(dx) - xhat * mean(xhat * dx)). Every
        # factor constant along the reduced axes (inv_std always; scale too when
        # it spans none of them, as in batch and instance norm) multiplies the
        # per-set means after the reduction, never dx before it: the transpose
        # then reduces the cotangent g itself (sum(g), sum(g * xhat), the very
        # sums the scale and bias gradients need) instead of a full-size
        # g * scale * inv_std that XLA would write out.
        factor_scale = scale is not None and not set(feature_axes) & set(axes)
        mul = inv
        if scale is not None:
            scale_b = _broadcast_feature(scale, x.ndim, feature_axes).astype(cdt)
            if factor_scale:
                mul = inv * scale_b
        mean_xhat_dx = counted_mean(xhat * dxc)
        mean_dx = counted_mean(dxc) if center else None
        dy = mul * dxc - xhat * (mul * mean_xhat_dx)
        if center:
            dy = dy - mul * mean_dx
        if scale is not None and not factor_scale:
            dy = dy * scale_b
        # A set with nothing counted has inv_std 0 and no statistics to move.
        safe_inv = jnp.where(inv > 0, inv, 1)
        dstats = Moments(
            shift=jnp.zeros_like(stats.shift),
            offset=mean_dx if center else jnp.zeros_like(stats.offset),
            var=2 * mean_xhat_dx / safe_inv,
            inv_std=-inv * (inv * mean_xhat_dx),
            count=jnp.zeros_like(stats.count),
        )
        if scale is not None:
            dy = dy + xhat * _broadcast_feature(dscale, x.ndim, feature_axes).astype(cdt)
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
    return Moments(mean, jnp.zeros_like(mean), var, inverse_std(var, epsilon), jnp.zeros((), dtype))
