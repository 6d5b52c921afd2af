"""Variance-preserving weight initializers: gains, fans and the named schemes.

Each named initializer is a factory that validates its arguments when it is
built and returns ``init(key, shape, dtype=jnp.float32) -> jax.Array``, the
signature Flax expects of a ``kernel_init``. Sampling is delegated to
:func:`jax.nn.initializers.variance_scaling` and
:func:`jax.nn.initializers.orthogonal`; this module adds what they lack:
PyTorch's gain table, a negative slope for leaky ReLU, plain-normal He, Glorot
and LeCun variants (the papers' and PyTorch's default), orthogonal matrices in
half precision, and errors that name the offending argument instead of a
``ZeroDivisionError`` or a silent fallback.

Fans follow PyTorch's rule, ``fan_in = in_channels * receptive_field`` and
``fan_out = out_channels * receptive_field``, where the receptive field is the
product of every axis that is neither an input, an output nor a batch axis.
The defaults (``in_axis=-2, out_axis=-1``) fit Flax's layouts: Dense
``(in, out)`` and Conv ``(*spatial, in, out)``; PyTorch's ``(out, in, *spatial)``
takes ``in_axis=1, out_axis=0``. A transposed convolution's fans here count
its own inputs and outputs (Flax's ``ConvTranspose`` kernel is
``(*spatial, in, out)``); PyTorch reads a ``ConvTranspose`` weight,
``(in, out, *spatial)``, as it would a convolution's and so swaps them: pass
``in_axis=-1, out_axis=-2`` for its numbers.

References:
  Glorot, X. & Bengio, Y. (2010). Understanding the difficulty of training deep
  feedforward neural networks. AISTATS.
  He, K., Zhang, X., Ren, S. & Sun, J. (2015). Delving deep into rectifiers:
  surpassing human-level performance on ImageNet classification. ICCV.
  LeCun, Y., Bottou, L., Orr, G. B. & Mueller, K.-R. (1998). Efficient BackProp.
  In Neural Networks: Tricks of the Trade, Springer.
  Saxe, A. M., McClelland, J. L. & Ganguli, S. (2014). Exact solutions to the
  nonlinear dynamics of learning in deep linear neural networks. ICLR.
  Klambauer, G., Unterthiner, T., Mayr, A. & Hochreiter, S. (2017).
  Self-normalizing neural networks. NeurIPS. (The SELU gain of 3/4 is
  PyTorch's choice, see ``torch.nn.init.calculate_gain``.)
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

__all__ = [
    "Initializer",
    "calculate_gain",
    "compute_fans",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
]

Mode = Literal["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]
Distribution = Literal["normal", "truncated_normal", "uniform"]
NormalDistribution = Literal["normal", "truncated_normal"]
Axes = int | Sequence[int]

_MODES: tuple[str, ...] = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
_DISTRIBUTIONS: tuple[str, ...] = ("normal", "truncated_normal", "uniform")
_NORMAL_DISTRIBUTIONS: tuple[str, ...] = ("normal", "truncated_normal")

# PyTorch's table (torch.nn.init.calculate_gain); leaky_relu is computed from its slope.
_FIXED_GAINS: dict[str, float] = {
    "linear": 1.0,
    "identity": 1.0,
    "conv1d": 1.0,
    "conv2d": 1.0,
    "conv3d": 1.0,
    "conv_transpose1d": 1.0,
    "conv_transpose2d": 1.0,
    "conv_transpose3d": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "selu": 3.0 / 4.0,
}
_NONLINEARITIES: tuple[str, ...] = (*_FIXED_GAINS, "leaky_relu")
_DEFAULT_LEAKY_RELU_SLOPE = 0.01


class Initializer(Protocol):
    """A weight initializer: ``init(key, shape, dtype) -> jax.Array``."""

    def __call__(
        self, key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array: ...


def _as_real(value: object) -> float | None:
    """Returns ``value`` as a float if it is a real number or a 0-d real array, else None."""
    # bool is an int subclass, but a flag passed as a slope or gain is a bug.
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) == () and dtype is not None:
        if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer):
            # A tracer raises jax's concretization error here: these must be static.
            return float(value)  # type: ignore[arg-type]
    return None


def _check_nonnegative(name: str, value: object) -> float:
    """Returns ``value`` as a float after checking it is a finite number >= 0."""
    result = _as_real(value)
    if result is None:
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value)}.")
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return result


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    return value


def _check_dtype(dtype: DTypeLike | None) -> jnp.dtype:
    if dtype is None:
        # As in jax: the default float dtype, float64 only when x64 is enabled.
        return jnp.dtype(jnp.result_type(float))
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}.") from error
    if not jnp.issubdtype(canonical, jnp.floating):
        raise ValueError(
            "dtype must be a floating-point dtype (e.g. jnp.float32, jnp.bfloat16), "
            f"got {canonical.name}."
        )
    return canonical


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype weights of ``dtype`` are sampled in before the cast: float32
    for narrower floats (float16, bfloat16, the float8's, which promote to
    nothing), float64 for float64."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _checked_axes(name: str, axes: object) -> int | tuple[int, ...]:
    """``axes`` as a Python int or a tuple of them: jax's samplers take only
    those (``np.int64(1)`` was a TypeError from inside jax at the first call)."""
    if isinstance(axes, bool | np.bool_):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {axes!r}.")
    if isinstance(axes, numbers.Integral):
        return operator.index(axes)
    if isinstance(axes, Sequence) and not isinstance(axes, str):
        if all(
            isinstance(axis, numbers.Integral) and not isinstance(axis, bool | np.bool_)
            for axis in axes
        ):
            return tuple(operator.index(axis) for axis in axes)
    raise TypeError(f"{name} must be an int or a sequence of ints, got {axes!r}.")


def _normalize_axes(name: str, axes: Axes, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Returns ``axes`` as a tuple of non-negative axis numbers of ``shape``."""
    axes = _checked_axes(name, axes)
    axis_list = [axes] if isinstance(axes, int) else list(axes)
    ndim = len(shape)
    normalized = []
    for axis in axis_list:
        index = operator.index(axis)
        if not -ndim <= index < ndim:
            raise ValueError(
                f"{name}={axes!r} is out of range for a {ndim}-dimensional shape {shape}; "
                f"axes must lie in [{-ndim}, {ndim - 1}]."
            )
        normalized.append(index % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name}={axes!r} names the same axis twice (shape {shape}).")
    return tuple(normalized)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(dim) for dim in shape)
    except TypeError as error:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}.") from error
    if any(dim < 0 for dim in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {shape!r}.")
    return dims


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Returns the recommended gain for a nonlinearity, as in PyTorch.

    The gain multiplies the standard deviation of an initializer so that the
    variance of activations stays steady through layers with that
    nonlinearity: 1 for linear layers and sigmoid, 5/3 for tanh, sqrt(2) for
    ReLU, sqrt(2 / (1 + a^2)) for leaky ReLU with negative slope ``a``, and 3/4
    for SELU.

    Args:
      nonlinearity: one of ``"linear"``, ``"identity"``, ``"conv1d"``,
        ``"conv2d"``, ``"conv3d"``, ``"conv_transpose1d"``,
        ``"conv_transpose2d"``, ``"conv_transpose3d"``, ``"sigmoid"``,
        ``"tanh"``, ``"relu"``, ``"leaky_relu"``, ``"selu"``.
      param: the negative slope of leaky ReLU; ``None`` means 0.01, as in
        PyTorch. Ignored by the other nonlinearities, but it must still be a
        number or ``None``.

    Returns:
      The gain, a Python float.

    Raises:
      ValueError: if ``nonlinearity`` is unknown, or ``param`` is not a finite
        real number. A bool is rejected whatever the nonlinearity (a flag
        passed as a slope is a bug); PyTorch rejects one for leaky ReLU only.

    References:
      ``torch.nn.init.calculate_gain``; He et al. (2015), Delving deep into
      rectifiers, for the ReLU family; Klambauer et al. (2017) for SELU.
    """
    slope = _DEFAULT_LEAKY_RELU_SLOPE if param is None else _as_real(param)
    if slope is None or not math.isfinite(slope):
        raise ValueError(f"param (negative slope) must be a finite real number, got {param!r}.")
    if nonlinearity == "leaky_relu":
        # sqrt(2 / (1 + a^2)), without squaring a: 1e200**2 overflows a float.
        return math.sqrt(2.0) / math.hypot(1.0, slope)
    if isinstance(nonlinearity, str) and nonlinearity in _FIXED_GAINS:
        return _FIXED_GAINS[nonlinearity]
    raise ValueError(
        f"nonlinearity must be one of {list(_NONLINEARITIES)}, got {nonlinearity!r}."
    )


def compute_fans(
    shape: Sequence[int],
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
) -> tuple[int, int]:
    """Returns ``(fan_in, fan_out)`` of a dense or convolution kernel.

    Every axis that is in none of ``in_axis``, ``out_axis`` and ``batch_axis``
    belongs to the receptive field: ``fan_in = in_size * receptive_field``,
    ``fan_out = out_size * receptive_field``. Batch axes (e.g. the heads of a
    stacked kernel) are ignored.

    Args:
      shape: the kernel shape, e.g. ``(in, out)`` or ``(kh, kw, in, out)`` in
        Flax, ``(out, in, kh, kw)`` in PyTorch.
      in_axis: the input axis or axes (their sizes multiply). Default -2, as in
        Flax; use 1 for PyTorch layouts.
      out_axis: the output axis or axes. Default -1, as in Flax; use 0 for
        PyTorch layouts.
      batch_axis: axis or axes to leave out of both fans.

    Returns:
      ``(fan_in, fan_out)`` as Python ints.

    Raises:
      ValueError: if the shape has fewer than 2 dimensions while ``in_axis``
        and ``out_axis`` keep their defaults, if an axis is out of range, named
        twice or in two of the axis groups, or if a fan is zero.
      TypeError: if ``shape`` or an axis argument is not made of ints.

    References:
      Glorot & Bengio (2010); He et al. (2015); PyTorch's
      ``torch.nn.init._calculate_fan_in_and_fan_out``.
    """
    dims = _check_shape(shape)
    if len(dims) < 2 and in_axis == -2 and out_axis == -1:
        raise ValueError(
            f"compute_fans needs a shape with at least 2 dimensions when in_axis and "
            f"out_axis keep their defaults (-2, -1); got shape {dims}. Pass in_axis and "
            "out_axis to say which axes are inputs and outputs."
        )
    groups = {
        "in_axis": _normalize_axes("in_axis", in_axis, dims),
        "out_axis": _normalize_axes("out_axis", out_axis, dims),
        "batch_axis": _normalize_axes("batch_axis", batch_axis, dims),
    }
    names = list(groups)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = set(groups[first]) & set(groups[second])
            if shared:
                raise ValueError(
                    f"{first}={groups[first]} and {second}={groups[second]} share axes "
                    f"{sorted(shared)} of shape {dims}; each axis may belong to one group."
                )
    grouped = set().union(*groups.values())
    in_size = math.prod(dims[axis] for axis in groups["in_axis"])
    out_size = math.prod(dims[axis] for axis in groups["out_axis"])
    receptive_field = math.prod(dim for axis, dim in enumerate(dims) if axis not in grouped)
    fan_in, fan_out = in_size * receptive_field, out_size * receptive_field
    if fan_in == 0 or fan_out == 0:
        raise ValueError(
            f"shape {dims} has a zero-size fan (fan_in={fan_in}, fan_out={fan_out} with "
            f"in_axis={in_axis!r}, out_axis={out_axis!r}, batch_axis={batch_axis!r}); "
            "variance scaling needs every input, output and receptive-field axis non-empty."
        )
    return fan_in, fan_out


def variance_scaling(
    scale: float,
    mode: Mode,
    distribution: Distribution,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
) -> Initializer:
    """Builds an initializer with variance ``scale / n``, ``n`` chosen by ``mode``.

    ``n`` is ``fan_in``, ``fan_out``, their arithmetic mean (``"fan_avg"``) or
    their geometric mean ``sqrt(fan_in * fan_out)`` (``"fan_geo_avg"``).
    ``"normal"`` draws from N(0, scale/n); ``"truncated_normal"`` draws from a
    normal truncated at two standard deviations and rescaled (divided by
    0.87962566103423978, the standard deviation of a standard normal truncated
    to (-2, 2)) so that its standard deviation is exactly ``sqrt(scale / n)``;
    ``"uniform"`` draws from U(-b, b) with ``b = sqrt(3 * scale / n)``.
    Samples are drawn in float32 (float64 for float64) and rounded to
    ``dtype``, so half-precision weights keep the distribution's shape.

    Args:
      scale: the variance multiplier (the square of a gain), >= 0.
      mode: ``"fan_in"``, ``"fan_out"``, ``"fan_avg"`` or ``"fan_geo_avg"``.
      distribution: ``"normal"``, ``"truncated_normal"`` or ``"uniform"``.
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights; ``init`` may override it.
        ``None`` means jax's default float (float64 only under x64).

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array`` of that shape and dtype.

    Raises:
      ValueError: (when built) for an unknown ``mode`` or ``distribution``, a
        negative or non-finite ``scale``, or a non-floating ``dtype``; (when
        called) for the shape errors of :func:`compute_fans` or a non-floating
        ``dtype``.
      TypeError: (when built) if ``scale`` is not a number or an axis argument
        is not made of ints.

    References:
      Glorot & Bengio (2010); He et al. (2015); LeCun et al. (1998).
    """
    scale = _check_nonnegative("scale", scale)
    mode = _check_choice("mode", mode, _MODES)
    distribution = _check_choice("distribution", distribution, _DISTRIBUTIONS)
    in_axis = _checked_axes("in_axis", in_axis)
    out_axis = _checked_axes("out_axis", out_axis)
    batch_axis = _checked_axes("batch_axis", batch_axis)
    _check_dtype(dtype)
    sampler = jax.nn.initializers.variance_scaling(
        scale, mode, distribution, in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = dtype) -> jax.Array:
        dims = _check_shape(shape)
        dtype = _check_dtype(dtype)
        compute_fans(dims, in_axis, out_axis, batch_axis)
        if math.prod(dims) == 0:
            # Only an empty batch axis gets here; jax would divide by its size.
            return jnp.zeros(dims, dtype)
        # jax draws half-precision samples directly, from only 2**7 (bfloat16) or 2**10
        # (float16) distinct values with no tail beyond ~2.9 std; draw in float32 and round.
        return sampler(key, dims, _compute_dtype(dtype)).astype(dtype)

    return init


def xavier_uniform(
    gain: float = 1.0,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
) -> Initializer:
    """Builds the Glorot/Xavier uniform initializer: U(-b, b), b = gain*sqrt(6/(fan_in+fan_out)).

    Args:
      gain: multiplier of the bound, e.g. ``calculate_gain("tanh")``; >= 0.
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for a negative ``gain``, a non-floating ``dtype`` or a bad
        shape (see :func:`compute_fans`).

    References:
      Glorot & Bengio (2010), Understanding the difficulty of training deep
      feedforward neural networks, eq. 16.
    """
    gain = _check_nonnegative("gain", gain)
    return variance_scaling(gain**2, "fan_avg", "uniform", in_axis, out_axis, batch_axis, dtype)


def xavier_normal(
    gain: float = 1.0,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
    distribution: NormalDistribution = "normal",
) -> Initializer:
    """Builds the Glorot/Xavier normal initializer: std = gain*sqrt(2/(fan_in+fan_out)).

    Unlike :func:`jax.nn.initializers.glorot_normal`, the default draws from a
    plain normal, as the paper and PyTorch do.

    Args:
      gain: multiplier of the standard deviation; >= 0.
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.
      distribution: ``"normal"`` or ``"truncated_normal"`` (at two standard
        deviations, rescaled to the same standard deviation).

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for a negative ``gain``, an unknown ``distribution``, a
        non-floating ``dtype`` or a bad shape.

    References:
      Glorot & Bengio (2010), Understanding the difficulty of training deep
      feedforward neural networks.
    """
    gain = _check_nonnegative("gain", gain)
    distribution = _check_choice("distribution", distribution, _NORMAL_DISTRIBUTIONS)
    return variance_scaling(gain**2, "fan_avg", distribution, in_axis, out_axis, batch_axis, dtype)


def _he_gain(nonlinearity: str, negative_slope: float) -> float:
    _check_choice("nonlinearity", nonlinearity, _NONLINEARITIES)
    slope = _as_real(negative_slope)
    if slope is None or not math.isfinite(slope):
        raise ValueError(f"negative_slope must be a finite real number, got {negative_slope!r}.")
    if nonlinearity != "leaky_relu" and slope != 0:
        # PyTorch silently ignores the slope here; a slope with relu is almost surely a mistake.
        raise ValueError(
            f"negative_slope={negative_slope!r} only applies to nonlinearity='leaky_relu', "
            f"got nonlinearity={nonlinearity!r}."
        )
    return calculate_gain(nonlinearity, slope)


def he_uniform(
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    mode: Mode = "fan_in",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
) -> Initializer:
    """Builds the He/Kaiming uniform initializer: U(-b, b), b = gain*sqrt(3/fan).

    ``gain = calculate_gain(nonlinearity, negative_slope)``, so
    ``nonlinearity="leaky_relu"`` with the default slope 0.0 gives sqrt(2), as
    ``torch.nn.init.kaiming_uniform_`` does with ``a=0``.

    Args:
      nonlinearity: the activation after this layer, see :func:`calculate_gain`.
      negative_slope: the slope of leaky ReLU; must be 0 for other
        nonlinearities.
      mode: which fan normalizes the variance: ``"fan_in"`` (keeps forward
        activations steady), ``"fan_out"`` (keeps backward gradients steady),
        ``"fan_avg"`` or ``"fan_geo_avg"``.
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for an unknown ``nonlinearity`` or ``mode``, a non-finite
        ``negative_slope`` or one given with a nonlinearity other than leaky
        ReLU, a non-floating ``dtype`` or a bad shape.

    References:
      He et al. (2015), Delving deep into rectifiers: surpassing human-level
      performance on ImageNet classification, section 2.2.
    """
    gain = _he_gain(nonlinearity, negative_slope)
    return variance_scaling(gain**2, mode, "uniform", in_axis, out_axis, batch_axis, dtype)


def he_normal(
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    mode: Mode = "fan_in",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
    distribution: NormalDistribution = "normal",
) -> Initializer:
    """Builds the He/Kaiming normal initializer: std = gain/sqrt(fan).

    Unlike :func:`jax.nn.initializers.he_normal`, the default draws from a
    plain normal, as the paper and PyTorch do.

    Args:
      nonlinearity: the activation after this layer, see :func:`calculate_gain`.
      negative_slope: the slope of leaky ReLU; must be 0 for other
        nonlinearities.
      mode: ``"fan_in"``, ``"fan_out"``, ``"fan_avg"`` or ``"fan_geo_avg"``.
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.
      distribution: ``"normal"`` or ``"truncated_normal"``.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for an unknown ``nonlinearity``, ``mode`` or
        ``distribution``, a bad ``negative_slope``, a non-floating ``dtype`` or
        a bad shape.

    References:
      He et al. (2015), Delving deep into rectifiers: surpassing human-level
      performance on ImageNet classification, eq. 10.
    """
    gain = _he_gain(nonlinearity, negative_slope)
    distribution = _check_choice("distribution", distribution, _NORMAL_DISTRIBUTIONS)
    return variance_scaling(gain**2, mode, distribution, in_axis, out_axis, batch_axis, dtype)


def lecun_uniform(
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
) -> Initializer:
    """Builds the LeCun uniform initializer: U(-b, b), b = sqrt(3/fan_in).

    Args:
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for a non-floating ``dtype`` or a bad shape.

    References:
      LeCun et al. (1998), Efficient BackProp, section 4.6.
    """
    return variance_scaling(1.0, "fan_in", "uniform", in_axis, out_axis, batch_axis, dtype)


def lecun_normal(
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: DTypeLike | None = jnp.float32,
    distribution: NormalDistribution = "normal",
) -> Initializer:
    """Builds the LeCun normal initializer: std = 1/sqrt(fan_in).

    Unlike :func:`jax.nn.initializers.lecun_normal`, the default draws from a
    plain normal.

    Args:
      in_axis: input axis or axes of the kernel, see :func:`compute_fans`.
      out_axis: output axis or axes of the kernel.
      batch_axis: axis or axes left out of the fans.
      dtype: default floating dtype of the weights.
      distribution: ``"normal"`` or ``"truncated_normal"``.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``.

    Raises:
      ValueError: for an unknown ``distribution``, a non-floating ``dtype`` or
        a bad shape.

    References:
      LeCun et al. (1998), Efficient BackProp, section 4.6; Klambauer et al.
      (2017) use it with SELU.
    """
    distribution = _check_choice("distribution", distribution, _NORMAL_DISTRIBUTIONS)
    return variance_scaling(1.0, "fan_in", distribution, in_axis, out_axis, batch_axis, dtype)


def orthogonal(
    gain: float = 1.0, column_axis: int = -1, dtype: DTypeLike | None = jnp.float32
) -> Initializer:
    """Builds an initializer of (scaled) random orthogonal matrices.

    The kernel is viewed as a matrix whose columns run along ``column_axis``
    and whose rows are all other axes flattened. The matrix has orthonormal
    columns when it is tall (or square) and orthonormal rows when it is wide,
    times ``gain``. It comes from the QR decomposition of a Gaussian matrix
    with the signs of R's diagonal moved into Q, which makes it uniformly
    (Haar) distributed. QR runs in float32 (float64 for float64) and the
    result is cast to ``dtype``, so half precision works too.

    Args:
      gain: multiplier of the orthogonal matrix; >= 0.
      column_axis: the axis holding the columns (-1 in Flax layouts; 0 for
        PyTorch's ``(out, in, ...)`` matches ``torch.nn.init.orthogonal_``).
      dtype: default floating dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype) -> jax.Array``. A shape with a zero
      dimension gives an empty array.

    Raises:
      ValueError: for a negative ``gain``, a non-floating ``dtype``, a shape
        with fewer than 2 dimensions or a ``column_axis`` out of range.
      TypeError: if ``gain`` is not a number or ``column_axis`` is not an int.

    References:
      Saxe, McClelland & Ganguli (2014), Exact solutions to the nonlinear
      dynamics of learning in deep linear neural networks; Mezzadri (2007) for
      the sign fix.
    """
    gain = _check_nonnegative("gain", gain)
    if not isinstance(column_axis, numbers.Integral) or isinstance(column_axis, bool | np.bool_):
        raise TypeError(f"column_axis must be an int, got {column_axis!r}.")
    _check_dtype(dtype)
    sampler = jax.nn.initializers.orthogonal(scale=gain, column_axis=int(column_axis))

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = dtype) -> jax.Array:
        dims = _check_shape(shape)
        dtype = _check_dtype(dtype)
        if len(dims) < 2:
            raise ValueError(
                f"orthogonal needs a shape with at least 2 dimensions, got shape {dims}."
            )
        _normalize_axes("column_axis", column_axis, dims)
        # jnp.linalg.qr has no float16/bfloat16 kernel; decompose in float32 and cast back.
        return sampler(key, dims, _compute_dtype(dtype)).astype(dtype)

    return init


glorot_uniform = xavier_uniform
glorot_normal = xavier_normal
kaiming_uniform = he_uniform
kaiming_normal = he_normal
