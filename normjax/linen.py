"""Flax linen normalization modules over normjax's functional core.

Each module here but :class:`BatchRenorm` (which Flax lacks; it takes
:class:`BatchNorm`'s fields plus ``r_max`` and ``d_max``) is a drop-in
replacement for the ``flax.linen`` module of the same name: the same
constructor fields with the same defaults and order, the same ``__call__``
signature and the same variable names (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``), plus ``batch_stats/count`` and
normjax's options (``debias``, ``unbiased_running_var``, ``skip_nonfinite``;
``r_max`` and ``d_max`` for :class:`BatchRenorm`). Swapping
``flax.linen.BatchNorm`` for ``normjax.linen.BatchNorm`` is a one-line change.

The modules hold no maths: they create the parameters and running statistics
and pass them to :func:`normjax.batch_norm`, :func:`normjax.batch_renorm`,
:func:`normjax.layer_norm`, :func:`normjax.rms_norm`,
:func:`normjax.group_norm` and :func:`normjax.instance_norm`; every number
they return comes from there.

Differences from Flax, all deliberate:

* ``debias`` defaults to True (as in :func:`normjax.batch_norm`): the running
  averages are bias-corrected, so they are usable from the first step.
  ``debias=False`` takes Flax's running-average update; its values match
  Flax's to float tolerance (the batch statistics are computed stably, so
  they round differently from Flax's fast variance).
* ``use_fast_variance`` and ``force_float32_reductions`` are accepted for
  compatibility and ignored: normjax always computes statistics in at least
  float32 with a numerically stable variance.
* ``axis_name`` combines the statistics across devices in every module:
  exactly, over the union of all devices' counted entries.
* The output dtype follows Flax (``dtype``, else the promotion of ``x`` and
  the parameters), so a bfloat16 input with float32 parameters gives float32
  as ``flax.linen`` does.
* ``batch_stats`` without a ``count`` (a ``flax.linen.BatchNorm``'s) count as
  long warmed up: training goes on weighing each batch ``1 - momentum``.
* Masks of any dtype count their nonzero entries and integer inputs are
  normalized as floats, as in ``flax.linen``; the functional core itself takes
  boolean masks and floating inputs only.
* Clear errors where Flax returns something: one value per feature in
  training, ``epsilon`` below float32's smallest normal number, ``momentum``
  outside [0, 1) in training, complex inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Array, Dtype, Initializer
from jax.nn import initializers

import normjax as nj
from normjax import _stats

Axes = int | Sequence[int]

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
]


# ----------------------------------------------------------------------------
# Shared private helpers: shapes, parameters, error context. No maths here.


def _describe(module: Any) -> str:
    """A module's class and name for error messages: ``normjax.linen.BatchNorm 'bn'``."""
    owner = type(module).__module__
    name = getattr(module, "name", None)
    label = f"{owner}.{type(module).__name__}"
    return f"{label} {name!r}" if name is not None else label


@contextlib.contextmanager
def _errors_name(module: Any) -> Iterator[None]:
    """Prefixes the core's argument errors with the module they happened in.

    The core names the argument (``mask``, ``scale``, ``num_groups``, ...); the
    module adds which layer of the model it was, which the core cannot know.
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        if type(error) not in (ValueError, TypeError):
            raise  # JAX's own subclasses (tracer errors) have their own constructors
        raise type(error)(f"{_describe(module)}: {error}") from error


def _check_stored_shapes(
    module: nn.Module, feature_shape: tuple[int, ...], names: Sequence[tuple[str, str]], where: str
) -> None:
    """Raises if a variable in ``names`` exists with a shape other than ``x``'s feature shape."""
    for collection, name in names:
        if not module.has_variable(collection, name):
            continue
        stored = tuple(jnp.shape(meta.unbox(module.get_variable(collection, name))))
        if stored != tuple(feature_shape):
            raise ValueError(
                f"{_describe(module)}: `x` has feature shape {tuple(feature_shape)} at {where}, "
                f"but its `{collection}/{name}` has shape {stored} "
                "(the input's number of features changed since `init`)."
            )


def _scale_and_bias(
    module: nn.Module,
    feature_shape: tuple[int, ...],
    *,
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Dtype,
) -> tuple[Array | None, Array | None]:
    """Creates (or reads) ``params/scale`` and ``params/bias`` of the feature shape."""
    scale = module.param("scale", scale_init, feature_shape, param_dtype) if use_scale else None
    bias = module.param("bias", bias_init, feature_shape, param_dtype) if use_bias else None
    return scale, bias


def _as_flax_takes_them(x: Array, mask: Array | None) -> tuple[Array, Array | None, Array]:
    """``x`` and ``mask`` as ``flax.linen`` takes them: an integer or boolean x
    as floating (float32 for int32), and any mask as booleans (nonzero:
    counted). The core itself takes floating x and boolean masks only. The
    third value is x as given, for :func:`_output_dtype`: Flax promotes an
    int32 x with bfloat16 parameters to bfloat16, not float32."""
    given = jnp.asarray(x)
    x = given
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x, None if mask is None else jnp.asarray(mask, bool), given


def _output_dtype(
    given: Array, scale: Array | None, bias: Array | None, dtype: Dtype | None
) -> Any:
    """Flax's output-dtype rule: ``dtype`` if given, else the promotion of the
    input as given and the params."""
    return canonicalize_dtype(given, scale, bias, dtype=dtype)


def _merge_use_running_average(module: Any, attribute: bool | None, argument: bool | None) -> bool:
    """Flax's ``merge_param`` for ``use_running_average``, naming the module on error."""
    try:
        return nn.merge_param("use_running_average", attribute, argument)
    except ValueError as error:
        raise ValueError(f"{_describe(module)}: {error}") from None


# ----------------------------------------------------------------------------
# Batch normalization: modules with running statistics.

# The count given to stored statistics that have none (a flax.linen.BatchNorm
# checkpoint's): large enough that momentum^count is 0 for any momentum up to
# 1 - 1e-7, so that the debiased average weighs each batch 1 - momentum.
_COUNTLESS_COUNT = 2**30


class BatchNorm(nn.Module):
    """Batch normalization over normjax's :func:`normjax.batch_norm`.

    A drop-in replacement for ``flax.linen.BatchNorm``: the same fields, the
    same call, the same variables, plus ``batch_stats/count`` (an int32
    scalar: how many batches updated the statistics). The running statistics
    change only when ``batch_stats`` is mutable and the module is not
    initializing; calling in training mode without ``mutable=["batch_stats"]``
    raises Flax's error, as ``flax.linen.BatchNorm`` does. ``init`` in
    training mode with one value per feature (a single example before a
    Dense layer) normalizes with the initial statistics instead of failing:
    nothing is updated during ``init`` anyway.

    Attributes:
      use_running_average: if True, normalize with the stored statistics; if
        False, with the batch's (and update the stored ones).
      axis: the feature axis or axes; every other axis is reduced.
      momentum: decay of the running averages (``new = m * old + (1 - m) *
        batch``); None gives the cumulative average over all batches.
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias (beta).
      use_scale: multiply by a learned scale (gamma).
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      axis_name: the named axis (pmap, shard_map, vmap) to combine statistics
        across devices.
      axis_index_groups: groups of devices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored:
        normjax always uses a numerically stable variance.
      force_float32_reductions: accepted for compatibility with Flax and
        ignored: statistics are always computed in at least float32.
      debias: bias-correct the running averages (True, the default) so they
        are usable from the first update; False takes Flax's update (to float
        tolerance: the batch statistics round differently).
      unbiased_running_var: store the unbiased (n - 1) batch variance in the
        running variance, as PyTorch does.
      skip_nonfinite: leave the running statistics and count unchanged when the
        batch statistics are not finite (a NaN the mask hides does not count),
        or when the mask hides a feature entirely (see :func:`normjax.batch_norm`).

    Reference:
      Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network
      Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    debias: bool = True
    unbiased_running_var: bool = False
    skip_nonfinite: bool = True

    @nn.compact
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
          use_running_average: in place of the attribute of the same name;
            exactly one of the two must be set (Flax's ``merge_param``).
          mask: optional array broadcastable to ``x``: the statistics are
            computed over its nonzero (True) entries only, as in Flax.

        Returns:
          The normalized ``x``, of ``x``'s shape.

        Raises:
          ValueError: if ``use_running_average`` is set in neither place or in
            both, if ``x``'s feature shape differs from the one at ``init``,
            or if the core rejects an argument (the message names the module).
        """
        use_running_average = _merge_use_running_average(
            self, self.use_running_average, use_running_average
        )
        x, mask, given = _as_flax_takes_them(x, mask)
        with _errors_name(self):
            feature_axes = _stats.canonicalize_axes(self.axis, x.ndim, "axis")
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        _check_stored_shapes(
            self,
            feature_shape,
            [("batch_stats", "mean"), ("params", "scale"), ("params", "bias")],
            f"axis={self.axis!r}",
        )

        # In the statistics' dtype of the input and parameters: float32 but for
        # a float64 model (x64), whose running averages float32 would round
        # (Flax's turn float64 at their first update).
        stats_dtype = jax.dtypes.canonicalize_dtype(
            _stats.stat_dtype(jnp.promote_types(x.dtype, self.param_dtype))
        )
        initial = nj.batch_norm_state(feature_shape, dtype=stats_dtype)
        # Statistics stored without a count (flax.linen.BatchNorm's) count as
        # long warmed up: each batch then weighs 1 - momentum, as in Flax. A
        # count of 0 would make the next batch's statistics replace them. They
        # get no count when trained either: batch_stats keep Flax's structure,
        # which a lax.scan carry or a restore target must keep.
        countless = self.has_variable("batch_stats", "mean") and not self.has_variable(
            "batch_stats", "count"
        )
        initial_count = jnp.asarray(_COUNTLESS_COUNT, jnp.int32) if countless else initial.count
        mean = self.variable("batch_stats", "mean", lambda: initial.mean)
        var = self.variable("batch_stats", "var", lambda: initial.var)
        count = None
        if not countless:
            count = self.variable("batch_stats", "count", lambda: initial_count)
        scale, bias = _scale_and_bias(
            self,
            feature_shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=self.scale_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
        )
        count_value = initial_count if count is None else count.value
        state = nj.BatchNormState(mean.value, var.value, count_value)
        initializing = self.is_initializing()
        training = not use_running_average
        if initializing and training and math.prod(x.shape) == math.prod(feature_shape):
            # `init` with one value per feature (e.g. a single example before a
            # Dense layer) has no batch variance; the statistics are not updated
            # during init anyway, so normalize with the initial ones instead.
            training = False
        with _errors_name(self):
            y, new_state = self._core(
                x,
                state,
                scale,
                bias,
                training=training,
                mask=mask,
                # As in Flax: the named axis need not exist while initializing.
                axis_name=None if initializing else self.axis_name,
                dtype=_output_dtype(given, scale, bias, self.dtype),
            )
        if training and not initializing:
            mean.value, var.value = new_state.mean, new_state.var
            if count is not None:
                count.value = new_state.count
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
            axis_index_groups=self.axis_index_groups,
            debias=self.debias,
            unbiased_running_var=self.unbiased_running_var,
            skip_nonfinite=self.skip_nonfinite,
        )


class BatchRenorm(BatchNorm):
    """Batch renormalization over normjax's :func:`normjax.batch_renorm`.

    The fields of :class:`BatchNorm` (Flax has no BatchRenorm) plus ``r_max``
    and ``d_max``, the clips on the correction of the batch statistics toward
    the running ones. Evaluation uses the running statistics, as BatchNorm.

    Attributes:
      r_max: the correction ``r = batch_std / running_std`` is clipped to
        ``[1 / r_max, r_max]``.
      d_max: the shift ``d = (batch_mean - running_mean) / running_std`` is
        clipped to ``[-d_max, d_max]``.

    Reference:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017.
    """

    r_max: float = 3.0
    d_max: float = 5.0

    def _core(
        self, x: Array, state: nj.BatchNormState, scale: Array | None, bias: Array | None, **kw: Any
    ) -> tuple[Array, nj.BatchNormState]:
        return nj.batch_renorm(
            x, state, scale, bias, r_max=self.r_max, d_max=self.d_max,
            **self._common_kwargs(), **kw,
        )  # fmt: skip


# ----------------------------------------------------------------------------
# Per-sample normalizations: no running statistics.


class LayerNorm(nn.Module):
    """Layer normalization over normjax's :func:`normjax.layer_norm`.

    A drop-in replacement for ``flax.linen.LayerNorm``.

    Attributes:
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias.
      use_scale: multiply by a learned scale.
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axes that carry a separate scale and bias.
      axis_name: a named axis to combine statistics across devices (features
        sharded across devices).
      axis_index_groups: groups of devices on ``axis_name``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      force_float32_reductions: accepted for compatibility with Flax and ignored.

    Reference:
      Ba, Kiros and Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample of ``x`` over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional array broadcastable to ``x``: statistics over its
            nonzero (True) entries only, as in Flax.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape changed since ``init`` or the
            core rejects an argument (the message names the module).
        """
        x, mask, given = _as_flax_takes_them(x, mask)
        scale, bias = _per_sample_params(self, x, self.feature_axes, "feature_axes")
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
                dtype=_output_dtype(given, scale, bias, self.dtype),
            )


class RMSNorm(nn.Module):
    """Root-mean-square layer normalization over normjax's :func:`normjax.rms_norm`.

    A drop-in replacement for ``flax.linen.RMSNorm``.

    Attributes:
      epsilon: added to the mean square before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the scale).
      param_dtype: the dtype of the scale.
      use_scale: multiply by a learned scale.
      scale_init: initializer for the scale.
      reduction_axes: the axes the mean square is computed over.
      feature_axes: the axes that carry a separate scale.
      axis_name: a named axis to combine statistics across devices.
      axis_index_groups: groups of devices on ``axis_name``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      force_float32_reductions: accepted for compatibility with Flax and ignored.

    Reference:
      Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Divides each sample of ``x`` by its root mean square over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional array broadcastable to ``x``: statistics over its
            nonzero (True) entries only, as in Flax.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape changed since ``init`` or the
            core rejects an argument (the message names the module).
        """
        x, mask, given = _as_flax_takes_them(x, mask)
        scale, _ = _per_sample_params(self, x, self.feature_axes, "feature_axes", use_bias=False)
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
                dtype=_output_dtype(given, scale, None, self.dtype),
            )


class GroupNorm(nn.Module):
    """Group normalization over normjax's :func:`normjax.group_norm` (channels last).

    A drop-in replacement for ``flax.linen.GroupNorm``; give either
    ``num_groups`` or ``group_size`` (then pass ``num_groups=None``).

    Attributes:
      num_groups: the number of channel groups (32, as in the paper).
      group_size: the number of channels per group.
      epsilon: added to the variance before the square root.
      dtype: the output dtype (default: the promotion of ``x`` and the params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias.
      use_scale: multiply by a learned scale.
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      reduction_axes: the axes reduced, which must include the last (channel)
        axis; default: every axis but the first (batch).
      axis_name: also reduce over this named axis (a sample's reduced axes
        split across devices).
      axis_index_groups: groups of devices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      force_float32_reductions: accepted for compatibility with Flax and ignored.

    Reference:
      Wu and He, "Group Normalization", ECCV 2018.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample of ``x`` over groups of channels.

        Args:
          x: the input, channels last.
          mask: optional array broadcastable to ``x``: statistics over its
            nonzero (True) entries only, as in Flax.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s channel count changed since ``init``, or the
            core rejects an argument (e.g. ``num_groups`` not dividing the
            channels); the message names the module.
        """
        x, mask, given = _as_flax_takes_them(x, mask)
        scale, bias = _per_sample_params(self, x, -1, "the last (channel) axis")
        with _errors_name(self):
            return nj.group_norm(
                x,
                scale,
                bias,
                num_groups=self.num_groups,
                group_size=self.group_size,
                reduction_axes=self.reduction_axes,
                epsilon=self.epsilon,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=_output_dtype(given, scale, bias, self.dtype),
            )


class InstanceNorm(nn.Module):
    """Instance normalization over normjax's :func:`normjax.instance_norm`.

    A drop-in replacement for ``flax.linen.InstanceNorm``: each sample (axis
    0) and feature is normalized over every other axis.

    Attributes:
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
      axis_index_groups: groups of devices on ``axis_name``, as ``lax.psum``.
      use_fast_variance: accepted for compatibility with Flax and ignored.
      force_float32_reductions: accepted for compatibility with Flax and ignored.

    Reference:
      Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing
      Ingredient for Fast Stylization", arXiv:1607.08022, 2016.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes each sample and feature of ``x`` over the remaining axes.

        Args:
          x: the input, batch first.
          mask: optional array broadcastable to ``x``: statistics over its
            nonzero (True) entries only, as in Flax.

        Returns:
          The normalized ``x``.

        Raises:
          ValueError: if ``x``'s feature shape changed since ``init`` or the
            core rejects an argument (the message names the module).
        """
        x, mask, given = _as_flax_takes_them(x, mask)
        scale, bias = _per_sample_params(self, x, self.feature_axes, "feature_axes")
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
                dtype=_output_dtype(given, scale, bias, self.dtype),
            )


def _per_sample_params(
    module: LayerNorm | RMSNorm | GroupNorm | InstanceNorm,
    x: Array,
    feature_axes: Axes,
    axes_label: str,
    *,
    use_bias: bool | None = None,
) -> tuple[Array | None, Array | None]:
    """Checks ``x`` against stored params and creates scale and bias of its feature shape."""
    with _errors_name(module):
        axes = _stats.canonicalize_axes(feature_axes, x.ndim, axes_label)
    feature_shape = tuple(x.shape[a] for a in axes)
    _check_stored_shapes(
        module, feature_shape, [("params", "scale"), ("params", "bias")], axes_label
    )
    return _scale_and_bias(
        module,
        feature_shape,
        use_scale=module.use_scale,
        use_bias=module.use_bias if use_bias is None else use_bias,
        scale_init=module.scale_init,
        bias_init=getattr(module, "bias_init", initializers.zeros),
        param_dtype=module.param_dtype,
    )
