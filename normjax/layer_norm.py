"""Per-sample normalizations: layer, RMS, group and instance norm.

None of them depends on the batch, so they work with a batch of one and
inside recurrent cells, where batch norm does not.

References:
  Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
  Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
  arXiv:1910.07467.
  Wu and He, "Group Normalization", ECCV 2018. arXiv:1803.08494.
  Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing
  Ingredient for Fast Stylization", 2016. arXiv:1607.08022.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax

from normjax import _stats
from normjax._stats import Axes

Array = jax.Array

__all__ = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]


def _normalize_over(
    x: Any,
    scale: Array | None,
    bias: Array | None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes,
    epsilon: float,
    mask: Array | None,
    dtype: Any,
    center: bool,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    channel_groups: int | None = None,
) -> Array:
    """Shared body: validate, compute the moments over ``reduction_axes``, apply them."""
    x = _stats.check_floating(x)
    reduction = _stats.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = _stats.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    epsilon = _stats.check_epsilon(epsilon)
    dtype = _stats.check_float_dtype(dtype)
    fshape = _stats.feature_shape(x.shape, features)
    scale = _stats.checked_param(scale, fshape, "scale")
    bias = _stats.checked_param(bias, fshape, "bias")
    mask = _stats.broadcast_mask(mask, x.shape)

    def normalized(x: Array, scale: Array | None, bias: Array | None, mask: Array | None):
        y, _ = _stats.standardize(
            x, reduction, features, scale, bias, epsilon=epsilon, mask=mask, center=center,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            channel_groups=channel_groups, dtype=x.dtype if dtype is None else dtype,
        )  # fmt: skip
        return y

    return _stats.auto_sharded(normalized, x, x, scale, bias, mask)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Layer normalization: each sample normalized over its own features.

    Args:
      x: floating input.
      scale: optional gamma, of ``x``'s shape at ``feature_axes``.
      bias: optional beta, of ``x``'s shape at ``feature_axes``.
      reduction_axes: the axes the mean and variance are taken over.
      feature_axes: the axes ``scale`` and ``bias`` span.
      epsilon: added to the variance.
      mask: optional boolean, broadcastable to ``x``: statistics over True
        entries only.
      axis_name: also reduce over this named axis (features split across
        devices).
      axis_index_groups: as in ``lax.psum``.
      dtype: output dtype; ``x.dtype`` by default.

    Returns:
      The normalized array.

    Raises:
      TypeError: ``x`` or ``dtype`` is not floating; axes that are not ints;
        a traced ``epsilon``.
      ValueError: axes out of range, scale/bias/mask of the wrong shape,
        epsilon not finite or below float32's smallest normal number.

    Reference: Ba, Kiros and Hinton 2016, arXiv:1607.06450.
    """
    return _normalize_over(
        x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
        epsilon=epsilon, mask=mask, dtype=dtype, center=True, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )  # fmt: skip


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """RMS normalization: ``x / sqrt(mean(x^2) + epsilon) * scale``, no centering.

    Args:
      x, scale, reduction_axes, feature_axes, epsilon, mask, axis_name,
      axis_index_groups, dtype: as in :func:`layer_norm`.

    Returns:
      The normalized array.

    Raises:
      As :func:`layer_norm`.

    Reference: Zhang and Sennrich, NeurIPS 2019, arXiv:1910.07467.
    """
    return _normalize_over(
        x, scale, None, reduction_axes=reduction_axes, feature_axes=feature_axes,
        epsilon=epsilon, mask=mask, dtype=dtype, center=False, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )  # fmt: skip


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Group normalization: channels split into groups, each normalized per sample.

    Channels are on the last axis. Within each group the statistics are taken
    over every axis but the leading batch axis (or over ``reduction_axes``,
    which must then include the channel axis, as in Flax); a 1-D ``x`` is one
    example's channels.

    Args:
      x: floating input ``(batch, ..., channels)``, or ``(channels,)``.
      scale: optional gamma, ``(channels,)``.
      bias: optional beta, ``(channels,)``.
      num_groups: the number of groups; exactly one of ``num_groups`` and
        ``group_size`` is given.
      group_size: the number of channels per group.
      reduction_axes: axes of ``x`` to reduce (channel axis included); None
        for every axis but the first.
      epsilon: added to the variance.
      mask: optional boolean, broadcastable to ``x``.
      axis_name: also reduce over this named axis: for a sample whose reduced
        axes (e.g. its spatial axes) are split across devices, the statistics
        are those of the whole sample.
      axis_index_groups: as in ``lax.psum``.
      dtype: output dtype; ``x.dtype`` by default.

    Returns:
      The normalized array.

    Raises:
      TypeError: as :func:`layer_norm`.
      ValueError: both or neither of num_groups and group_size; a group count
        or size that does not divide the channels; and as :func:`layer_norm`.

    Reference: Wu and He, ECCV 2018, arXiv:1803.08494.
    """
    x = _stats.check_floating(x)
    if x.ndim < 1:
        raise ValueError(f"group_norm needs `x` with a channel axis, got shape {x.shape}.")
    channels = x.shape[-1]
    num_groups = _stats.group_count(channels, num_groups, group_size)
    if reduction_axes is None:
        # Every axis but the first, and always the channels: one example of
        # shape (channels,) (under jax.vmap) normalizes each group, as in Flax.
        reduction = tuple(range(1, x.ndim - 1)) + (x.ndim - 1,)
    else:
        reduction = _stats.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
        if x.ndim - 1 not in reduction:
            raise ValueError(
                f"`reduction_axes`={reduction_axes!r} must include the channel axis "
                f"(the last, {x.ndim - 1})."
            )
    scale = _stats.checked_param(scale, (channels,), "scale")
    bias = _stats.checked_param(bias, (channels,), "bias")
    mask = _stats.broadcast_mask(mask, x.shape)
    # The channel axis is pooled in groups by the statistics core itself: a
    # reshape to (..., groups, channels per group) compiles to a slow strided
    # reduction.
    return _normalize_over(
        x, scale, bias, reduction_axes=reduction[:-1], feature_axes=x.ndim - 1,
        epsilon=epsilon, mask=mask, dtype=dtype, center=True, channel_groups=num_groups,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
    )  # fmt: skip


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Instance normalization: each sample and channel normalized over the rest.

    Statistics are taken over every axis but the leading batch axis and
    ``feature_axes``.

    Args:
      x: floating input ``(batch, ..., features)``.
      scale, bias: optional, of ``x``'s shape at ``feature_axes``.
      feature_axes: the channel axis or axes, kept.
      epsilon, mask, dtype: as in :func:`layer_norm`.
      axis_name, axis_index_groups: as in :func:`group_norm`.

    Returns:
      The normalized array.

    Raises:
      As :func:`layer_norm`; ValueError when ``feature_axes`` include the batch
      axis 0, or no axis is left to reduce.

    Reference: Ulyanov, Vedaldi and Lempitsky 2016, arXiv:1607.08022.
    """
    x = _stats.check_floating(x)
    features = _stats.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    reduction = tuple(a for a in range(1, x.ndim) if a not in features)
    if 0 in features:
        raise ValueError(
            f"instance_norm's `feature_axes`={feature_axes!r} include axis 0, the batch "
            f"axis, which it never reduces (input shape {x.shape}); give the channel axes."
        )
    if not reduction:
        raise ValueError(
            f"instance_norm reduces every axis but the batch axis 0 and `feature_axes`="
            f"{feature_axes!r}; for an input of shape {x.shape} that leaves nothing to reduce."
        )
    return _normalize_over(
        x, scale, bias, reduction_axes=reduction, feature_axes=features, epsilon=epsilon,
        mask=mask, dtype=dtype, center=True, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )  # fmt: skip
