"""Batch normalization and batch renormalization over an explicit running state.

Both functions are pure: the running statistics live in a
:class:`BatchNormState` that goes in and comes back out, in training and in
evaluation alike, so a single step function serves both.

References:
  Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network Training
  by Reducing Internal Covariate Shift", ICML 2015. arXiv:1502.03167.
  Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
  Batch-Normalized Models", NeurIPS 2017. arXiv:1702.03275.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from normjax import _stats
from normjax._stats import Axes, Moments

Array = jax.Array

__all__ = ["BatchNormState", "batch_norm", "batch_norm_state", "batch_renorm"]


class BatchNormState(NamedTuple):
    """Running statistics of a batch-normalized layer.

    Attributes:
      mean: running mean, of the feature shape.
      var: running (biased, unless ``unbiased_running_var``) variance.
      count: int32 scalar, the number of training updates taken so far (a
        floating one, as ``lax.pmean`` leaves it, is taken and kept too).
    """

    mean: Array
    var: Array
    count: Array


# So that an exported training step (jax.export) serializes: its state is a pytree node.
jax.export.register_namedtuple_serialization(
    BatchNormState, serialized_name="normjax.BatchNormState"
)


def batch_norm_state(
    feature_shape: int | tuple[int, ...], dtype: Any = jnp.float32
) -> BatchNormState:
    """The initial state: mean 0, variance 1, count 0.

    Args:
      feature_shape: the shape of the normalized features (an int for one axis).
      dtype: dtype of the running mean and variance.

    Returns:
      A :class:`BatchNormState`.

    Raises:
      TypeError: ``feature_shape`` is not a non-negative int or a sequence of
        them; ``dtype`` is not floating.
    """
    shape = _stats.checked_shape(feature_shape, "feature_shape")
    dtype = _stats.check_float_dtype(dtype)
    return BatchNormState(
        jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32)
    )


class _Prepared(NamedTuple):
    x: Array
    state: BatchNormState
    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    mask: Array | None
    epsilon: float
    momentum: float | None
    dtype: Any
    scale: Array | None
    bias: Array | None
    debias: bool
    unbiased_running_var: bool
    skip_nonfinite: bool


def _prepare(
    x: Any,
    state: BatchNormState,
    scale: Array | None,
    bias: Array | None,
    *,
    training: bool,
    axis: Axes,
    momentum: float | None,
    epsilon: float,
    mask: Array | None,
    axis_name: Hashable | None,
    dtype: Any,
    debias: bool,
    unbiased_running_var: bool,
    skip_nonfinite: bool,
) -> _Prepared:
    """Validates every argument at trace time; returns the canonical pieces."""
    x = _stats.check_floating(x)
    training = _stats.check_bool(training, "training")
    debias = _stats.check_bool(debias, "debias")
    unbiased_running_var = _stats.check_bool(unbiased_running_var, "unbiased_running_var")
    skip_nonfinite = _stats.check_bool(skip_nonfinite, "skip_nonfinite")
    feature_axes = _stats.canonicalize_axes(axis, x.ndim, "axis")
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    fshape = _stats.feature_shape(x.shape, feature_axes)
    if momentum is not None and training:
        momentum = _stats.static_number(
            momentum, "momentum", lambda v: 0 <= v < 1, "in [0, 1) or None"
        )
    elif momentum is not None:
        # Evaluation does not use it: a config with momentum 1 (statistics that
        # never move) can still run inference, as in Flax.
        momentum = _stats.static_number(
            momentum, "momentum", lambda v: 0 <= v <= 1, "in [0, 1] or None"
        )
    epsilon = _stats.check_epsilon(epsilon)
    state = _checked_state(state)
    _stats.checked_param(state.mean, fshape, "state.mean")
    _stats.checked_param(state.var, fshape, "state.var")
    scale = _stats.checked_param(scale, fshape, "scale")
    bias = _stats.checked_param(bias, fshape, "bias")
    mask = _stats.broadcast_mask(mask, x.shape)
    per_feature = math.prod(x.shape[a] for a in reduction_axes)
    if training and axis_name is None and _stats.surely(lambda: per_feature <= 1):
        raise ValueError(
            f"batch_norm in training needs more than one value per feature to compute a "
            f"variance, got input shape {x.shape} with feature axes {feature_axes} "
            f"({per_feature} value per feature). Use a larger batch, or layer_norm / "
            f"group_norm, which do not depend on the batch."
        )
    out_dtype = x.dtype if dtype is None else _stats.check_float_dtype(dtype)
    return _Prepared(
        x, state, feature_axes, reduction_axes, fshape, mask, epsilon, momentum, out_dtype,
        scale, bias, debias, unbiased_running_var, skip_nonfinite,
    )  # fmt: skip


def _run(p: _Prepared, body: Any) -> tuple[Array, BatchNormState]:
    """``body(x, state, scale, bias, mask)`` on the prepared arrays, y sharded
    as x and the new state as the state (see :func:`_stats.auto_sharded`)."""
    return _stats.auto_sharded(body, (p.x, p.state), p.x, p.state, p.scale, p.bias, p.mask)


def _checked_state(state: Any) -> BatchNormState:
    """``state`` with floating statistics and a real scalar count (a Python int
    is taken as an int32; a floating one, as ``lax.pmean`` or a cast of the
    whole state leaves it, is kept); TypeError naming the field otherwise."""
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"`state` must be a BatchNormState (see batch_norm_state), got {type(state).__name__}."
        )
    mean = _stats.check_floating(state.mean, "state.mean")
    var = _stats.check_floating(state.var, "state.var")
    count = jnp.asarray(state.count)
    real = jnp.issubdtype(count.dtype, jnp.integer) or jnp.issubdtype(count.dtype, jnp.floating)
    if count.shape != () or not real:
        raise TypeError(
            f"`state.count` must be an integer (or floating) scalar, got {count.dtype} of "
            f"shape {count.shape}."
        )
    if isinstance(state.count, int):
        count = count.astype(jnp.int32)
    return BatchNormState(mean, var, count)


def _update_state(state: BatchNormState, batch: Moments, p: _Prepared) -> BatchNormState:
    """One step of the running averages: ``new = old + w * (batch - old)``,
    in at least float32 (then rounded to the state's dtype), with ``p``'s
    momentum and options."""
    fshape, momentum, debias = p.feature_shape, p.momentum, p.debias
    dtype = jnp.result_type(state.mean)
    wdtype = _stats.stat_dtype(dtype)
    mean = batch.mean.reshape(fshape).astype(wdtype)
    var = batch.var
    if p.unbiased_running_var:
        n = batch.count
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1), var)
    var = var.reshape(fshape).astype(wdtype)

    # A floating count (lax.pmean's float32, a bfloat16 cast of the variables)
    # counts in at least float32: a bfloat16 one stopped at 256 (256 + 1 rounds
    # to 256), and its frozen debiasing weight gave a running mean of 9.9 for
    # an exact 7.2 (momentum 0.999, 1000 steps).
    count_dtype = state.count.dtype
    if jnp.issubdtype(count_dtype, jnp.floating):
        count_dtype = _stats.stat_dtype(count_dtype)
    count = state.count.astype(count_dtype) + 1
    t = count.astype(wdtype)
    if momentum is None:
        w = 1 / t
    elif debias and momentum > 0:
        # Bias-corrected EMA (Kingma & Ba 2015): the state is always the
        # corrected average, so it is usable after a single step. The first
        # weight is exactly 1, which rounding in (1 - m) / (1 - m^1) may miss.
        # 1 - m^t as -expm1(t log m), log m in float64: m itself rounds to 1
        # in bfloat16 from 0.999 (float32 from 1 - 3e-8), and (1 - m) / (1 -
        # m^t) was 0 / 0, a NaN running state.
        log_m = math.log1p(-(1 - momentum))
        w = jnp.where(count == 1, 1, (1 - momentum) / -jnp.expm1(t * log_m))
    else:
        w = jnp.asarray(1 - momentum, wdtype)
    # (1 - w) * old + w * batch, rather than old + w * (batch - old), is exactly
    # the batch when w == 1.
    # A feature the mask hides entirely has no statistics (its batch mean and
    # variance read 0): it keeps its running values.
    seen = jnp.broadcast_to(batch.count > 0, batch.mean.shape).reshape(fshape)

    def averaged(old: Array, new: Array) -> Array:
        return jnp.where(seen, ((1 - w) * old.astype(wdtype) + w * new).astype(dtype), old)

    updated = BatchNormState(averaged(state.mean, mean), averaged(state.var, var), count)
    mean, var = mean.astype(dtype), var.astype(dtype)
    if not p.skip_nonfinite:
        return updated
    # Halved, mean + var is not finite exactly when one of them is not: one
    # reduction. Unhalved, the sum overflows for values the state holds (a
    # float16 state's mean 3e4 and variance 4e4).
    ok = jnp.all(jnp.isfinite(mean * 0.5 + var * 0.5)) & jnp.all(batch.count > 0)
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)


def batch_norm(
    x: Array,
    state: BatchNormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    debias: bool = True,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    dtype: Any = None,
) -> tuple[Array, BatchNormState]:
    """Batch normalization: ``(x - mean) / sqrt(var + epsilon) * scale + bias``.

    In training the mean and biased variance of the batch are used and the
    running state is updated; in evaluation the running state is used and
    returned unchanged.

    Args:
      x: floating input.
      state: the running statistics, from :func:`batch_norm_state`.
      scale: optional gamma, of the feature shape.
      bias: optional beta, of the feature shape.
      training: batch statistics (True) or running statistics (False).
      axis: the feature axis or axes, kept; every other axis is reduced.
        ``axis=1`` for NCHW, ``-1`` (the default) for NHWC.
      momentum: ``new = momentum * old + (1 - momentum) * batch`` (Flax and
        Keras convention; PyTorch's 0.1 is 0.9 here). None keeps the
        cumulative average of all batches seen.
      epsilon: added to the variance.
      mask: optional boolean, broadcastable to ``x``: statistics over the True
        entries only. Every entry is still normalized.
      axis_name: also reduce over this named axis (pmap, shard_map, vmap). The
        statistics are exact over the union of all devices' masked entries.
      axis_index_groups: as in ``lax.psum``.
      debias: divide the moving average by ``1 - momentum^t`` so the state
        holds a usable estimate from the first step. False reproduces Flax:
        an EMA started from mean 0 and variance 1.
      unbiased_running_var: store ``n/(n-1)`` times the batch variance in the
        running variance, as PyTorch does. Normalization always uses the
        biased batch variance.
      skip_nonfinite: keep the running state (and count) as it was when the
        batch statistics are not finite, or when the mask hides a feature
        entirely (the one count is shared by all features). The output still
        shows the NaN. Without it, a hidden feature keeps its running values
        and the others update, and the shared count advances: with
        ``debias``, a feature hidden from the first batches is later
        averaged with its initial mean 0 and variance 1.
      dtype: output dtype; ``x.dtype`` by default.

    Returns:
      ``(y, new_state)``.

    Raises:
      TypeError: ``x`` or ``dtype`` is not floating; ``state`` is not a
        BatchNormState, or holds non-floating statistics or a count that is
        not a real scalar; a traced ``momentum`` or ``epsilon``; a boolean
        option that is not a bool.
      ValueError: ``axis`` out of range; state, scale, bias or mask of the wrong
        shape; momentum outside [0, 1) in training ([0, 1] in evaluation, which
        does not use it); epsilon not finite or below float32's smallest
        normal number; one value per feature in training.

    Reference: Ioffe and Szegedy, ICML 2015, arXiv:1502.03167, Algorithm 1
    (training) and 2 (inference); the debiased average as Kingma and Ba,
    ICLR 2015, arXiv:1412.6980, section 3.
    """
    p = _prepare(
        x, state, scale, bias, training=training, axis=axis, momentum=momentum,
        epsilon=epsilon, mask=mask, axis_name=axis_name, dtype=dtype, debias=debias,
        unbiased_running_var=unbiased_running_var, skip_nonfinite=skip_nonfinite,
    )  # fmt: skip

    def normalized(x: Array, state: BatchNormState, scale: Array | None, bias: Array | None,
                   mask: Array | None) -> tuple[Array, BatchNormState]:  # fmt: skip
        if not training:
            stats = _stats.running_moments(state.mean, state.var, p.epsilon, p.feature_axes, x)
            return _stats.normalize(x, stats, scale, bias, p.feature_axes, p.dtype), state
        y, stats = _stats.standardize(
            x, p.reduction_axes, p.feature_axes, scale, bias, epsilon=p.epsilon, mask=mask,
            axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=p.dtype,
        )  # fmt: skip
        return y, _update_state(state, stats, p)

    return _run(p, normalized)


def batch_renorm(
    x: Array,
    state: BatchNormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    debias: bool = True,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    dtype: Any = None,
) -> tuple[Array, BatchNormState]:
    """Batch renormalization: batch norm corrected toward the running statistics.

    In training, ``y = ((x - mu_B) / sigma_B * r + d) * scale + bias`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, both treated as
    constants by the gradient; ``mu, sigma`` are the running statistics. With
    ``r_max=1, d_max=0`` this is batch norm. Until the state has seen a batch
    (``state.count == 0``) there is nothing to correct toward, and ``r = 1,
    d = 0``. Evaluation and the running update are those of :func:`batch_norm`.

    Args:
      x, state, scale, bias, training, axis, momentum, epsilon, mask, axis_name,
      axis_index_groups, debias, unbiased_running_var, skip_nonfinite, dtype:
        as in :func:`batch_norm`.
      r_max: bound on the std correction, >= 1.
      d_max: bound on the mean correction, >= 0.

    Returns:
      ``(y, new_state)``.

    Raises:
      As :func:`batch_norm`, and ValueError for r_max < 1 or d_max < 0.

    Reference: Ioffe, NeurIPS 2017, arXiv:1702.03275, Algorithm 1.
    """
    # inf: no clipping.
    r_max = _stats.static_number(r_max, "r_max", lambda v: v >= 1, "a number >= 1")
    d_max = _stats.static_number(d_max, "d_max", lambda v: v >= 0, "a number >= 0")
    if not _stats.check_bool(training, "training"):
        return batch_norm(
            x, state, scale, bias, training=False, axis=axis, momentum=momentum,
            epsilon=epsilon, mask=mask, debias=debias, unbiased_running_var=unbiased_running_var,
            skip_nonfinite=skip_nonfinite, dtype=dtype,
        )  # fmt: skip
    p = _prepare(
        x, state, scale, bias, training=training, axis=axis, momentum=momentum,
        epsilon=epsilon, mask=mask, axis_name=axis_name, dtype=dtype, debias=debias,
        unbiased_running_var=unbiased_running_var, skip_nonfinite=skip_nonfinite,
    )  # fmt: skip

    def renormalized(x: Array, state: BatchNormState, scale: Array | None, bias: Array | None,
                     mask: Array | None) -> tuple[Array, BatchNormState]:  # fmt: skip
        sets = {"mask": mask, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
        # r and d need the batch statistics first; the output then comes from
        # standardize with r and d folded into scale and bias, so that it is
        # differentiated by its closed form, as batch_norm is. Through the moments,
        # autodiff gave NaN gradients to an all-zero feature beside a constant one
        # (rsqrt of a zero sum of squares), lost the xhat term at std 1e13, and
        # took 5-10x batch norm's forward+backward time; now the same time (float32
        # and bfloat16 64x32x32x64, forward and forward+backward), the statistics'
        # second computation included.
        batch = _stats.moments(lax.stop_gradient(x), p.reduction_axes, epsilon=p.epsilon, **sets)
        running = _stats.running_moments(state.mean, state.var, p.epsilon, p.feature_axes, x)
        # Correct only where both sides have statistics: a set the mask hides
        # entirely has none (inv_std 0) and normalizes to the bias, as in batch_norm.
        correct = (state.count > 0) & (batch.inv_std > 0)
        safe_inv = jnp.where(correct, batch.inv_std, 1)
        # sigma_B / sigma = inv_std_running / inv_std_batch.
        r = jnp.where(correct, jnp.clip(running.inv_std / safe_inv, 1 / r_max, r_max), 1)
        # mu_B - mu from the batch's shift and offset, not from mu_B rounded to
        # float32: on data far from zero that rounding is large next to sigma.
        shift = ((batch.shift - running.mean) + batch.offset) * running.inv_std
        d = jnp.where(correct, jnp.clip(shift, -d_max, d_max), 0)
        r = jnp.reshape(lax.stop_gradient(r), p.feature_shape)
        d = jnp.reshape(lax.stop_gradient(d), p.feature_shape)
        # ((x - mu_B) * inv_B * r + d) * scale + bias, with d in the bias: moved
        # into the mean instead (x - (mu_B - d / (inv_B * r))), it overflows for x
        # near float32's largest where x - mu_B does not.
        corrected_scale = r if scale is None else r * scale.astype(r.dtype)
        corrected_bias = d if scale is None else d * scale.astype(d.dtype)
        if bias is not None:
            corrected_bias = corrected_bias + bias.astype(d.dtype)
        y, batch = _stats.standardize(
            x, p.reduction_axes, p.feature_axes, corrected_scale, corrected_bias,
            epsilon=p.epsilon, dtype=p.dtype, **sets,
        )  # fmt: skip
        return y, _update_state(state, batch, p)

    return _run(p, renormalized)

