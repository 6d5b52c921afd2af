"""Folding an evaluation-mode batch norm into the layer before it.

At inference batch norm is an affine map per output feature, so it can be
merged into the preceding Dense or Conv kernel and bias: the network then
costs exactly what it would without batch norm.

Reference:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018, section 3.2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax import _stats
from normjax.batch_norm import BatchNormState

Array = jax.Array

__all__ = ["fold_batch_norm"]


def fold_batch_norm(
    kernel: Array,
    bias: Array | None,
    state: BatchNormState,
    scale: Array | None,
    bn_bias: Array | None,
    *,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Returns ``(kernel, bias)`` of a layer equal to ``batch_norm(layer(x))`` in evaluation.

    With ``m = scale / sqrt(var + epsilon)``: ``kernel' = kernel * m`` along
    the output axis and ``bias' = (bias - mean) * m + bn_bias``.

    Args:
      kernel: a Dense ``(in, out)`` or Conv ``(..., in, out)`` kernel, output
        features on the last axis (Flax's layout).
      bias: the layer's bias ``(out,)``, or None for a layer without one.
      state: the batch norm's running statistics, of shape ``(out,)``.
      scale: the batch norm's gamma ``(out,)``, or None.
      bn_bias: the batch norm's beta ``(out,)``, or None.
      epsilon: the batch norm's epsilon.

    Returns:
      The folded kernel (kernel's dtype) and bias (always present).

    Raises:
      TypeError: a non-floating kernel; a state that is not a BatchNormState.
      ValueError: shapes that do not match the kernel's output features;
        epsilon not finite or below float32's smallest normal number.

    Reference: Jacob et al., CVPR 2018, arXiv:1712.05877, section 3.2.
    """
    kernel = _stats.check_floating(kernel, "kernel")
    if kernel.ndim < 2:
        raise ValueError(f"`kernel` must have at least 2 dimensions, got shape {kernel.shape}.")
    epsilon = _stats.check_epsilon(epsilon)
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"`state` must be a BatchNormState, got {type(state).__name__}; for Flax "
            f"batch_stats write BatchNormState(stats['mean'], stats['var'], count=0) (the "
            f"count is not used here)."
        )
    out = (kernel.shape[-1],)
    features = jnp.shape(state.mean)
    if len(features) == 1 and features != out:
        # Most likely a PyTorch weight, (out, in, ...): name the kernel, not the state.
        raise ValueError(
            f"`kernel` must hold the output features on its last axis (Flax's layout, "
            f"(..., in, out)), {features[0]} for this batch norm (state.mean {features}); "
            f"got kernel shape {kernel.shape}. Move a PyTorch (out, in, ...) weight's "
            f"axes first (jnp.moveaxis(weight, (0, 1), (-1, -2)))."
        )
    bias, mean, var, scale, bn_bias = (
        _stats.checked_param(value, out, name) for name, value in (
            ("bias", bias), ("state.mean", state.mean), ("state.var", state.var),
            ("scale", scale), ("bn_bias", bn_bias),
        )
    )  # fmt: skip
    dtype = _stats.stat_dtype(kernel.dtype)
    multiplier = _stats.inverse_std(var.astype(dtype), epsilon)
    if scale is not None:
        multiplier = multiplier * scale.astype(dtype)
    layer_bias = jnp.zeros(out, dtype) if bias is None else bias.astype(dtype)
    new_bias = (layer_bias - mean.astype(dtype)) * multiplier
    if bn_bias is not None:
        new_bias = new_bias + bn_bias.astype(dtype)
    # Explicitly along the output axis: an implicit rank promotion fails where
    # jax_numpy_rank_promotion is "raise".
    per_output = multiplier.reshape((1,) * (kernel.ndim - 1) + out)
    new_kernel = (kernel.astype(dtype) * per_output).astype(kernel.dtype)
    return new_kernel, new_bias.astype(kernel.dtype if bias is None else bias.dtype)
