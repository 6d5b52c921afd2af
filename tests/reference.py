"""Closed-form numpy float64 references for the normalization tests.

Nothing here imports normjax: every expected value in the tests comes from these
formulas, written from the papers (Ioffe & Szegedy 2015, Ba et al. 2016, Zhang &
Sennrich 2019, Wu & He 2018, Ulyanov et al. 2016, Ioffe 2017) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Axes = int | Sequence[int]


def canonical_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
    """Sorted, non-negative axes."""
    if isinstance(axes, int):
        axes = (axes,)
    return tuple(sorted(a % ndim for a in axes))


def feature_broadcast(param: np.ndarray | None, ndim: int, feature_axes: Axes) -> np.ndarray:
    """Reshape a feature-shaped parameter so that it broadcasts against x.

    The parameter holds x's sizes at `feature_axes` (in increasing axis order);
    every other axis becomes 1.
    """
    if param is None:
        return np.float64(1.0)
    feature_axes = canonical_axes(ndim, feature_axes)
    param = np.asarray(param, np.float64)
    shape = [1] * ndim
    for size, ax in zip(param.shape, feature_axes, strict=True):
        shape[ax] = size
    return param.reshape(shape)


def masked_moments(
    x: np.ndarray, reduce_axes: Axes, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, biased variance and count of x over `reduce_axes`, True mask entries only.

    Values at masked positions never enter the arithmetic (np.where), so NaN or
    huge fill values there cannot leak in. Results keep the reduced axes (size 1).
    """
    x = np.asarray(x, np.float64)
    reduce_axes = canonical_axes(x.ndim, reduce_axes)
    if mask is None:
        mask = np.ones(x.shape, bool)
    mask = np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = mask.sum(axis=reduce_axes, keepdims=True).astype(np.float64)
    mean = np.where(mask, x, 0.0).sum(axis=reduce_axes, keepdims=True) / count
    centred = np.where(mask, x - mean, 0.0)
    var = (centred**2).sum(axis=reduce_axes, keepdims=True) / count
    return mean, var, count


def _reduced_axes(ndim: int, feature_axes: Axes) -> tuple[int, ...]:
    kept = canonical_axes(ndim, feature_axes)
    return tuple(a for a in range(ndim) if a not in kept)


def _squeeze_to_features(stat: np.ndarray, ndim: int, feature_axes: Axes) -> np.ndarray:
    return np.squeeze(stat, axis=_reduced_axes(ndim, feature_axes))


def batch_stats(
    x: np.ndarray, axis: Axes = -1, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch mean, biased variance and count, shaped like x at the feature `axis`."""
    x = np.asarray(x, np.float64)
    mean, var, count = masked_moments(x, _reduced_axes(x.ndim, axis), mask)
    return tuple(_squeeze_to_features(s, x.ndim, axis) for s in (mean, var, count))


def batch_norm_train(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Training-mode batch norm (Ioffe & Szegedy 2015, Alg. 1) with the biased batch variance."""
    x = np.asarray(x, np.float64)
    mean, var, _ = masked_moments(x, _reduced_axes(x.ndim, axis), mask)
    y = (x - mean) / np.sqrt(var + epsilon)
    return y * feature_broadcast(scale, x.ndim, axis) + _bias(bias, x.ndim, axis)


def batch_norm_eval(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
) -> np.ndarray:
    """Inference-mode batch norm with given (running) statistics."""
    x = np.asarray(x, np.float64)
    m = feature_broadcast(mean, x.ndim, axis)
    v = feature_broadcast(var, x.ndim, axis)
    y = (x - m) / np.sqrt(v + epsilon)
    return y * feature_broadcast(scale, x.ndim, axis) + _bias(bias, x.ndim, axis)


def _bias(bias: np.ndarray | None, ndim: int, feature_axes: Axes) -> np.ndarray:
    if bias is None:
        return np.float64(0.0)
    return feature_broadcast(bias, ndim, feature_axes)


def running_average(
    batch_values: Sequence[np.ndarray],
    momentum: float | None,
    *,
    debias: bool,
    initial: float,
) -> np.ndarray:
    """Closed form of the running statistic after len(batch_values) updates.

    momentum=None: the plain mean of all batch values (cumulative average).
    debias=True:   sum_k (1-m) m^(t-k) b_k / (1 - m^t); the initial value drops out.
    debias=False:  m^t * initial + sum_k (1-m) m^(t-k) b_k (Flax/Keras EMA).
    """
    values = [np.asarray(b, np.float64) for b in batch_values]
    t = len(values)
    if momentum is None:
        return np.mean(values, axis=0)
    m = float(momentum)
    weighted = sum((1.0 - m) * m ** (t - k) * b for k, b in enumerate(values, start=1))
    if debias:
        return weighted / (1.0 - m**t)
    return m**t * initial + weighted


def batch_renorm_train(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    r_max: float,
    d_max: float,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Training-mode batch renormalization (Ioffe 2017, Alg. 1).

    sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) (the running sigma the
    evaluation path divides by), r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mu_B - mu) / sigma, -d_max, d_max), y = ((x - mu_B)/sigma_B * r + d) * gamma + beta.
    """
    x = np.asarray(x, np.float64)
    mu_b, var_b, _ = masked_moments(x, _reduced_axes(x.ndim, axis), mask)
    sigma_b = np.sqrt(var_b + epsilon)
    mu = feature_broadcast(running_mean, x.ndim, axis)
    sigma = np.sqrt(feature_broadcast(running_var, x.ndim, axis) + epsilon)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    y = (x - mu_b) / sigma_b * r + d
    return y * feature_broadcast(scale, x.ndim, axis) + _bias(bias, x.ndim, axis)


def layer_norm(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Layer norm (Ba et al. 2016): statistics over `reduction_axes` of each example."""
    x = np.asarray(x, np.float64)
    mean, var, _ = masked_moments(x, reduction_axes, mask)
    y = (x - mean) / np.sqrt(var + epsilon)
    return y * feature_broadcast(scale, x.ndim, feature_axes) + _bias(bias, x.ndim, feature_axes)


def rms_norm(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """RMS norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * gamma, no centring."""
    x = np.asarray(x, np.float64)
    reduction_axes = canonical_axes(x.ndim, reduction_axes)
    if mask is None:
        mask = np.ones(x.shape, bool)
    mask = np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = mask.sum(axis=reduction_axes, keepdims=True)
    mean_sq = np.where(mask, x, 0.0) ** 2
    mean_sq = mean_sq.sum(axis=reduction_axes, keepdims=True) / count
    return x / np.sqrt(mean_sq + epsilon) * feature_broadcast(scale, x.ndim, feature_axes)


def group_norm(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    num_groups: int,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Group norm (Wu & He 2018), channels last.

    The C channels split into `num_groups` contiguous groups; statistics run over the
    group's channels and over `reduction_axes` without the last one (default: every axis
    but the leading batch axis).
    """
    x = np.asarray(x, np.float64)
    channels = x.shape[-1]
    if reduction_axes is None:
        spatial = tuple(range(1, x.ndim - 1))
    else:
        spatial = tuple(a for a in canonical_axes(x.ndim, reduction_axes) if a != x.ndim - 1)
    grouped = x.reshape(x.shape[:-1] + (num_groups, channels // num_groups))
    grouped_mask = None
    if mask is not None:
        grouped_mask = np.broadcast_to(np.asarray(mask, bool), x.shape).reshape(grouped.shape)
    mean, var, _ = masked_moments(grouped, spatial + (grouped.ndim - 1,), grouped_mask)
    y = ((grouped - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    return y * feature_broadcast(scale, x.ndim, -1) + _bias(bias, x.ndim, -1)


def instance_norm(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Instance norm (Ulyanov et al. 2016): per example and feature, over every other axis."""
    x = np.asarray(x, np.float64)
    kept = set(canonical_axes(x.ndim, feature_axes)) | {0}
    reduce_axes = tuple(a for a in range(x.ndim) if a not in kept)
    mean, var, _ = masked_moments(x, reduce_axes, mask)
    y = (x - mean) / np.sqrt(var + epsilon)
    return y * feature_broadcast(scale, x.ndim, feature_axes) + _bias(bias, x.ndim, feature_axes)


def fold_batch_norm(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None,
    bn_bias: np.ndarray | None,
    *,
    epsilon: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of a layer followed by eval-mode batch norm, as one affine layer.

    BN(z) = (z - mean) * a + beta with a = gamma / sqrt(var + eps), z = x*W + b, so the
    folded kernel is W * a (output features on the last axis) and the folded bias is
    (b - mean) * a + beta (Jacob et al. 2018, Sec. 3.2).
    """
    kernel = np.asarray(kernel, np.float64)
    out = kernel.shape[-1]
    gamma = np.ones(out) if scale is None else np.asarray(scale, np.float64)
    beta = np.zeros(out) if bn_bias is None else np.asarray(bn_bias, np.float64)
    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    a = gamma / np.sqrt(np.asarray(var, np.float64) + epsilon)
    return kernel * a, (b - np.asarray(mean, np.float64)) * a + beta


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x @ kernel + bias in float64."""
    y = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


def conv2d_nhwc_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Stride-1 VALID cross-correlation, NHWC input, HWIO kernel, in float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    # windows: (N, H', W', C_in, kh, kw)
    y = np.einsum("nhwcij,ijco->nhwo", windows, kernel)
    return y if bias is None else y + np.asarray(bias, np.float64)


def normalize_grad(
    x: np.ndarray, cotangent: np.ndarray, reduce_axes: Axes, epsilon: float
) -> np.ndarray:
    """d/dx of sum(cotangent * (x - mean) / sqrt(var + eps)), statistics over `reduce_axes`.

    The closed form of the batch-norm backward pass (Ioffe & Szegedy 2015, Sec. 3):
    (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps).
    """
    x = np.asarray(x, np.float64)
    g = np.broadcast_to(np.asarray(cotangent, np.float64), x.shape)
    mean, var, _ = masked_moments(x, reduce_axes, None)
    axes = canonical_axes(x.ndim, reduce_axes)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    x_hat = (x - mean) * inv_std
    g_mean = g.mean(axis=axes, keepdims=True)
    gx_mean = (g * x_hat).mean(axis=axes, keepdims=True)
    return (g - g_mean - x_hat * gx_mean) * inv_std


def normalize_jvp(
    x: np.ndarray, tangent: np.ndarray, reduce_axes: Axes, epsilon: float
) -> np.ndarray:
    """d/dt of (x + t dx - mean) / sqrt(var + eps) at t = 0, statistics over
    `reduce_axes`: (dx - mean(dx) - xhat * mean(xhat * dx)) / sqrt(var + eps),
    the same operator as :func:`normalize_grad` (it is symmetric)."""
    return normalize_grad(x, tangent, reduce_axes, epsilon)


def rms_normalize_grad(
    x: np.ndarray, cotangent: np.ndarray, reduce_axes: Axes, epsilon: float
) -> np.ndarray:
    """d/dx of sum(cotangent * x / sqrt(mean(x^2) + eps)), the mean over `reduce_axes`.

    With r = 1 / sqrt(mean(x^2) + eps) and xhat = x * r, d(xhat_i)/d(x_j) =
    r * delta_ij - xhat_i * xhat_j * r / n, so the gradient is
    (g - xhat * mean(g * xhat)) * r.
    """
    x = np.asarray(x, np.float64)
    g = np.broadcast_to(np.asarray(cotangent, np.float64), x.shape)
    axes = canonical_axes(x.ndim, reduce_axes)
    r = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + epsilon)
    x_hat = x * r
    return (g - x_hat * (g * x_hat).mean(axis=axes, keepdims=True)) * r
