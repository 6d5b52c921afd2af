"""Flax NNX normalization modules over normjax's functional core.

Each module here but :class:`BatchRenorm` (which Flax lacks; it takes
:class:`BatchNorm`'s arguments plus ``r_max`` and ``d_max``) is a drop-in
replacement for the ``flax.nnx`` module of the same name: ``num_features``
first, ``rngs`` keyword, the same keyword arguments and defaults,
``nnx.Param`` scale and bias, ``nnx.BatchStat`` running ``mean`` and
``var`` plus ``count`` (an int32 scalar), and ``model.train()`` /
``model.eval()`` switch :class:`BatchNorm` and :class:`BatchRenorm` through
their ``use_running_average`` attribute as they switch ``nnx.BatchNorm``.
normjax's options (``debias``, ``unbiased_running_var``, ``skip_nonfinite``;
``r_max``, ``d_max``) are extra keywords.

The modules hold no maths: every number comes from :func:`normjax.batch_norm`,
:func:`normjax.batch_renorm`, :func:`normjax.layer_norm`,
:func:`normjax.rms_norm`, :func:`normjax.group_norm` and
:func:`normjax.instance_norm`. The differences from Flax are those of
:mod:`normjax.linen` (``debias=True`` by default, ``use_fast_variance``
ignored), and one fix:
``flax.nnx.GroupNorm`` repeats the group statistics along axis 1 instead of
the channel axis, which is wrong whenever ``reduction_axes`` leaves a
non-batch axis unreduced; normjax's GroupNorm is right there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Array, Dtype, Initializer, PromoteDtypeFn

import normjax as nj
from normjax import _stats
from normjax.linen import _describe, _errors_name

Axes = int | Sequence[int]

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


# ----------------------------------------------------------------------------
# Shared private helpers: shapes and parameters. No maths here.


def _make_params(
    feature_shape: tuple[int, ...],
    *,
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
) -> tuple[Any, Any]:
    """Scale then bias as ``nnx.Param`` (or None), drawing keys in Flax's order."""
    scale = (
        nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
        if use_scale
        else nnx.data(None)
    )
    bias = (
        nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
        if use_bias
        else nnx.data(None)
    )
    return scale, bias


def _feature_shape_of(module: Any, x: Array, axes: Axes, axes_name: str) -> tuple[int, ...]:
    """``x``'s shape at ``axes``, checked against the module's ``num_features``.

    Flax NNX stores one flat ``(num_features,)`` vector even for several
    feature axes; given an int, a feature shape with the same number of
    entries is accepted and the parameters are reshaped to it. Given a shape,
    x's must be that shape: (3, 4) parameters read as (4, 3) would mix up
    which feature each belongs to.
    """
    with _errors_name(module):
        canonical = _stats.canonicalize_axes(axes, x.ndim, axes_name)
    found = tuple(x.shape[a] for a in canonical)
    expected = module.feature_shape
    if (found != expected if len(expected) > 1 else math.prod(found) != math.prod(expected)):
        raise ValueError(
            f"{_describe(module)}: `x` has feature shape {found} at {axes_name}={axes!r}, "
            f"but the module was built with num_features={module.num_features!r}."
        )
    return found


def _read(variable: Any, shape: tuple[int, ...]) -> Array | None:
    """A variable's value reshaped to ``shape``; None for an absent parameter."""
    return None if variable is None else jnp.reshape(variable[...], shape)


def _promote(
    module: Any, x: Array, scale: Array | None, bias: Array | None
) -> tuple[Array, Array | None, Array | None]:
    """Flax NNX's dtype rule: ``promote_dtype`` over the input and the parameters."""
    x, scale, bias = module.promote_dtype((jnp.asarray(x), scale, bias), dtype=module.dtype)
    return x, scale, bias


# ----------------------------------------------------------------------------
# Batch normalization: modules with running statistics.


class BatchNorm(nnx.Module):
    """Batch normalization over normjax's :func:`normjax.batch_norm`.

    A drop-in replacement for ``flax.nnx.BatchNorm``; ``model.train()`` and
    ``model.eval()`` set ``use_running_average`` to False and True.

    Args:
      num_features: the number of features (or the feature shape when
        ``axis`` names several axes).
      use_running_average: True normalizes with the stored statistics, False
        with the batch's (and updates the stored ones); None requires it at
        call time.
      axis: the feature axis or axes; every other axis is reduced.
      momentum: decay of the running averages; None gives the cumulative
        average over all batches.
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias (beta).
      use_scale: multiply by a learned scale (gamma).
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      axis_name: the named axis (``nnx.vmap``, pmap, shard_map) to combine
        statistics across.
      axis_index_groups: groups of indices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      promote_dtype: Flax NNX's dtype promotion of ``(x, mean, var, scale, bias)``.
      rngs: the random keys for the initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      debias: bias-correct the running averages (True, the default); False
        takes Flax's update (to float tolerance: the batch statistics round
        differently).
      unbiased_running_var: store the unbiased (n - 1) batch variance.
      skip_nonfinite: leave the running statistics and count unchanged when the
        batch statistics are not finite (a NaN the mask hides does not count),
        or when the mask hides a feature entirely (see :func:`normjax.batch_norm`).

    Reference:
      Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network
      Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: Axes = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        debias: bool = True,
        unbiased_running_var: bool = False,
        skip_nonfinite: bool = True,
    ):
        with _errors_name(self):
            self.feature_shape = _stats.checked_shape(num_features, "num_features")
        # float32, but float64 for a float64 model (x64), whose running
        # averages float32 would round (Flax's turn float64 at their first update).
        stats_dtype = jax.dtypes.canonicalize_dtype(_stats.stat_dtype(param_dtype))
        initial = nj.batch_norm_state(self.feature_shape, dtype=stats_dtype)
        self.mean = nnx.BatchStat(initial.mean)
        self.var = nnx.BatchStat(initial.var)
        self.count = nnx.BatchStat(initial.count)
        self.scale, self.bias = _make_params(
            self.feature_shape,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.debias = debias
        self.unbiased_running_var = unbiased_running_var
        self.skip_nonfinite = skip_nonfinite

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x`` with the batch's or the stored statistics.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name.
          mask: optional boolean array broadcastable to ``x``: statistics over
            its True entries only.

        Returns:
          The normalized ``x``; in training the stored statistics are updated.

        Raises:
          ValueError: if ``use_running_average`` is None here and on the
            module, if ``x``'s feature shape does not match ``num_features``,
            or if the core rejects an argument (the message names the module).
        """
        use_running_average = nnx.module.first_from(
            use_running_average,
            self.use_running_average,
            error_msg=(
                f"{_describe(self)}: no `use_running_average` was given, neither to the "
                "constructor nor at call time; pass True or False to either, or call "
                "model.train() / model.eval()."
            ),
        )
        x = jnp.asarray(x)
        found = _feature_shape_of(self, x, self.axis, "axis")
        mean, var = jnp.reshape(self.mean[...], found), jnp.reshape(self.var[...], found)
        # Flax NNX's promotion takes the running statistics too (a bfloat16 x
        # with float32 statistics and no dtype gives float32, as in Flax); the
        # state itself keeps its stored precision.
        x, _, _, scale, bias = self.promote_dtype(
            (x, mean, var, _read(self.scale, found), _read(self.bias, found)), dtype=self.dtype
        )
        state = nj.BatchNormState(mean, var, self.count[...])
        training = not use_running_average
        with _errors_name(self):
            y, new_state = self._core(x, state, scale, bias, training=training, mask=mask)
        if training:
            # Running statistics are not differentiated through (as in Flax).
            new_state = jax.lax.stop_gradient(new_state)
            self.mean[...] = jnp.reshape(new_state.mean, self.feature_shape)
            self.var[...] = jnp.reshape(new_state.var, self.feature_shape)
            self.count[...] = new_state.count
        return y

    def _core(
        self, x: Array, state: nj.BatchNormState, scale: Array | None, bias: Array | None, **kw: Any
    ) -> tuple[Array, nj.BatchNormState]:
        """The functional op this module wraps."""
        return nj.batch_norm(x, state, scale, bias, **self._common_kwargs(), **kw)

    def _common_kwargs(self) -> dict[str, Any]:
        return dict(
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            debias=self.debias,
            unbiased_running_var=self.unbiased_running_var,
            skip_nonfinite=self.skip_nonfinite,
            dtype=self.dtype,
        )

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: the new mode, or None to leave it.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch renormalization over normjax's :func:`normjax.batch_renorm`.

    :class:`BatchNorm`'s arguments plus ``r_max`` and ``d_max`` (Flax has no
    BatchRenorm).

    Args:
      num_features: as :class:`BatchNorm`.
      r_max: the correction ``r = batch_std / running_std`` is clipped to
        ``[1 / r_max, r_max]``.
      d_max: the shift ``d = (batch_mean - running_mean) / running_std`` is
        clipped to ``[-d_max, d_max]``.
      rngs: the random keys for the initializers.
      **kwargs: every other keyword argument of :class:`BatchNorm`.

    Reference:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.r_max = r_max
        self.d_max = d_max

    def _core(
        self, x: Array, state: nj.BatchNormState, scale: Array | None, bias: Array | None, **kw: Any
    ) -> tuple[Array, nj.BatchNormState]:
        return nj.batch_renorm(
            x, state, scale, bias, r_max=self.r_max, d_max=self.d_max,
            **self._common_kwargs(), **kw,
        )  # fmt: skip


# ----------------------------------------------------------------------------
# Per-sample normalizations: parameters only.


class _PerSampleNorm(nnx.Module):
    """The constructor shared by LayerNorm, RMSNorm, GroupNorm and InstanceNorm."""

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float,
        dtype: Dtype | None,
        param_dtype: Dtype,
        use_bias: bool,
        use_scale: bool,
        bias_init: Initializer,
        scale_init: Initializer,
        axis_name: str | None,
        axis_index_groups: Any,
        use_fast_variance: bool,
        promote_dtype: PromoteDtypeFn,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any],
        scale_metadata: Mapping[str, Any],
    ):
        with _errors_name(self):
            self.feature_shape = _stats.checked_shape(num_features, "num_features")
        self.scale, self.bias = _make_params(
            self.feature_shape,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def _inputs(
        self, x: Array, feature_axes: Axes, axes_name: str
    ) -> tuple[Array, Array | None, Array | None]:
        """``x`` and the parameters, checked, reshaped to x's feature shape and promoted."""
        x = jnp.asarray(x)
        found = _feature_shape_of(self, x, feature_axes, axes_name)
        return _promote(self, x, _read(self.scale, found), _read(self.bias, found))


class LayerNorm(_PerSampleNorm):
    """Layer normalization over normjax's :func:`normjax.layer_norm`.

    A drop-in replacement for ``flax.nnx.LayerNorm``.

    Args:
      num_features: the number of features (entries at ``feature_axes``).
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias.
      use_scale: multiply by a learned scale.
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axes that carry a separate scale and bias.
      axis_name: a named axis to combine statistics across devices.
      axis_index_groups: groups of indices on ``axis_name``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      promote_dtype: Flax NNX's dtype promotion of ``(x, scale, bias)``.
      rngs: the random keys for the initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.

    Reference:
      Ba, Kiros and Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
        )  # fmt: skip
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample of ``x`` over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape does not match ``num_features``
            or the core rejects an argument (the message names the module).
        """
        x, scale, bias = self._inputs(x, self.feature_axes, "feature_axes")
        with _errors_name(self):
            return nj.layer_norm(
                x,
                scale,
                bias,
                reduction_axes=self.reduction_axes,
                feature_axes=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=self.dtype,
            )


class RMSNorm(_PerSampleNorm):
    """Root-mean-square layer normalization over normjax's :func:`normjax.rms_norm`.

    A drop-in replacement for ``flax.nnx.RMSNorm``.

    Args:
      num_features: the number of features (entries at ``feature_axes``).
      epsilon: added to the mean square before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the scale).
      param_dtype: the dtype of the scale.
      use_scale: multiply by a learned scale.
      scale_init: initializer for the scale.
      reduction_axes: the axes the mean square is computed over.
      feature_axes: the axes that carry a separate scale.
      axis_name: a named axis to combine statistics across devices.
      axis_index_groups: groups of indices on ``axis_name``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      promote_dtype: Flax NNX's dtype promotion of ``(x, scale)``.
      rngs: the random keys for the initializer.
      scale_metadata: metadata of the scale ``nnx.Param``.

    Reference:
      Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=False, use_scale=use_scale, bias_init=nnx.initializers.zeros,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=_NO_METADATA, scale_metadata=scale_metadata,
        )  # fmt: skip
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Divides each sample of ``x`` by its root mean square over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional boolean array broadcastable to ``x`` (positional as
            in ``flax.nnx.RMSNorm``).

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape does not match ``num_features``
            or the core rejects an argument (the message names the module).
        """
        x, scale, _ = self._inputs(x, self.feature_axes, "feature_axes")
        with _errors_name(self):
            return nj.rms_norm(
                x,
                scale,
                reduction_axes=self.reduction_axes,
                feature_axes=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=self.dtype,
            )


class GroupNorm(_PerSampleNorm):
    """Group normalization over normjax's :func:`normjax.group_norm` (channels last).

    A drop-in replacement for ``flax.nnx.GroupNorm`` that is also right when
    ``reduction_axes`` leaves a non-batch axis unreduced (Flax NNX repeats the
    group statistics along axis 1 there instead of the channel axis).

    Args:
      num_features: the number of channels (the last axis).
      num_groups: the number of channel groups (32, as in the paper).
      group_size: the number of channels per group (then ``num_groups=None``).
        Either way both attributes are set, and a count that does not divide
        ``num_features`` raises ValueError here, as in Flax NNX.
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias.
      use_scale: multiply by a learned scale.
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      reduction_axes: the axes reduced, including the last; default every
        axis but the first.
      axis_name: also reduce over this named axis (a sample's reduced axes
        split across devices).
      axis_index_groups: groups of indices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      promote_dtype: Flax NNX's dtype promotion of ``(x, scale, bias)``.
      rngs: the random keys for the initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.

    Reference:
      Wu and He, "Group Normalization", ECCV 2018.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
        )  # fmt: skip
        # As Flax NNX: both resolved here, and a bad pair is an error here.
        with _errors_name(self):
            self.num_groups = _stats.group_count(num_features, num_groups, group_size)
        self.group_size = num_features // self.num_groups
        self.feature_axis = -1
        self.reduction_axes = reduction_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample of ``x`` over groups of channels.

        Args:
          x: the input, channels last.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if the channel count does not match ``num_features``, or
            the core rejects an argument (e.g. ``num_groups`` not dividing the
            channels); the message names the module.
        """
        x, scale, bias = self._inputs(x, -1, "the last (channel) axis")
        with _errors_name(self):
            return nj.group_norm(
                x,
                scale,
                bias,
                num_groups=self.num_groups,
                reduction_axes=self.reduction_axes,
                epsilon=self.epsilon,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=self.dtype,
            )


class InstanceNorm(_PerSampleNorm):
    """Instance normalization over normjax's :func:`normjax.instance_norm`.

    A drop-in replacement for ``flax.nnx.InstanceNorm``.

    Args:
      num_features: the number of features (entries at ``feature_axes``).
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias.
      use_scale: multiply by a learned scale.
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      feature_axes: the feature axes (never axis 0, the batch).
      axis_name: also reduce over this named axis (a sample's reduced axes
        split across devices).
      axis_index_groups: groups of indices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      promote_dtype: Flax NNX's dtype promotion of ``(x, scale, bias)``.
      rngs: the random keys for the initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.

    Reference:
      Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing
      Ingredient for Fast Stylization", arXiv:1607.08022, 2016.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
        )  # fmt: skip
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample and feature of ``x`` over the remaining axes.

        Args:
          x: the input, batch first.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape does not match ``num_features``
            or the core rejects an argument (the message names the module).
        """
        x, scale, bias = self._inputs(x, self.feature_axes, "feature_axes")
        with _errors_name(self):
            return nj.instance_norm(
                x,
                scale,
                bias,
                feature_axes=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=self.dtype,
            )
