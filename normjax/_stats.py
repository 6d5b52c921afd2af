"""The one place where normjax computes means, variances and reciprocal stds.

Every normalization op calls :func:`moments` (or :func:`standardize`, which
adds the analytic derivative) for its statistics and :func:`normalize` to
apply them, so the numerics are fixed once:

* Statistics are accumulated in at least float32, whatever the input dtype.
* One pass, ``E[x^2] - E[x]^2``, only where it cannot cancel badly: where
  every set's mean is within 2 standard deviations of zero (and the sums are
  finite). Its rounding error is then within 13 times the two-pass
  formula's, and it compiles to two plain reductions, as fast as Flax's.
* Everywhere else (data with mean 1e4 and std 1, constant sets, |x| ~ 1e30),
  behind a ``lax.cond``: two passes, the mean of squared deviations from the
  mean, divided by a scale found from the one-pass sum of squares so that no
  square overflows. The mean is
  held as a shift (one sample of the data) plus an offset, so a constant set
  is exactly constant (variance exactly 0) and the normalized output keeps
  the precision of the deviations.
* A branch-free path, as exact, sums the squared deviations both plainly and
  downscaled and keeps whichever is right (see :func:`_branch_free`). The
  CPU takes it for large bfloat16 inputs in short rows (layer norm over the
  last axis, at most 64 entries a row), where a ``lax.cond`` would split what
  XLA compiles as one kernel that reads the bfloat16 input once. Other
  platforms take it wherever there is no mask and no ``axis_name`` (and the
  statistics are float32): XLA on the GPU compiles a ``lax.cond`` into both
  branches and a select, so the guarded path would always pay for its exact
  passes. Which path runs is chosen as the program is lowered
  (``lax.platform_dependent``).
* Across devices the sums and counts are combined with ``psum``, so the
  statistics are exact over the union of all devices' masked entries, not a
  mean of per-device means.
* Channel groups (group norm) are pooled by the core itself, in x's own
  layout.

References:
  Chan, Golub and LeVeque, "Algorithms for computing the sample variance:
  analysis and recommendations", The American Statistician 37(3), 1983.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

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


_FLOATS = "float16, bfloat16, float32 or float64"


def _computable(dtype: Any) -> bool:
    """A floating dtype the statistics can be computed for: 16 bits or more
    (float8's have no implicit promotion to the float32 statistics)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 16


def check_floating(x: Any, name: str = "x") -> Array:
    """Returns ``x`` as an array, or raises TypeError if it is not of a
    floating dtype of 16 bits or more."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a floating-point array ({_FLOATS}), got {x!r}."
        ) from None
    if not _computable(x.dtype):
        raise TypeError(
            f"`{name}` must be a floating-point array ({_FLOATS}), got dtype {x.dtype}."
        )
    return x


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Normalizes ``axes`` to sorted non-negative ints, checking the range; an
    axis given twice (``(-1, 2)`` of a 3-D x) counts once, as in Flax."""
    try:
        axes_seq = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    except TypeError:
        raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.") from None
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
    return tuple(sorted(set(out)))


def static_number(value: Any, name: str, valid: Callable[[float], bool], expected: str) -> float:
    """``value`` as a Python float where ``valid`` holds: a Python or numpy real
    number, or a concrete 0-d array (``jnp.float32(0.9)``, as Flax takes one).
    TypeError naming ``name`` for a traced value; ValueError saying what was
    ``expected`` for anything else (a bool, a string, NaN, out of range)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a static number, got a traced value ({value}): pass it as a "
            f"Python number, not as an argument of a jitted or transformed function."
        )
    number = math.nan
    real = (int, float, np.integer, np.floating, np.ndarray, jax.Array)
    if isinstance(value, real) and not isinstance(value, (bool, np.bool_)) and np.ndim(value) == 0:
        kind = np.asarray(value).dtype
        floating = jnp.issubdtype(kind, jnp.floating)
        if floating or np.issubdtype(kind, np.integer):
            number = float(value)
            if floating and kind.itemsize < 8:
                # The decimal it prints as: jnp.float32(0.9) is the 0.9 it was
                # written as, not 0.89999998 (the state's averages weigh 1 -
                # momentum in float64, see batch_norm's _update_state).
                own = kind if kind in (np.float16, np.float32) else np.float32
                scalar = np.asarray(value).astype(own)[()]
                number = float(np.format_float_positional(scalar, unique=True))
    if not valid(number):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return number


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a float: a finite number no smaller than float32's
    smallest normal number (see :func:`static_number`). A smaller one is 0 in
    the float32 statistics (rounded, or flushed as a subnormal on the CPU),
    where a constant set's 1 / sqrt(var + epsilon) is then inf."""
    tiny = float(jnp.finfo(jnp.float32).tiny)
    return static_number(
        epsilon, "epsilon", lambda v: tiny <= v < math.inf,
        f"a finite number of at least {tiny:.7g} (float32's smallest normal number)",
    )


def checked_shape(value: Any, name: str) -> tuple[int, ...]:
    """``value`` (a non-negative integer, a numpy or concrete jax one too, or a
    sequence of them) as a shape, or TypeError naming ``name``: "16" or
    (2, 4.0) is no shape, though iterating or int() would make one."""

    def size(n: Any) -> int:
        integral = isinstance(n, numbers.Integral) or (
            hasattr(n, "dtype") and jnp.ndim(n) == 0 and jnp.issubdtype(n.dtype, jnp.integer)
        )
        if isinstance(n, bool | np.bool_) or not integral or operator.index(n) < 0:
            raise TypeError(
                f"`{name}` must be a non-negative int or a sequence of them, got {value!r}."
            )
        return operator.index(n)

    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(size(n) for n in value)
    return (size(value),)


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a Python bool (a numpy bool too), or TypeError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a Python bool, got {value!r}.")
    return bool(value)


def check_float_dtype(dtype: Any) -> jnp.dtype | None:
    """``dtype`` (an output's or a state's; None for the default) as a floating
    dtype, or TypeError."""
    if dtype is None:
        return None
    try:
        out = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"`dtype` must be a floating-point dtype ({_FLOATS}), got {dtype!r}."
        ) from None
    if not _computable(out):
        raise TypeError(f"`dtype` must be a floating-point dtype ({_FLOATS}), got {out}.")
    return out


def group_count(channels: int, num_groups: Any, group_size: Any) -> int:
    """The number of channel groups from exactly one of ``num_groups`` and
    ``group_size``, each a positive Python or numpy integer (a count read from a
    config array) dividing ``channels``; ValueError naming the argument otherwise."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Exactly one of `num_groups` and `group_size` must be given (for "
            f"`group_size`, pass `num_groups=None` too), got num_groups={num_groups!r}, "
            f"group_size={group_size!r}."
        )
    name, value = ("num_groups", num_groups) if group_size is None else ("group_size", group_size)
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (whole and value > 0 and channels % value == 0):
        raise ValueError(
            f"`{name}`={value!r} must be a positive int dividing the number of channels "
            f"{channels}."
        )
    return int(value if group_size is None else channels // value)


def checked_param(param: Any, expected: tuple[int, ...], name: str) -> Array | None:
    """``param`` (None, an array or a nested list of real numbers) as a floating
    array of the feature shape ``expected`` (integers as float32, as integer
    inputs are normalized as floats); TypeError or ValueError naming it otherwise."""
    if param is None:
        return None
    try:
        param = jnp.asarray(param)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array of numbers, got {param!r}.") from None
    if not jnp.issubdtype(param.dtype, jnp.number):
        raise TypeError(f"`{name}` must be an array of numbers, got dtype {param.dtype}.")
    if jnp.issubdtype(param.dtype, jnp.complexfloating):
        # Cast to the real output, its imaginary part was dropped with only a warning.
        raise TypeError(f"`{name}` must be real, got dtype {param.dtype}.")
    if not jnp.issubdtype(param.dtype, jnp.floating):
        # An integer scale's tangent is float0: the bfloat16 derivative rule
        # failed on it ("setting an array element with a sequence").
        param = param.astype(jnp.promote_types(param.dtype, jnp.float32))
    if tuple(param.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` must have the feature shape {tuple(expected)}, "
            f"got shape {tuple(param.shape)}."
        )
    return param


def broadcast_mask(mask: Array | None, shape: tuple[int, ...]) -> Array | None:
    """Checks that ``mask`` is boolean and broadcastable to ``shape``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`mask` must be a boolean array, got dtype {mask.dtype}.")
    try:
        # jnp's, not np's: it takes symbolic dimensions (jax.export).
        if jnp.broadcast_shapes(mask.shape, shape) != tuple(shape):
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


def surely(predicate: Callable[[], Any]) -> bool:
    """Whether a comparison of shapes holds for sure: False where it depends on
    a symbolic dimension (``jax.export`` with a polymorphic batch size). Only
    the choice of a faster path rests on such comparisons."""
    try:
        return bool(predicate())
    except jax.errors.InconclusiveDimensionOperation:
        return False


def stat_dtype(dtype: Any) -> jnp.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Explicit sharding.


def _explicitly_sharded_mesh(tree: Any) -> Any:
    """The mesh of ``tree``'s arrays where one of them is sharded over an
    Explicit axis of it; None where none is, or where the mesh has Manual
    axes (inside ``shard_map``, where ``auto_axes`` cannot run).

    Raises:
      ValueError: the arrays lie on meshes of Explicit axes that differ (as
        JAX's own binary operations do; here the first slice of x failed
        before any). Meshes of Auto axes may differ, as they may in JAX.
    """
    meshes, sharded = set(), False
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        sharding = jax.typeof(leaf).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not (mesh.explicit_axes or mesh.manual_axes):
            # No mesh, or only Auto axes: XLA's partitioner places everything.
            continue
        meshes.add(mesh)
        explicit = set(mesh.explicit_axes)
        for entry in sharding.spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            sharded = sharded or bool(explicit.intersection(names))
    layouts = {str(dict(zip(m.axis_names, m.axis_sizes, strict=True))) for m in meshes}
    if len(layouts) > 1:
        raise ValueError(
            "`x`, its parameters, mask and state must lie on one mesh; got arrays on "
            f"meshes of axes {' and '.join(sorted(layouts))}."
        )
    if not sharded or any(m.manual_axes for m in meshes):
        return None
    (mesh,) = meshes
    return mesh


def auto_sharded(fn: Callable, like: Any, *args: Any) -> Any:
    """``fn(*args)``, with the Explicit mesh axes of ``args`` made Auto inside
    and the outputs given the shardings of ``like`` (a pytree of arrays in
    the outputs' structure), where an input is sharded over such an axis.

    On a mesh of Explicit axes (``jax.make_mesh``'s default since jax 0.7),
    every operation's sharding is part of its type, and several the
    statistics need have none there: a one-entry slice of a batch-sharded
    axis (the exact passes' sample), or a select between per-feature
    statistics sharded like x's features and a state that is not. Inside
    ``auto_axes`` XLA's partitioner places them, as it does on an Auto mesh,
    and the outputs keep the inputs' shardings: y that of x, a running
    state its own (replicated, for one on no mesh). Elsewhere, and inside a
    ``shard_map`` (whose per-device arrays need none of this; ``auto_axes``
    broke their gradients), ``fn`` runs as it is.
    """
    mesh = _explicitly_sharded_mesh(args)
    if mesh is None:
        return fn(*args)

    def sharding(a: Array) -> Any:
        own = jax.typeof(a).sharding
        # An array of no mesh (a state from batch_norm_state) stays replicated.
        return own if own.mesh == mesh else jax.sharding.NamedSharding(mesh, P())

    out_sharding = jax.tree.map(sharding, like)
    return jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=out_sharding)(*args)


# ----------------------------------------------------------------------------
# Statistics.


class _Sets(NamedTuple):
    """Which entries of x each statistic pools: ``axes`` (and, with
    ``channel_groups``, one group of the last axis' channels), the entries
    ``mask`` counts, on every device of ``axis_name``."""

    axes: tuple[int, ...]
    channel_groups: int | None
    mask: Array | None
    axis_name: Hashable | None
    axis_index_groups: Any

    def reduce(self, v: Array, reducer: Callable = jnp.sum) -> Array:
        """``reducer`` over each set on this device, broadcastable back to ``v``.

        Grouped sets reduce in two stages: over ``axes`` per channel first,
        then over each group's channels on that small result, which is then
        repeated over the group's channels. Both stages are plain reductions
        that XLA vectorizes, and every full-size operation keeps ``v``'s own
        layout: the single reduction over ``(..., groups, channels)`` that a
        reshape would give compiles to a strided loop several times slower
        (group norm 64x32x32x64, 32 groups: 17 ms against 4.5 ms).
        """
        per_channel = reducer(v, self.axes, keepdims=True) if self.axes else v
        if self.channel_groups is None:
            return per_channel
        per_group = reducer(_split_groups(per_channel, self.channel_groups), -1, keepdims=True)
        return _expand_groups(per_group, per_channel.shape)

    def total(self, v: Array) -> Array:
        """The sum of ``v`` over each set, on all devices."""
        s = self.reduce(v)
        if self.axis_name is None:
            return s
        return lax.psum(s, self.axis_name, axis_index_groups=self.axis_index_groups)

    def size(self, shape: tuple[int, ...]) -> int:
        """The number of entries in each set on this device, mask aside."""
        # math.prod, not int(np.prod): a symbolic dimension (jax.export) stays one.
        size = math.prod(shape[a] for a in self.axes)
        if self.channel_groups is not None:
            size *= shape[-1] // self.channel_groups
        return size

    def devices(self) -> int:
        """How many devices' sums :meth:`total` adds (1 without ``axis_name``)."""
        if self.axis_name is None:
            return 1
        if self.axis_index_groups is not None:
            return len(self.axis_index_groups[0])
        return int(lax.axis_size(self.axis_name))

    def count(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """The number of counted entries in each set of an array of ``shape``, in ``dtype``."""
        if self.mask is not None:
            return self.total(self.mask.astype(dtype))
        n = self._unmasked_count(shape, dtype)
        return jnp.broadcast_to(n, _reduced_shape(shape, self.axes))

    def safe_count(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """``max(count, 1)``, the divisor of the sets' means: a scalar where
        every set counts the same entries (no mask). Broadcast per set, XLA
        on the CPU writes the constant out, and a per-set buffer is as large
        as the statistics (layer norm 65536x64 bfloat16 fwd+bwd: temp 1.5 ->
        1.25 MB)."""
        if self.mask is not None:
            return jnp.maximum(self.count(shape, dtype), 1)
        return jnp.maximum(self._unmasked_count(shape, dtype), 1)

    def _unmasked_count(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """Every set's count without a mask, the same for all: a scalar."""
        n = jnp.asarray(self.size(shape), dtype)
        if self.axis_name is None:
            return n
        return lax.psum(n, self.axis_name, axis_index_groups=self.axis_index_groups)

    def sample(self, x: Array, k: int = 0) -> Array:
        """One entry of each set (no gradient), the same on every device.

        The ``k``-th (modulo its size) along the longest reduced axis, the
        first along the others and the first channel of each channel group;
        across devices, the first device's, so that a batch split across
        devices in order is shifted exactly as on one device (within index
        groups, the largest: one of the samples, all the same).
        """
        if any(surely(lambda a=a: x.shape[a] == 0) for a in self.axes):
            # Empty sets have no entry to take, and any shift serves them.
            return jnp.zeros(_reduced_shape(x.shape, self.axes), x.dtype)
        # Of the axes of known size: a symbolic one (jax.export) has no k-th
        # entry to slice for sure, but always its first.
        known = [a for a in self.axes if isinstance(x.shape[a], int)]
        longest = max(known, key=lambda a: x.shape[a], default=None)
        for a in self.axes:
            i = k % x.shape[a] if a == longest else 0
            x = lax.slice_in_dim(x, i, i + 1, axis=a)
        if self.channel_groups is not None:
            x = _expand_groups(_split_groups(x, self.channel_groups)[..., :1], x.shape)
        x = lax.stop_gradient(x)
        if self.axis_name is None:
            return x
        if self.axis_index_groups is not None:
            return lax.pmax(x, self.axis_name, axis_index_groups=self.axis_index_groups)
        first = lax.axis_index(self.axis_name) == 0
        return lax.psum(jnp.where(first, x, 0), self.axis_name)

    def largest_counted(self, x: Array) -> Array:
        """The largest counted entry of each set (no gradient), on all
        devices; 0 for a set with none."""
        top = self.reduce(jnp.where(self.mask, x, -jnp.inf), jnp.max)
        if self.axis_name is not None:
            top = lax.pmax(top, self.axis_name, axis_index_groups=self.axis_index_groups)
        return lax.stop_gradient(jnp.where(top == -jnp.inf, 0, top))

    def all_agree(self, flag: Array) -> Array:
        """``flag`` and'ed over all devices and all ``vmap`` examples: the one
        predicate of a ``lax.cond`` (see :func:`_and_over_vmap`); every device
        must take the same branch when the branches hold collectives."""
        flag = _and_over_vmap(lax.stop_gradient(flag))
        if self.axis_name is None:
            return flag
        return lax.psum(1 - flag.astype(jnp.int32), self.axis_name) == 0


@jax.custom_batching.custom_vmap
def _and_over_vmap(flag: Array) -> Array:
    """``flag``, and under ``jax.vmap`` one flag for all examples (their and).

    A ``lax.cond`` whose predicate is batched runs both branches and selects;
    with one predicate for the whole batch it stays a conditional, so
    ``vmap(layer_norm)`` runs only the one-pass branch where every example
    allows it (4096x768 rows: 3.1 ms with a batched predicate, 0.6 ms with one).
    Which branch runs never changes the result beyond rounding.
    """
    return flag


@_and_over_vmap.def_vmap
def _and_over_vmap_rule(axis_size: int, in_batched: list, flag: Array) -> tuple[Array, bool]:
    del axis_size
    return (jnp.all(flag) if in_batched[0] else flag), False


def _distinct_shifts(x: Array, axes: tuple[int, ...]) -> bool:
    """Whether each full-size use of ``x`` should subtract its own sample of the set.

    When the sets do not span x's last axis (batch, instance and group norm),
    XLA on the CPU writes ``x - shift`` out in full if several reductions and
    the output share it; with a different sample each, every use is its own
    expression and fuses into its reduction. Rows (layer norm) already compile
    to one fusion.
    """
    return (
        bool(axes)
        and x.ndim - 1 not in axes
        and any(surely(lambda a=a: x.shape[a] >= 3) for a in axes)
    )


def _split_groups(v: Array, channel_groups: int) -> Array:
    """``v`` with its last (channel) axis split into ``(channel_groups, channels per group)``."""
    return v.reshape(v.shape[:-1] + (channel_groups, v.shape[-1] // channel_groups))


def _expand_groups(per_group: Array, shape: tuple[int, ...]) -> Array:
    """Per-group values ``(..., groups, 1)`` repeated over each group's channels: ``shape``."""
    groups = per_group.shape[-2]
    return jnp.broadcast_to(per_group, per_group.shape[:-1] + (shape[-1] // groups,)).reshape(shape)


def _overflow_scale(dtype: Any) -> float:
    """Where a set's sum of squares overflowed, the exact passes divide its
    entries by this power of two (see :func:`_downscale_for_squares`): 2^80 for
    float32, 2^640 for float64 (5/8 of the largest exponent)."""
    return 2.0 ** (jnp.finfo(dtype).maxexp * 5 // 8)


def _downscale_for_squares(sum_squares: Array) -> Array:
    """A factor (1 / scale) that keeps each set's squared deviations, and their
    sum, in float range.

    Where the set's sum of squares is finite, its reciprocal square root, at
    most 1: every ``|x|`` is below the scale, so every ``|x - mean| / scale``
    is at most 2.
    Where it overflowed (then, in float32, the largest ``|x|`` is above 2^52
    for sets of up to 2^24 entries), 1 / :func:`_overflow_scale`: deviations
    below 2^129 give squares below 2^98, whose sum overflows only past 2^30
    entries. A deviation that underflows there (below 2^17) is negligible next
    to such a set's variance, or is a multiple of its large entries' spacing
    (at least 2^29), which does not underflow. (float64 alike: 2^640 against
    deviations up to 2^1025, entries above 2^500.) Found from the sums the
    guard has already taken, the scale costs no pass over x, which the
    largest ``|x|`` did (one kernel less to compile per layer, and one read
    less on data far from zero).

    A factor, and :func:`_unscaled` takes the scale from
    :func:`_scale_for_squares`, an expression of its own: with the deviations
    divided by one shared scale, XLA on the CPU wrote out per set both the
    scale and a broadcast 1 for its reciprocal, which the YNNPACK reduction
    of the squares reads (layer norm 65536x64 float32 fwd+bwd: temp 2.0 ->
    1.75 MB).
    """
    overflowed = 1 / _overflow_scale(sum_squares.dtype)
    return jnp.where(
        jnp.isfinite(sum_squares), jnp.minimum(lax.rsqrt(sum_squares), 1), overflowed
    )


def _scale_for_squares(sum_squares: Array) -> Array:
    """1 / :func:`_downscale_for_squares`, by another expression (``sqrt``, not
    ``rsqrt``), so that XLA computes each inside the kernel that uses it. The
    two's product is 1 within 1.5 units in the last place (2 million sums of
    squares from 1e-30 to 3e38)."""
    overflowed = _overflow_scale(sum_squares.dtype)
    return jnp.where(jnp.isfinite(sum_squares), jnp.maximum(lax.sqrt(sum_squares), 1), overflowed)


def _exact_downscale(inv_std: Array) -> Array:
    """The largest power of two at most ``min(inv_std, 1)`` (1 where ``inv_std``
    is 0 or subnormal): a factor that brings deviations from the mean to the
    size of the normalized values, exactly (it moves only the exponent), and
    never scales up, so that no deviation overflows."""
    info = jnp.finfo(inv_std.dtype)
    bits = lax.bitcast_convert_type(inv_std, jnp.dtype(f"uint{info.bits}"))
    exponent_bits = ((1 << info.nexp) - 1) << info.nmant
    power = lax.bitcast_convert_type(bits & np.array(exponent_bits, bits.dtype), inv_std.dtype)
    return jnp.where(power > 0, jnp.minimum(power, 1), 1).astype(inv_std.dtype)


def _inverse_power_of_two(n: Any, dtype: Any) -> Any:
    """``2^-ceil(log2(n))``, the largest power of two at most ``1 / n`` (n >= 1
    entries): a Python float, or for a symbolic ``n`` (``jax.export`` with a
    polymorphic batch) the same power in ``dtype``, found as the program runs."""
    if isinstance(n, int):
        return 2.0 ** -math.ceil(math.log2(max(n, 1)))
    count = jnp.maximum(jnp.asarray(n, jnp.int32), 1)
    # ceil(log2(count)) from the bits of count - 1: 0 for 1, 1 for 2, 2 for 3 and 4.
    return jnp.ldexp(jnp.ones((), dtype), lax.clz(count - 1) - 32)


def _reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in axes else d for a, d in enumerate(shape))


def _own_conversion(raw: Array, dtype: Any, dep: Any) -> tuple[Array, Any]:
    """``(raw.astype(dtype), dep)`` for one reduction alone.

    XLA merges identical conversions into one, and writes a conversion that
    several kernels read out in full: a float32 copy of a bfloat16 x, read
    back by every sum (bfloat16 forward, same process: batch norm training
    512x4096 1.24 against 0.71 ms this way, Flax 1.11; layer norm 1024x1024
    0.48 against 0.20, Flax 0.33). Through an optimization barrier each
    reduction gets a conversion of its own, fused into its kernel. ``dep``,
    a value the caller uses afterwards, passes the barrier too, so that no
    two barriers are alike and XLA cannot merge them (barriers that differed
    only by a constant were merged again).
    """
    if raw.dtype == dtype:
        return raw, dep
    raw, dep = lax.optimization_barrier((raw, dep))
    return raw.astype(dtype), dep


# One pass (E[x^2] - E[x]^2) is used only where it cannot cancel badly: where
# every set's squared mean is at most this many times its variance. Its
# rounding error is then at most (1 + 3 * _ONE_PASS_RATIO) times the two-pass
# formula's (13 times: a relative error of about 1e-6 of the variance in
# float32), and it reads x in two plain reductions that XLA fuses like Flax's.
_ONE_PASS_RATIO = 4.0


def _centered(raw: Array, sets: _Sets, epsilon: float) -> tuple[Array, Array, Array, Array, Array]:
    """(count, shift, offset, variance, inv_std), mean = shift + offset.

    First the sums of x and x^2 in one pass. Where every set's mean is within
    ``sqrt(_ONE_PASS_RATIO)`` standard deviations of zero and the sums are
    finite, they give the statistics (shift = the mean, offset 0). Otherwise,
    behind a ``lax.cond`` (data far from zero, constant sets, |x| ~ 1e30),
    two passes: the offset of the mean from a shift that is one sample of the
    set, then the squared deviations from the mean. Normalization subtracts
    shift and offset separately, so the mean's precision is not capped by
    rounding it to x's dtype.

    References: Chan, Golub and LeVeque 1983 (the shifted and corrected
    two-pass algorithms; the error bound of the one-pass formula).
    """
    dtype = stat_dtype(raw.dtype)
    n = sets.count(raw.shape, dtype)
    safe_n = sets.safe_count(raw.shape, dtype)

    def counted(v: Array) -> Array:
        return v if sets.mask is None else jnp.where(sets.mask, v, 0)

    # Each sum converts a bfloat16 x itself (the output the plain one).
    x_sum, n_sum = _own_conversion(raw, dtype, safe_n)
    mean = sets.total(counted(x_sum)) / n_sum
    x_sq, mean = _own_conversion(raw, dtype, mean)
    sum_squares = sets.total(lax.square(counted(x_sq)))

    def one_pass_variance() -> Array:
        return sum_squares / safe_n - lax.square(mean)

    var = one_pass_variance()
    one_pass = jnp.all(jnp.isfinite(var) & (lax.square(mean) <= _ONE_PASS_RATIO * var))

    def from_one_pass(_: Any) -> tuple[Array, Array, Array, Array]:
        # offset is exactly 0 and carries the mean's derivative. The variance
        # computed again in the branch: had it taken the predicate's, XLA would
        # keep one more per-set buffer live across the conditional (layer norm
        # 65536x64 float32 fwd+bwd: temp 2.25 -> 2.0 MB).
        branch_var = one_pass_variance()
        shift = lax.stop_gradient(mean)
        return shift, mean - shift, branch_var, _plain_inv_std(branch_var, epsilon)

    def from_two_passes(_: Any) -> tuple[Array, Array, Array, Array]:
        # Converts raw itself: capturing the converted x would make XLA keep a
        # full-size float32 copy of a bfloat16 input for the branch.
        shift, offset, var = _two_passes(raw, dtype, sets, safe_n, sum_squares)
        return shift, offset, *_unscaled(var, sum_squares, epsilon)

    branch = sets.all_agree(one_pass)
    shift, offset, var, inv_std = lax.cond(branch, from_one_pass, from_two_passes, None)
    return n, shift, offset, var, inv_std


def _two_passes(
    raw: Array, dtype: Any, sets: _Sets, safe_n: Array, sum_squares: Array
) -> tuple[Array, Array, Array]:
    """(shift, offset, downscaled variance) of :func:`_centered`, in two passes
    over ``raw`` converted to ``dtype`` (each reduction its own conversion).

    The deviations are always multiplied by :func:`_downscale_for_squares`
    of the sets' one-pass ``sum_squares`` (1 for data of sum of squares at
    most 1), so that no square overflows.
    """
    mask = sets.mask
    inv_n = 1 / safe_n

    def counted(v: Array) -> Array:
        return v if mask is None else jnp.where(mask, v, 0)

    # One entry of each set as the shift: a constant set is then exactly
    # constant (offset 0, variance 0).
    if mask is None:
        shift = sets.sample(raw, 0).astype(dtype)
    else:
        # A hidden entry may hold anything (NaN, 1e30): the largest counted
        # entry. The masked mean (sum of x / n) it replaces was rounded: a
        # masked constant set of 1e4 normalized to 1.16, not 0, at epsilon
        # 1e-20, and sets of std about one unit in the last place of their
        # mean lost up to 80 units of 2^-24 in the output (now 3.7).
        x, inv_n = _own_conversion(raw, dtype, inv_n)
        shift = sets.largest_counted(x)
    # The deviations from it summed as x p - shift p, p a power of two at
    # most 1 / (2 n), n the entries of all devices: that is (x - shift) p
    # exactly, and neither it nor the sum can overflow, where x - shift can
    # (entries of opposite signs near float32's largest). (p sized for one
    # device's entries, 4 devices' sums of deviations of 1e38 overflowed.)
    p = _inverse_power_of_two(sets.size(raw.shape) * sets.devices(), dtype) * 0.5
    x, shift = _own_conversion(raw, dtype, shift)
    offset = sets.total(counted(x * p - shift * p)) * (inv_n / p)
    # The squares and the output subtract the mean (in dtype, then what is
    # left of it), not the sample: x minus the mean cannot overflow. And an
    # expression of its own, where the sample shift was shared with the
    # first sum (see _distinct_shifts).
    mean = lax.stop_gradient(shift + offset)
    shift, offset = mean, (shift - mean) + offset

    def mean_square(x: Array, downscale: Array) -> Array:
        e = counted(((x - shift) - offset) * downscale)
        return sets.total(lax.square(e)) / safe_n

    downscale = _downscale_for_squares(sum_squares)
    x, downscale = _own_conversion(raw, dtype, downscale)
    return shift, offset, mean_square(x, downscale)


def _mean_square(raw: Array, sets: _Sets, epsilon: float) -> tuple[Array, Array, Array]:
    """(count, mean square, 1 / sqrt(mean square + epsilon)).

    The squares downscaled (:func:`_downscale_for_squares`) only where some set's
    plain squares overflowed, behind a ``lax.cond``: ordinary data pays one
    comparison on the (small) statistics for it.
    """
    dtype = stat_dtype(raw.dtype)
    n = sets.count(raw.shape, dtype)
    safe_n = sets.safe_count(raw.shape, dtype)

    def mean_square(x: Array, downscale: Array) -> Array:
        xm = x if sets.mask is None else jnp.where(sets.mask, x, 0)
        return sets.total(lax.square(xm * downscale)) / safe_n

    x_sq, _ = _own_conversion(raw, dtype, safe_n)
    plain = mean_square(x_sq, jnp.ones((), dtype))

    def rescaled(_: Any) -> tuple[Array, Array]:
        # Converts raw itself, as in _centered.
        xs, _ = _own_conversion(raw, dtype, plain)
        sum_squares = plain * safe_n
        downscale = _downscale_for_squares(sum_squares)
        return _unscaled(mean_square(xs, downscale), sum_squares, epsilon)

    finite = sets.all_agree(~jnp.any(jnp.isinf(plain)))
    plain_stats = lambda _: (plain, _plain_inv_std(plain, epsilon))  # noqa: E731
    ms, inv_std = lax.cond(finite, plain_stats, rescaled, None)
    return n, ms, inv_std


# The branch-free statistics sum the squares twice: plainly (exact until a
# square or the sum overflows) and multiplied by _DOWNSCALE^2 (exact for
# deviations above 2^13, no overflow below 2^24 entries of float32's largest
# value). Each sum is right wherever the other can be wrong.
_DOWNSCALE_EXPONENT = -76
_DOWNSCALE = 2.0**_DOWNSCALE_EXPONENT

# On the CPU the branch-free path takes inputs of more entries than this, in
# rows of at most _BRANCH_FREE_ROWS_UP_TO.
_BRANCH_FREE_ABOVE = 2**21
_BRANCH_FREE_ROWS_UP_TO = 64


def _branch_free_allowed(raw: Array, sets: _Sets) -> bool:
    """Whether :func:`_branch_free` can compute the statistics of ``raw`` at all:
    float32 statistics (its downscaling is sized for float32's range), no mask
    and no cross-device sum, and no empty set."""
    return (
        stat_dtype(raw.dtype) == jnp.float32
        and sets.mask is None
        and sets.axis_name is None
        and surely(lambda: sets.size(raw.shape) > 0)
    )


def _branch_free_on_cpu(raw: Array, sets: _Sets, center: bool) -> bool:
    """Whether :func:`_branch_free` is the faster path on the CPU.

    For large bfloat16 inputs in short rows, centered (layer norm over the
    last axis). XLA on the CPU compiles such a normalization, statistics and
    output, into one kernel that converts the bfloat16 input as it reads it,
    but only if no ``lax.cond``, no select and no statistic leaves the kernel.
    The guarded path reads x once for each sum and once for the output (each
    with a conversion of its own, see :func:`_centered`), and in rows of up to
    64 entries, each a small reduction, that measured slower: layer norm
    forward 65536x64, 2.3-2.6x Flax guarded against 1.9-2.0x branch-free. In
    longer rows the one kernel's work per entry, which an exact kernel needs
    more of than Flax's, costs more than the extra reads: 4096x768 1.0x
    guarded against 2.0x, 512x8192 0.3x against 1.8x, 32768x128 1.6x against
    1.9x; RMS norm 65536x64 1.2-1.6x against 1.5x. In float32, for sets off
    the last axis, for float16 and on small inputs the guarded path is the
    faster.
    """
    return (
        center
        and surely(lambda: raw.size > _BRANCH_FREE_ABOVE)
        and surely(lambda: sets.size(raw.shape) <= _BRANCH_FREE_ROWS_UP_TO)
        and raw.dtype == jnp.bfloat16
        and raw.ndim - 1 in sets.axes
        and sets.channel_groups is None
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _branch_free(raw: Array, sets: _Sets, epsilon: float, center: bool) -> Moments:
    """:class:`Moments` without a branch or a select, as exact as the guarded
    path (centered, or with ``center=False`` the mean square).

    The shift is the mean from a first pass, rounded to x's precision (for
    float32 x, a sample of the set plus the mean deviation from it): for a
    constant set that is its value, so that the set is exactly constant;
    otherwise it is within about half a unit in x's last place of the mean.
    The second pass sums the deviations from the shift (the offset, Chan,
    Golub and LeVeque's correction) and their squares, so nothing cancels.
    The first pass sums x scaled by about 1 / n, so that it cannot overflow;
    the second sums the deviations scaled likewise.

    The squares are summed twice, plainly (the sum clipped at float32's
    largest) and downscaled (see _DOWNSCALE), and each sum gives a
    reciprocal std; the smaller is the right one, since a clipped sum or an
    underflowed downscaled one only ever falls short.
    """
    x = raw.astype(stat_dtype(raw.dtype))
    n = sets.count(x.shape, x.dtype)
    if center:
        size = sets.size(x.shape)
        scale = _inverse_power_of_two(size, x.dtype)
        if not isinstance(size, int):
            size = jnp.asarray(size, x.dtype)
        if raw.dtype == x.dtype:
            # float32 x (off the CPU): a sample of the set plus the mean of the
            # deviations from it. The deviations are differences of x and the
            # sample times a power of two (exact, and no overflow), so a
            # constant set's are exactly 0 and its shift exactly its value;
            # each is divided by n before the sum, not the sum after it: XLA
            # fuses a per-set product into each kernel that reads it, and LLVM
            # contracts x - sum * c into one multiply-add with the unrounded
            # product, so the offset's kernel subtracted a shift half a unit of
            # the mean's last place away from the one the statistics carry
            # (batch norm gradients at mean 1e4, 48 rows: 5.7e-5 of their size,
            # not 2.6e-7). (x / n - sample / n, inexact products, it contracted
            # too: a constant set of 140 had a variance of 3e-22.)
            sample = sets.sample(x, 0)
            deviations = (x * scale - sample * scale) * (1 / (size * scale))
            shift = lax.stop_gradient(sample + sets.total(deviations))
        else:
            # x scaled by a power of two near 1 / n (it costs the forward
            # 10-20%), and the mean rounded to x's dtype by a conversion, not
            # lax.reduce_precision (2.4x slower) nor replaced by a slice of x
            # (2x): XLA on the CPU keeps the statistics and the output in one
            # kernel only this way. The conversion also rounds the mean before
            # any kernel subtracts it.
            mean = sets.total(x * scale) * (1 / (size * scale))
            shift = lax.stop_gradient(mean.astype(raw.dtype).astype(x.dtype))
        d = x - shift
        # The deviations summed scaled as x was: a plain sum of deviations near
        # float32's largest can overflow.
        offset = sets.total(d * (scale / 2)) * (2 / (size * scale))
    else:
        d = x
        offset = jnp.zeros((), x.dtype)
    # The plain sum clipped at float32's largest: where it overflowed, it then
    # falls short too, and the downscaled sum (exact there) gives the smaller
    # reciprocal std. Clipping the sum, not each square, costs no operation
    # per entry (CPU, 4096x768 forward: 1.40 against 1.81 ms capped; Flax 0.66).
    plain_sum = jnp.minimum(sets.total(lax.square(d)), jnp.finfo(x.dtype).max)
    plain = jnp.maximum(plain_sum / n - lax.square(offset), 0)
    # The corrected downscaled mean square as (a - b)(a + b), not a^2 - b^2: XLA
    # rewrites (offset * _DOWNSCALE)^2 as offset^2 * 2^-152, which is
    # offset^2 * 0 in float32. ldexp would be exact too, but its selects
    # split the bfloat16 rows' kernel (4096x768 forward: 3.7 ms against 1.4).
    # Less the smallest normal number: where the downscaled squares are
    # subnormal (deviations below 2^13; the GPU keeps subnormals, the CPU
    # flushes them) each is rounded to within 2^-150, which alone could make
    # the downscaled estimate the larger and wrong (a variance of 3868 read
    # 3872). 2^-126 is 2^26 in the variance, where the plain sum is exact.
    root = lax.sqrt(sets.total(lax.square(d * _DOWNSCALE)) / n)
    scaled_offset = jnp.abs(offset) * _DOWNSCALE
    tiny = jnp.finfo(x.dtype).tiny
    downscaled = jnp.maximum((root - scaled_offset) * (root + scaled_offset) - tiny, 0)
    inv_std = jnp.minimum(
        lax.rsqrt(plain + epsilon),
        lax.rsqrt(downscaled + epsilon * _DOWNSCALE**2) * _DOWNSCALE,
    )
    # downscaled * 2^152 by its exponent: XLA folds any product of constants
    # into one factor, and 2^152 is beyond float32.
    var = jnp.maximum(plain, jnp.ldexp(downscaled, -2 * _DOWNSCALE_EXPONENT))
    if not center:
        # Shaped (and, on a mesh, sharded) as the other statistics, as the
        # guarded path's are: lax.platform_dependent needs both paths' types equal.
        shift = offset = jnp.zeros_like(var)
    return Moments(shift, offset, var, inv_std, n)


@_branch_free.defjvp
def _branch_free_jvp(
    sets: _Sets, epsilon: float, center: bool, primals: tuple, tangents: tuple
) -> tuple[Moments, Moments]:
    """The statistics' closed-form derivative (d mean = mean(dx), d var =
    2 mean((x - mean) dx), d inv_std = -inv_std^3 d var / 2). Autodiff through
    the two sums of squares and their ``min``/``max`` would give NaN: the
    unused sum's reciprocal square root has an infinite slope where it
    underflowed (as batch_renorm's gradient was before it took
    :func:`standardize`'s)."""
    (raw,), (draw,) = primals, tangents
    stats = _branch_free(raw, sets, epsilon, center)
    x, dx = raw.astype(stats.var.dtype), draw.astype(stats.var.dtype)
    deviation = (x - stats.shift) - stats.offset if center else x
    d_offset = sets.total(dx) / stats.count if center else jnp.zeros_like(stats.offset)
    d_var = 2 * sets.total(deviation * dx) / stats.count
    d_inv_std = -0.5 * stats.inv_std**3 * d_var
    zero = jnp.zeros_like(stats.count)
    return stats, Moments(jnp.zeros_like(stats.shift), d_offset, d_var, d_inv_std, zero)


def _plain_inv_std(var: Array, epsilon: float) -> Array:
    """``1 / sqrt(var + epsilon)`` of the one-pass branches, whose ``var >= 0``."""
    return lax.rsqrt(var + max(epsilon, float(jnp.finfo(var.dtype).tiny)))


def _unscaled(var: Array, sum_squares: Array, epsilon: float) -> tuple[Array, Array]:
    """(variance, inv_std) from the exact passes' variance, which is times
    ``_downscale_for_squares(sum_squares)^2``.

    Each branch of the guard computes its own inv_std, the one-pass branches
    with no select: XLA on the CPU evaluates a select on the statistics
    outside the ``lax.cond`` for every entry of the output kernel. That
    kernel alone, 4096x768 float32: 0.43-0.46 ms with the select, 0.34-0.38
    without (three runs); batch norm training's forward went from 1.06-1.70x
    Flax to 0.76-1.48x over 8 cases in three processes.
    """
    # The scale and the passes' downscale are reciprocal within 1.5 units in
    # the last place: at most 3 more in the variance and 1.5 in inv_std.
    scale = _scale_for_squares(sum_squares)
    # rsqrt(var + eps) = rsqrt(var_s + eps / scale^2) / scale, with the term
    # floored at the smallest normal so that a zero variance stays finite.
    tiny = jnp.finfo(var.dtype).tiny
    inv_std = lax.rsqrt(var + jnp.maximum(epsilon / lax.square(scale), tiny)) / scale
    # A constant set of |x| > 1e16 floors that term: its inv_std is that of var 0.
    # (Any other set of such x has a variance far above epsilon.) A NaN variance
    # (a set holding inf or NaN) keeps its NaN: a set holding inf has an infinite
    # offset, and a finite inv_std would normalize it to +-inf, not NaN.
    inv_std = jnp.where(var == 0, lax.rsqrt(jnp.asarray(epsilon, var.dtype)), inv_std)
    # var * scale^2 would overflow where scale^2 does, not only where var does.
    return (var * scale) * scale, inv_std


def _guarded(raw: Array, sets: _Sets, epsilon: float, center: bool) -> Moments:
    """:class:`Moments` from the one-pass sums, with the exact passes behind a
    ``lax.cond`` (see :func:`_centered` and :func:`_mean_square`)."""
    if center:
        n, shift, offset, var, inv_std = _centered(raw, sets, epsilon)
    else:
        n, var, inv_std = _mean_square(raw, sets, epsilon)
        shift = offset = jnp.zeros_like(var)
    return Moments(shift, offset, var, jnp.where(n > 0, inv_std, 0), n)


def _moments_of_sets(
    x: Array, sets: _Sets, epsilon: float, center: bool, branch_free: bool, derivative: bool
) -> Moments:
    """:func:`moments`, choosing the path per platform as it is lowered.

    On the CPU, the branch-free path only where :func:`_branch_free_on_cpu`
    (and never for the derivative, whose statistics leave the kernel anyway:
    guarded, the bfloat16 layer and RMS norm fwd+bwd measured 3-25% faster).
    Elsewhere (the GPU, and the TPU, where nothing was measured), wherever
    it is allowed: XLA on the GPU turns the guard's ``lax.cond`` into both
    branches and a select, so the exact passes always ran. On an H100,
    against Flax (forward, forward+backward): layer norm 4096x768
    1.12x/1.32x guarded, 0.81x/1.14x branch-free; group norm 32x32x32x128
    1.21x/1.04x against 0.95x/0.87x; the layer norm MLP's training step
    1.11x against 0.96x.
    """
    if not (branch_free and _branch_free_allowed(x, sets)):
        return _guarded(x, sets, epsilon, center)
    on_cpu = not derivative and _branch_free_on_cpu(x, sets, center)
    free = functools.partial(_branch_free, sets=sets, epsilon=epsilon, center=center)
    guarded = functools.partial(_guarded, sets=sets, epsilon=epsilon, center=center)
    return lax.platform_dependent(x, cpu=free if on_cpu else guarded, default=free)


def moments(
    x: Array,
    axes: tuple[int, ...],
    *,
    epsilon: float,
    mask: Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    center: bool = True,
    channel_groups: int | None = None,
    branch_free: bool = True,
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
      channel_groups: pool the last (channel) axis, which ``axes`` must not
        contain, in this many contiguous groups (group normalization): each
        set is ``axes`` times one group's channels.
      branch_free: allow the branch-free path where it is the faster (see
        :func:`_moments_of_sets`); the same statistics up to rounding.

    Returns:
      :class:`Moments`, each of x's rank with size-1 reduced axes (with
      ``channel_groups``, the last axis keeps its size, each group's value
      repeated over its channels). A set with no counted entry has
      ``inv_std`` 0, so it normalizes to the bias.

    For values only: differentiate :func:`standardize`, whose closed-form
    derivative stays finite where autodiff through these passes does not
    (the rsqrt of a zero sum of squares in the guard's exact branch).

    Raises:
      ValueError: ``channel_groups`` does not divide the channels, or
        ``axes`` contains the channel axis with ``channel_groups``.
    """
    sets = _checked_sets(x, axes, channel_groups, mask, axis_name, axis_index_groups)
    return _moments_of_sets(x, sets, epsilon, center, branch_free, derivative=False)


def _checked_sets(
    x: Array,
    axes: tuple[int, ...],
    channel_groups: int | None,
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
) -> _Sets:
    """The :class:`_Sets` of ``x``, once ``channel_groups`` is checked against it."""
    if channel_groups is not None and (
        x.ndim - 1 in axes or x.shape[-1] % channel_groups or channel_groups < 1
    ):
        raise ValueError(
            f"`channel_groups`={channel_groups!r} must divide the {x.shape[-1]} channels of "
            f"the last axis, which `axes`={axes!r} must not contain."
        )
    return _Sets(axes, channel_groups, mask, axis_name, axis_index_groups)


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
    if _split_cotangent(dtype, stats.inv_std.dtype):
        return _normalize_op(tuple(feature_axes), jnp.dtype(dtype))(x, stats, scale, bias)
    return _normalized(x, stats, scale, bias, feature_axes, dtype)


def _split_cotangent(dtype: Any, compute_dtype: Any) -> bool:
    """Whether a derivative's output in ``dtype`` from ``compute_dtype`` terms
    is summed by :func:`_tangent_sum` with its terms apart (on the CPU): for
    bfloat16 outputs of float32 terms. Not float16's, whose arithmetic XLA on
    the CPU converts itself: apart, fwd+bwd read 0.87-0.99x, temp unchanged
    (layer, RMS, batch and group norm), and batch norm's one-product term
    (see _standardize_op) took 32 -> 48 MB."""
    return jnp.dtype(dtype) == jnp.bfloat16 and jnp.dtype(compute_dtype) == jnp.float32


def _normalized(
    x: Array,
    stats: Moments,
    scale: Array | None,
    bias: Array | None,
    feature_axes: tuple[int, ...],
    dtype: Any,
) -> Array:
    compute_dtype = stats.inv_std.dtype
    mul = stats.inv_std
    if scale is not None:
        mul = mul * _broadcast_feature(scale, x.ndim, feature_axes).astype(compute_dtype)
    y = ((x.astype(compute_dtype) - stats.shift) - stats.offset) * mul
    if bias is not None:
        y = y + _broadcast_feature(bias, x.ndim, feature_axes).astype(compute_dtype)
    return y.astype(dtype)


@functools.lru_cache(maxsize=64)
def _normalize_op(feature_axes: tuple[int, ...], dtype: jnp.dtype) -> Callable:
    """:func:`normalize` to a bfloat16 output, with its derivative summed by
    :func:`_tangent_sum`: on the CPU, each kernel of the transpose converts the
    cotangent itself (batch norm evaluation's fwd+bwd, the running statistics'
    path, wrote one float32 copy of it for the three it feeds)."""

    @jax.custom_jvp
    def op(x: Array, stats: Moments, scale: Array | None, bias: Array | None) -> Array:
        return _normalized(x, stats, scale, bias, feature_axes, dtype)

    @op.defjvp
    def op_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
        (x, stats, scale, bias), (dx, dstats, dscale, dbias) = primals, tangents
        y = op(x, stats, scale, bias)
        cdt = stats.inv_std.dtype

        def feature(p: Array) -> Array:
            return _broadcast_feature(p, x.ndim, feature_axes).astype(cdt)

        # y = (x - mean) * mul + bias with mul = inv_std * scale:
        # dy = mul * dx + (x - mean) * dmul + (dbias - mul * dmean).
        mul, dmul = stats.inv_std, dstats.inv_std
        if scale is not None:
            mul, dmul = mul * feature(scale), dmul * feature(scale) + mul * feature(dscale)
        const = -(mul * (dstats.shift + dstats.offset))
        if bias is not None:
            const = const + feature(dbias)

        def terms(cpu: bool) -> Callable[[], Array]:
            def summed() -> Array:
                # x converted for this term alone (see _own_conversion).
                xs, shift = _own_conversion(x, cdt, stats.shift)
                deviation = (xs - shift) - stats.offset
                return _tangent_sum(
                    dtype, cpu, mul * dx.astype(cdt),
                    (dmul, lambda m: deviation * m),
                    (const, lambda c: jnp.broadcast_to(c, x.shape)),
                )  # fmt: skip

            return summed

        return y, lax.platform_dependent(cpu=terms(cpu=True), default=terms(cpu=False))

    return op


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
    channel_groups: int | None = None,
) -> tuple[Array, Moments]:
    """:func:`moments` then :func:`normalize`, with the analytic derivative.

    The values are exactly those of ``normalize(x, moments(x, ...), ...)``;
    under differentiation, those of the path :func:`_moments_of_sets` picks
    for the derivative, the same up to rounding.
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
      epsilon, mask, axis_name, axis_index_groups, center, channel_groups: as in
        :func:`moments`.
      dtype: the output dtype.

    Returns:
      ``(y, stats)``: the normalized array and its :class:`Moments`, both
      differentiable.

    Reference: Ioffe and Szegedy 2015, arXiv:1502.03167, section 3 (the
    gradient of the batch-normalizing transform).
    """
    if axis_index_groups is not None:
        axis_index_groups = tuple(tuple(group) for group in axis_index_groups)
    if isinstance(axis_name, list):
        # lax.psum takes a list of axis names; the cache of ops needs it hashable.
        axis_name = tuple(axis_name)
    op = _standardize_op(
        tuple(axes), tuple(feature_axes), float(epsilon), jnp.dtype(dtype), axis_name,
        axis_index_groups, center, channel_groups,
    )  # fmt: skip
    return op(x, scale, bias, mask)


@functools.lru_cache(maxsize=512)
def _standardize_op(
    axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    epsilon: float,
    dtype: jnp.dtype,
    axis_name: Hashable | None,
    axis_index_groups: tuple[tuple[int, ...], ...] | None,
    center: bool,
    channel_groups: int | None,
) -> Callable:
    """:func:`standardize` for one configuration: a jitted function of
    ``(x, scale, bias, mask)``.

    The same function object for every layer of a model with the same
    configuration lets JAX trace it, and the rule for its derivative, once per
    input shape instead of once per layer: the 10-layer MLPs of
    benchmarks/train_step.py trace in 0.15-0.17 s (batch norm) and 0.16-0.17 s
    (layer norm) this way, Flax's in 0.12-0.14 s; layer norm's took 0.33 s
    while only the op, not its derivative rule, was jitted. ``inline=True``
    puts the traced equations into the caller's jaxpr: as a call of its own,
    differentiated and partially evaluated apart from its neighbours, the
    same layer norm MLP's training step ran 14% slower (6.5 ms against 5.7).
    """

    def forward(derivative: bool) -> Callable:
        def standardized(x: Array, scale: Array | None, bias: Array | None, mask: Array | None):
            sets = _checked_sets(x, axes, channel_groups, mask, axis_name, axis_index_groups)
            stats = _moments_of_sets(x, sets, epsilon, center, True, derivative)
            return normalize(x, stats, scale, bias, feature_axes, dtype), stats

        return standardized

    op = jax.custom_jvp(forward(derivative=False))

    def op_jvp(primals: tuple, tangents: tuple) -> tuple:
        x, scale, bias, mask = primals
        dx, dscale, dbias = tangents
        y, stats = forward(derivative=True)(x, scale, bias, mask)
        cdt = stats.inv_std.dtype
        inv = stats.inv_std
        xc = x.astype(cdt)
        xhat = ((xc - stats.shift) - stats.offset) * inv
        if mask is not None:
            # A hidden entry is in no statistic, but its xhat is in the
            # products below, whose transposes sum it times the cotangent: a
            # NaN or inf there, times the 0 a masked loss gives it, was NaN in
            # every gradient of its set (as in Flax). Its own output is as
            # non-finite as it is, so its derivative may take 0 for it. The
            # terms below that would derive xhat from x again take this one
            # under a mask, or select on their x likewise. On xhat the select
            # measured free; on x itself it cost a buffer of x's size and
            # 12-55% (masked layer and RMS norm fwd+bwd, 16x128x512 and
            # 256x128x256).
            xhat = jnp.where(mask | jnp.isfinite(xhat), xhat, 0)
        dxc = dx.astype(cdt)

        sets = _checked_sets(x, axes, channel_groups, mask, axis_name, axis_index_groups)

        # The count through a barrier with inv_std, which comes out of the
        # guard's conditional: XLA then computes the 1 / count it broadcasts
        # per set after the statistics. A constant, it was computed first and
        # held across the exact passes (layer norm 65536x64 float32 fwd+bwd:
        # temp 1.75 -> 1.5 MB, 0.104 -> 0.089 of the input).
        safe_count, _ = lax.optimization_barrier((sets.safe_count(x.shape, cdt), inv))

        def counted_mean(v: Array) -> Array:
            if mask is not None:
                v = jnp.where(mask, v, 0)
            return sets.total(v) / safe_count

        def xhat_of_its_own() -> Array:
            # Exactly xhat, from negated statistics and (for a converted x) a
            # conversion of x of its own: XLA on the CPU shares neither xhat nor
            # the broadcasts of the statistics with another kernel, and computes
            # it inside its consumer instead of writing one float32 xhat out for
            # all of them. (The same without the negations: temp up, not down.)
            if mask is not None:
                return xhat
            x_own, neg_inv = _own_conversion(x, cdt, -inv)
            return ((-x_own) - (-stats.shift) - (-stats.offset)) * neg_inv

        # On the CPU, a float32 buffer the size of x costs more than its reads
        # and writes: XLA allocates the temporary memory for every call, and
        # past 32 MB (glibc's largest mmap threshold) each call maps it afresh
        # and page-faults on all of it (bfloat16 layer norm 65536x64 fwd+bwd,
        # temp 33 MB: 8400 faults a call). Only on large inputs: on small ones
        # the extra expression costs more than the buffer it saves.
        large = surely(lambda: x.size >= 2**20)

        # d xhat = inv_std * (dx - mean(dx) - xhat * mean(xhat * dx)). inv_std,
        # and scale wherever inv_std * scale is smaller than x (batch, instance
        # and group norm: both are constant along some axis of x), multiply the
        # per-set means after the reduction, never dx before it: the transpose
        # then reduces the cotangent g itself (sum(g), sum(g * xhat), the very
        # sums the scale and bias gradients need) instead of a full-size
        # g * scale * inv_std that XLA would write out.
        mul = inv
        feature_size = np.prod([x.shape[a] for a in feature_axes])
        factor_scale = False
        if scale is not None:
            scale_b = _broadcast_feature(scale, x.ndim, feature_axes).astype(cdt)
            factor_scale = surely(
                lambda: math.prod(jnp.broadcast_shapes(inv.shape, scale_b.shape)) < x.size
            )
            if factor_scale:
                mul = inv * scale_b
        rms_with_scale = not center and scale is not None and not factor_scale
        if rms_with_scale and x.dtype == cdt and mask is None:
            # RMS norm: mean(x * (inv_std dx)), so that the transpose reduces x
            # itself; XLA wrote the xhat it shares with the output's gradient out
            # in full (float32 fwd+bwd 512x4096: temp 8 -> 0 MB, 3.5 -> 2.3 ms;
            # 1024x1024: 1.06 -> 0.77 ms). inv_std times dx, not times the
            # mean: the transpose then multiplied x by the cotangent times
            # inv_std^2, which underflows for |x| above ~1e17 (dx off by 10-30%
            # at 1e19-1e30, float32 and large bfloat16); float32 rows of 4096
            # pay 1.15-1.25x for it (still 0.74-0.80x Flax's), the other
            # norms.py shapes 0.9-1.05x. A converted x needs a conversion of
            # its own for it, or XLA writes a float32 copy of x out (bfloat16
            # 4096x768: temp 12 -> 24 MB, 4.0 -> 5.9 ms). Not under a mask, where
            # the masked xhat above is the faster (a select on x here: 16x128x512
            # fwd+bwd 1.19-1.39x, temp 9 -> 12 MB).
            mean_xhat_dx = counted_mean(xc * (inv * dxc))
        elif rms_with_scale and large:
            # bfloat16 RMS norm, large: the same on the CPU, from a conversion of
            # x of its own (with the scale gradient's own xhat, see row_terms).
            # Rows of 4096, same process: temp 24 -> 16 MB, fwd+bwd 3.1 -> 2.4 ms
            # (Flax 2.7); shorter rows unchanged.
            def mean_xhat_dx_on(cpu: bool) -> Callable[[], Array]:
                def mean() -> Array:
                    if not cpu:
                        return counted_mean(xhat * dxc)
                    x_own, inv_own = _own_conversion(x, cdt, inv)
                    if mask is not None:
                        # As for xhat above. Masked 64x128x512 fwd+bwd: 1.13-1.20x
                        # the form without the select (0.74x Flax); the masked
                        # xhat in its place, 1.35-1.39x.
                        x_own = jnp.where(mask | jnp.isfinite(x_own), x_own, 0)
                    return counted_mean(x_own * (inv_own * dxc))

                return mean

            mean_xhat_dx = lax.platform_dependent(
                cpu=mean_xhat_dx_on(cpu=True), default=mean_xhat_dx_on(cpu=False)
            )
        else:
            mean_xhat_dx = counted_mean(xhat * dxc)
        mean_dx = counted_mean(dxc) if center else None
        dscale_b = None if scale is None else _broadcast_feature(dscale, x.ndim, feature_axes)
        dbias_b = None if bias is None else _broadcast_feature(dbias, x.ndim, feature_axes)
        split_cotangent = _split_cotangent(dtype, cdt)

        def full_size(v: Array) -> Array:
            return jnp.broadcast_to(v.astype(cdt), x.shape)

        if scale is None or factor_scale:
            # dy = mul*dx + xhat*(dscale - mul*mean(xhat*dx)) + (dbias - mul*mean(dx)):
            # one full-size product with xhat, so the transpose reduces g*xhat once
            # for both the scale gradient and the input's.
            xhat_coef = -(mul * mean_xhat_dx)
            if dscale_b is not None:
                xhat_coef = xhat_coef + dscale_b.astype(cdt)
            const = -(mul * mean_dx) if center else None
            if dbias_b is not None:
                const = dbias_b.astype(cdt) if const is None else const + dbias_b.astype(cdt)
            reduce_x_minus_sample = (
                mask is None
                and _distinct_shifts(xc, axes)
                # batch and instance norm, not group norm
                and (inv.size == feature_size or channel_groups is None)
            )

            def set_terms(cpu: bool) -> Callable[[], Array]:
                def terms() -> Array:
                    if reduce_x_minus_sample:
                        # xhat * c as (x - s) * (inv * c) - (mean - s) * (inv * c),
                        # with s a sample of the set that nothing else subtracts.
                        # The transpose then reduces g * (x - s), which XLA fuses
                        # into the reduction; g * xhat it wrote out in full. With
                        # the terms apart, as one product, ((x - s) - (mean - s))
                        # * (inv * c): of two, the transpose reduced g twice from
                        # one float32 conversion of a bfloat16 g, written out
                        # (batch norm 65536x64 temp 16 MB -> 2 KB). Not so for
                        # float16, where one product wrote more out (64x32x32x64
                        # temp 32 -> 48 MB), nor float32 (no gain measured).
                        # float32 fwd+bwd: instance norm 32x32x32x128 9.6 -> 8.5
                        # ms, group norm 9.9 -> 11.1 (so not there). A converted x
                        # is converted again for this term alone
                        # (_own_conversion), or XLA writes a float32 copy of x out
                        # for it: bfloat16 fwd+bwd, same process, batch norm
                        # 64x32x32x64 14.8 -> 4.3 ms (Flax 16.8) and 65536x64 15.7
                        # -> 5.4, instance norm 64x32x32x64 17.4 -> 11.1, temp 32
                        # -> 16 MB; group norm 14.6 -> 15.8 (so not there either).
                        sample = sets.sample(xc, 3)
                        mean_from_sample = (stats.shift - sample) + stats.offset
                        xs, sample = _own_conversion(x, cdt, sample)
                        # Batch norm's deviations from s times p, a power of two
                        # near inv_std (exact): over sets of a whole batch, the
                        # transpose's sums of g * (x - s) were NaN once std *
                        # sqrt(set size) * |g| passed float32's range (std 1e36,
                        # 65536 entries), and forward mode's inv * c was subnormal
                        # past std ~1e19 (2.6% off at 1e20). Not for instance
                        # norm's sets, where the multiply cost 1.10-1.11x fwd+bwd
                        # (float32 32x32x32x128, same process; batch norm 0.95-
                        # 1.17x, at 0.15-0.8x Flax).
                        p = _exact_downscale(inv) if inv.size == feature_size else None

                        def downscaled(v: Array) -> Array:
                            return v if p is None else v * p

                        def times_xhat(c: Array) -> Array:
                            coef = (inv if p is None else inv / p) * c
                            deviation = downscaled(xs - sample)
                            mean_deviation = downscaled(mean_from_sample)
                            if cpu and split_cotangent:
                                return (deviation - mean_deviation) * coef
                            return deviation * coef - mean_deviation * coef

                    elif cpu and large and x.dtype != cdt:
                        # Group norm, bfloat16: the full-size term's xhat of its
                        # own (fwd+bwd, same process: 64x32x32x64 16.6 -> 7.3 ms,
                        # temp 32 -> 16 MB; 32x32x32x128 15.1 -> 6.6 ms). Not in
                        # float32, where XLA writes no xhat out (64x32x32x64 8.0
                        # -> 8.0 ms, 32x32x32x128 7.4 -> 8.2), nor on the GPU, for
                        # which nothing was measured.
                        def times_xhat(c: Array) -> Array:
                            return xhat_of_its_own() * c

                    else:

                        def times_xhat(c: Array) -> Array:
                            return xhat * c

                    return _tangent_sum(
                        dtype, cpu and split_cotangent, mul * dxc,
                        (xhat_coef, times_xhat), (const, full_size),
                    )  # fmt: skip

                return terms

            dy = lax.platform_dependent(cpu=set_terms(cpu=True), default=set_terms(cpu=False))
        else:
            # scale varies along the reduced axes (layer norm): factoring it would
            # make mul * mean a full-size product.
            def row_terms(cpu: bool) -> Callable[[], Array]:
                def terms() -> Array:
                    # abs(inv) = inv, but not the same expression as xhat's factor:
                    # XLA on the CPU would share one full-size broadcast of inv
                    # between xhat's kernel and the transpose's, and write it out
                    # (layer norm 4096x768 fwd+bwd: 6.3 -> 5.8 ms; bfloat16
                    # 65536x64: 16.8 -> 13.1 ms).
                    direct = (jnp.abs(mul) if cpu else mul) * dxc
                    short_rows = not surely(lambda: sets.size(x.shape) > 1024)
                    long_rows = cpu and large and not short_rows
                    # bfloat16 rows of more than 1024: the row sum's xhat of its
                    # own too (with the scale gradient's, below), from statistics
                    # of its own. With one xhat for the row sum and the scale
                    # gradient's column sum, XLA on the CPU wrote it out in
                    # float32; with an own xhat for one of them only, the other's
                    # (and the output's) wrote full-size broadcasts of the shared
                    # statistics out instead. fwd+bwd temp: 512x4096 8 -> 0.01
                    # MB, 2048x2048 16 -> 0.06 MB. (float16 16 -> 24 MB: not there.)
                    # Not under a mask, whose xhat must stay the masked one (see
                    # xhat above).
                    own_row_xhat = long_rows and split_cotangent and mask is None

                    def via_xhat(mean_xhat_dx: Array) -> Array:
                        if not own_row_xhat:
                            return xhat * (mul * mean_xhat_dx)
                        own = (inv, stats.shift, stats.offset)
                        x_own, (inv_own, shift_own, offset_own) = _own_conversion(x, cdt, own)
                        return (((x_own - shift_own) - offset_own) * inv_own) * (mul * mean_xhat_dx)

                    # On large inputs, the scale gradient's xhat of its own: XLA on
                    # the CPU then computes it inside the scale gradient's
                    # reduction instead of writing one xhat out for both. fwd+bwd
                    # temp: float32 4096x768 12 -> 0.1 MB, 65536x64 16.8 -> 2.3 MB
                    # (time within noise); bfloat16, same process, 65536x64 33 ->
                    # 18.5 MB and 17.0 -> 7.8 ms (RMS norm 32 -> 17 MB, 9.4 -> 5.7
                    # ms), 4096x768 24 -> 12 MB and 7.8 -> 4.6 ms. Not on small
                    # inputs, where XLA shares g * scale instead and the extra
                    # expression cost the 10-layer MLP's training step (128x256)
                    # 3-6%; nor on layer norm's bfloat16 rows of more than 1024,
                    # which XLA does not fuse into one kernel anyway (512x4096:
                    # temp 24 MB either way, 3.5 -> 3.8 ms), except with the row
                    # sum's own xhat (own_row_xhat).
                    xhat_for_scale = xhat
                    own_scale_xhat = x.dtype == cdt or short_rows or not center or own_row_xhat
                    if cpu and large and own_scale_xhat:
                        xhat_for_scale = xhat_of_its_own()
                    times_scale = lambda d: xhat_for_scale * d.astype(cdt)  # noqa: E731
                    if long_rows:
                        # Rows of more than 1024: each term times the
                        # scale on its own, two of them through a negation, so that
                        # the transpose's two row sums and the input gradient each
                        # multiply g by the scale themselves; XLA on the CPU wrote
                        # one g * scale out for all three. 512x4096, same process:
                        # float32 temp 8 -> 0.02 MB, fwd+bwd 4.0 -> 3.6 ms;
                        # bfloat16 24 -> 16 MB, time unchanged. (Rows of up to
                        # 1024 already compile to one kernel; there it measured
                        # slower.) The third term's scale through a barrier: as
                        # the same broadcast as the first's, XLA wrote it out in
                        # full for the row sum sum(g * scale) (512x4096 float32
                        # fwd+bwd, same process: 0.67-0.75x, 2048x2048 0.78x;
                        # bfloat16 within noise). RMS norm's rows likewise (one
                        # row sum; 512x4096 fwd+bwd, same process: float32 0.78-
                        # 0.83x; bfloat16 0.79-0.81x, temp 8 -> 0.004 MB; float16
                        # 0.82x, temp 32 -> 24 MB).
                        scale_own = lax.optimization_barrier(scale_b)
                        return _tangent_sum(
                            dtype, split_cotangent, direct * scale_b,
                            (mean_xhat_dx, lambda m: via_xhat(m) * (-scale_b)),
                            (mean_dx, lambda m: -((mul * m) * scale_own)),
                            (dscale_b, times_scale), (dbias_b, full_size),
                        )  # fmt: skip
                    dy = direct - via_xhat(mean_xhat_dx)
                    if center:
                        dy = dy - mul * mean_dx
                    return _tangent_sum(
                        dtype, cpu and split_cotangent, dy * scale_b,
                        (dscale_b, times_scale), (dbias_b, full_size),
                    )  # fmt: skip

                return terms

            # The rewrites in row_terms are for XLA on the CPU. On an H100 the
            # plain expressions are the faster, by far (device time, the abs(inv)
            # and own-xhat rewrites, layer norm fwd+bwd:
            # 4096x768 117 -> 43 us, Flax 93; 65536x64 50 -> 35 us, Flax 40;
            # RMS norm 4096x768 37 -> 31 us, Flax 35).
            dy = lax.platform_dependent(cpu=row_terms(cpu=True), default=row_terms(cpu=False))
        # A set with nothing counted has inv_std 0 and no statistics to move.
        safe_inv = jnp.where(inv > 0, inv, 1)
        dstats = Moments(
            shift=jnp.zeros_like(stats.shift),
            offset=mean_dx if center else jnp.zeros_like(stats.offset),
            var=2 * mean_xhat_dx / safe_inv,
            inv_std=-inv * (inv * mean_xhat_dx),
            count=jnp.zeros_like(stats.count),
        )
        return (y, stats), (dy, dstats)

    # Jitted (and inlined) for the same reason as the op: each layer's
    # differentiation calls the rule, which JAX would otherwise trace again
    # every time. The mask's tangent (float0) stays out of it.
    jitted_jvp = jax.jit(op_jvp, inline=True)
    op.defjvp(lambda primals, tangents: jitted_jvp(primals, tangents[:3]))
    return jax.jit(op, inline=True)


def _tangent_sum(
    dtype: Any,
    apart: bool,
    first: Array,
    *terms: tuple[Array | None, Callable[[Array], Array]],
) -> Array:
    """``first + sum(expand(small) for small, expand in terms)`` in ``dtype``,
    a derivative's output; terms whose ``small`` is None are left out.

    With ``apart``, each term is converted to ``dtype`` on its own, and each
    passes an optimization barrier with the next term's ``small``. The
    transpose then converts the cotangent to float32 once for each kernel
    that reads it, instead of once for all: XLA merges identical conversions,
    and writes a conversion that several kernels read out in full (a float32
    copy of a bfloat16 cotangent, twice its size). The barriers carry the
    small values (a gradient of the scale, the bias or a per-set mean) so
    that no two are alike and XLA cannot merge them again (see
    :func:`_own_conversion`); without them (barriers on the sum alone), XLA
    wrote the conversion out again.

    The price is in forward mode: the derivative is then a sum of terms each
    rounded to ``dtype``, within two units of ``dtype``'s resolution of the
    sum of the terms' magnitudes, not of the result's. Where the terms cancel
    (along x itself, where normalization is scale-invariant) their roundings
    remain, as would a rounding of the tangent ``dx``. A ``linear_call`` (the
    float32 sum rounded once, with this transpose) keeps forward mode exact
    but has no batching rule: ``jax.vmap`` of a gradient fails.

    bfloat16 fwd+bwd on the CPU, same process (benchmarks/norms.py's shapes,
    against the single conversion): layer norm 4096x768 0.84x, temp 12 -> 0.1
    MB; batch norm 64x32x32x64 0.74x, 16 -> 0 MB; group norm 0.78-0.89x, 16
    -> 0.1 MB; batch norm evaluation 0.66-0.79x.
    """
    if not apart:
        total = first
        for small, expand in terms:
            if small is not None:
                total = total + expand(small)
        return total.astype(dtype)
    total = first.astype(dtype)
    for small, expand in terms:
        if small is not None:
            total, small = lax.optimization_barrier((total, small))
            total = total + expand(small).astype(dtype)
    return total


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
