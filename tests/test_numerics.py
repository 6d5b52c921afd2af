"""The issue's numerics cases, for every op: stable variance, 1e30 inputs, constant
channels, low-precision inputs with float32 statistics, output dtypes.

Expected values are numpy float64 closed forms (tests/reference.py) evaluated on the
exact input values the op sees.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

import normjax as nj


class Case(NamedTuple):
    """An op, its reference, an input shape and how to list its normalization sets."""

    op: Callable  # (x, scale, bias, dtype) -> y
    reference: Callable  # (x float64, scale, bias) -> y
    shape: tuple[int, ...]
    features: int
    sets: Callable[[np.ndarray], np.ndarray]  # y -> (num_sets, set_size)


def _bn(x, scale, bias, dtype=None):
    state = nj.batch_norm_state(x.shape[-1])
    return nj.batch_norm(x, state, scale, bias, training=True, dtype=dtype)[0]


def _renorm(x, scale, bias, dtype=None):
    # r_max=1, d_max=0: the batch-statistics path alone, independent of the running state
    state = nj.batch_norm_state(x.shape[-1])
    return nj.batch_renorm(x, state, scale, bias, training=True, r_max=1.0, d_max=0.0,
                           dtype=dtype)[0]


def _group_sets(y):
    b, length, c = y.shape
    return y.reshape(b, length, 2, c // 2).transpose(0, 2, 1, 3).reshape(b * 2, -1)


CASES = {
    "batch_norm": Case(_bn, lambda x, s, b: ref.batch_norm_train(x, s, b), (64, 4), 4,
                       lambda y: y.T),
    "batch_renorm": Case(_renorm, lambda x, s, b: ref.batch_norm_train(x, s, b), (64, 4), 4,
                         lambda y: y.T),
    "layer_norm": Case(lambda x, s, b, dtype=None: nj.layer_norm(x, s, b, dtype=dtype),
                       lambda x, s, b: ref.layer_norm(x, s, b), (4, 64), 64, lambda y: y),
    "group_norm": Case(
        lambda x, s, b, dtype=None: nj.group_norm(x, s, b, num_groups=2, dtype=dtype),
        lambda x, s, b: ref.group_norm(x, s, b, num_groups=2), (2, 16, 8), 8, _group_sets),
    "instance_norm": Case(lambda x, s, b, dtype=None: nj.instance_norm(x, s, b, dtype=dtype),
                          lambda x, s, b: ref.instance_norm(x, s, b), (2, 32, 4), 4,
                          lambda y: y.transpose(0, 2, 1).reshape(-1, y.shape[1])),
    # rms_norm has no centring and no bias; its cases are below
}


def _rms(x, s, b, dtype=None):
    del b
    return nj.rms_norm(x, s, dtype=dtype)


RMS = Case(_rms, lambda x, s, b: ref.rms_norm(x, s), (4, 64), 64, lambda y: y)
ALL_CASES = {**CASES, "rms_norm": RMS}


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def _cpu_compiled(fn, *args):
    """``fn`` compiled for the CPU, whatever the default backend: the structure
    the CPU's choice of path is made for. Skips the rest of the test where the
    ops are lowered as off the CPU (tests/conftest.py, NORMJAX_TEST_PATHS)."""
    if nj._stats.lax is not jax.lax:
        pytest.skip("the CPU's own program: not compiled with the paths lowered as off the CPU")
    args = jax.device_put(args, jax.devices("cpu")[0])
    return jax.jit(fn).lower(*args).compile()


def _cpu_hlo(fn, *args):
    return _cpu_compiled(fn, *args).as_text()


def _affine(case: Case, seed: int = 100):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 2.0, case.features).astype(np.float32),
            rng.normal(size=case.features).astype(np.float32))


# ------------------------------------------------------------------------ stable variance


@pytest.mark.parametrize("name", list(CASES))
def test_stable_variance_on_large_mean(name, record_property):
    case = CASES[name]
    x = (1e4 + _normal(0, case.shape)).astype(np.float32)
    y = np.asarray(case.op(x, None, None), np.float64)
    std = case.sets(y).std(axis=1)
    record_property("max |std - 1|", float(np.abs(std - 1).max()))
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    np.testing.assert_allclose(y, case.reference(x, None, None), atol=1e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_large_mean_keeps_the_precision_of_the_deviations(name):
    # float32 rounds a mean of 1e4 to within 5e-4; subtracting that rounded mean
    # would put errors of ~5e-4 (in units of the std) into every output. The
    # deviations themselves are exact to ~1e-7 of the std, and so must the output be.
    case = CASES[name]
    x = (1e4 + _normal(3, case.shape)).astype(np.float32)
    y = np.asarray(case.op(x, None, None), np.float64)
    np.testing.assert_allclose(y, case.reference(x, None, None), rtol=0, atol=2e-5)


# Sets of sizes that are not powers of two, so that 1 / n is not exact.
_GRADIENT_SETS = {
    "batch_norm": (lambda x: _bn(x, None, None), (48, 10), (0,), 1e-5),
    "layer_norm": (lambda x: nj.layer_norm(x), (16, 100), (1,), 1e-6),
    "instance_norm": (lambda x: nj.instance_norm(x), (2, 7, 7, 32), (1, 2), 1e-6),
}


@pytest.mark.parametrize("paths", ["platform", "off-cpu"])
@pytest.mark.parametrize("name", list(_GRADIENT_SETS))
def test_large_mean_keeps_the_precision_of_the_gradient(name, paths, request):
    # The gradient subtracts the statistics' shift in kernels of its own. Where
    # the branch-free statistics (off the CPU) scaled a sum into the shift, XLA
    # fused that product into each kernel and LLVM contracted x - sum * c into
    # one multiply-add with the unrounded product: the offset belonged to
    # another shift than the one the statistics carry, and float32 batch and
    # instance norm gradients at mean 1e4 erred by 5e-5 to 1.5e-4 of their size.
    if paths == "off-cpu":
        request.getfixturevalue("off_cpu_paths")
    op, shape, axes, epsilon = _GRADIENT_SETS[name]
    x = (1e4 + _normal(6, shape)).astype(np.float32)
    g = _normal(7, shape).astype(np.float32)
    dx = jax.jit(lambda x, g: jax.vjp(op, x)[1](g)[0])(x, g)
    expected = ref.normalize_grad(x, g, axes, epsilon)
    error = np.abs(np.asarray(dx, np.float64) - expected).max() / np.abs(expected).max()
    assert error < 1e-6, error


@pytest.mark.parametrize("paths", ["platform", "off-cpu"])
@pytest.mark.parametrize("shape", [(140, 3), (4, 5, 7, 3), (48, 3)])
def test_constant_sets_of_any_size_have_exactly_zero_variance(shape, paths, request):
    # Off the CPU, a float32 shift from products by an inexact 1 / n was
    # contracted into multiply-adds: a constant set of 140 read a variance of
    # 3e-22 and an offset of one ulp, which the running variance then kept.
    if paths == "off-cpu":
        request.getfixturevalue("off_cpu_paths")
    x = jnp.full(shape, 3.7, jnp.float32)
    axes = tuple(range(len(shape) - 1))
    stats = jax.jit(lambda x: nj._stats.moments(x, axes, epsilon=1e-5))(x)
    assert (np.asarray(stats.var) == 0).all() and (np.asarray(stats.offset) == 0).all()
    y, state = jax.jit(lambda x: nj.batch_norm(x, nj.batch_norm_state(3), training=True))(x)
    assert (np.asarray(y) == 0).all()
    np.testing.assert_array_equal(state.var, 0.0)
    np.testing.assert_array_equal(state.mean, np.float32(3.7))


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "instance_norm"])
@pytest.mark.parametrize("outliers", [(30.0, -50.0, 1e3), (0.0, 0.0, 0.0), (-7.0, 7.0, -7.0)])
def test_outlying_shift_samples_keep_the_precision(name, outliers):
    # Sets off the last axis subtract a different entry of the set in each pass
    # (entries 0, 1 and 2 along the longest reduced axis); outliers there, far
    # from the mean in units of the std, must not cost precision.
    case = CASES[name]
    x = 1e4 + _normal(5, case.shape)
    axis = 0 if name == "batch_norm" else 1
    for k, v in enumerate(outliers):
        np.moveaxis(x, axis, 0)[k] += v
    x = x.astype(np.float32)
    y = np.asarray(case.op(x, None, None), np.float64)
    np.testing.assert_allclose(y, case.reference(x, None, None), rtol=0, atol=2e-5)


@pytest.mark.parametrize("size", [768, 65536])
@pytest.mark.parametrize("mean", [0.0, 1.0, 1.95, 2.05, 10.0, 30.0])
def test_one_pass_only_where_it_cannot_cancel(size, mean):
    # The statistics come from E[x^2] - E[x]^2 only where every set's mean is
    # within 2 standard deviations of zero (error within ~13x the two-pass
    # formula's), else from two passes. Used at a mean of 10 std, the one-pass
    # formula is off by 3e-5 here, at 30 std by 2e-4.
    x = (mean + _normal(7, (4, size))).astype(np.float32)
    xd = x.astype(np.float64)
    expected = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(nj.layer_norm(x), np.float64), expected,
                               rtol=0, atol=5e-6)
    state = nj.batch_norm_state(4)
    y, _ = nj.batch_norm(np.ascontiguousarray(x.T), state, training=True, epsilon=1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected.T, rtol=0, atol=5e-6)


def test_fully_masked_set_gives_bias_and_finite_gradient():
    # A set with no counted entry has no statistics: it normalizes to the bias
    # (as a constant set does), never to x / sqrt(epsilon) or NaN.
    x = jnp.asarray(_normal(4, (3, 5)))
    mask = jnp.asarray([[True] * 5, [False] * 5, [True, False, True, False, True]])
    bias = jnp.arange(5.0)
    y = nj.layer_norm(x, None, bias, mask=mask)
    np.testing.assert_array_equal(np.asarray(y[1]), np.arange(5.0))
    counted = np.asarray(mask[2])
    row = np.asarray(x[2], np.float64)
    mean, var = row[counted].mean(), row[counted].var()
    np.testing.assert_allclose(np.asarray(y[2]), (row - mean) / np.sqrt(var + 1e-6) + np.arange(5),
                               rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(nj.layer_norm(x, None, bias, mask=mask) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad[1]), np.zeros(5))


def test_batch_renorm_fully_masked_feature_gives_bias():
    # A feature with no counted entry has no batch statistics to correct: it
    # normalizes to the bias, as in batch_norm, never to NaN.
    x = _normal(5, (6, 3))
    mask = np.array([[True, True, False]] * 6)
    running_mean, running_var = np.array([0.5, -0.2, 0.1]), np.array([1.5, 0.7, 2.0])
    state = nj.BatchNormState(jnp.asarray(running_mean, jnp.float32),
                              jnp.asarray(running_var, jnp.float32), jnp.asarray(3))
    bias = np.array([1.0, 2.0, 3.0])
    y, _ = nj.batch_renorm(x, state, None, jnp.asarray(bias, jnp.float32), training=True,
                           mask=jnp.asarray(mask))
    y = np.asarray(y, np.float64)
    np.testing.assert_array_equal(y[:, 2], np.full(6, 3.0))
    expected = ref.batch_renorm_train(x[:, :2], running_mean[:2], running_var[:2], None,
                                      bias[:2], r_max=3.0, d_max=5.0)
    np.testing.assert_allclose(y[:, :2], expected, rtol=1e-5, atol=1e-5)


def test_stable_variance_state_of_batch_norm():
    x = (1e4 + _normal(1, (64, 4))).astype(np.float32)
    _, state = nj.batch_norm(x, nj.batch_norm_state(4), training=True)
    mean, var, _ = ref.batch_stats(x)
    np.testing.assert_allclose(np.asarray(state.mean, np.float64), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var, np.float64), var, rtol=1e-3)


def test_rms_norm_on_large_mean():
    x = (1e4 + _normal(2, (4, 64))).astype(np.float32)
    np.testing.assert_allclose(np.asarray(nj.rms_norm(x), np.float64), ref.rms_norm(x),
                               rtol=1e-5)


def test_flax_layer_norm_default_is_off_on_large_mean(record_property):
    """Context for the case above: Flax's default (fast) variance loses it here.

    Only normjax's result is asserted; Flax's std is recorded for the report.
    """
    x = (1e4 + _normal(0, (4, 64))).astype(np.float32)
    module = nn.LayerNorm()
    flax_y = np.asarray(module.apply(module.init(jax.random.key(0), x), x), np.float64)
    flax_std = float(np.abs(flax_y.std(axis=1) - 1).max() + 1)
    ours_std = np.asarray(nj.layer_norm(x), np.float64).std(axis=1)
    record_property("flax LayerNorm std", flax_std)
    print(f"flax.linen.LayerNorm() std on 1e4 + N(0,1): {flax_std:.4g}; "
          f"normjax: {ours_std.max():.6f}")
    np.testing.assert_allclose(ours_std, 1.0, atol=1e-3)


# ---------------------------------------------------------------------- 1e30 magnitudes


@pytest.mark.parametrize("name", list(ALL_CASES))
@pytest.mark.parametrize("loc", [0.0, 3.0])
def test_magnitude_1e30_is_finite_and_normalized(name, loc):
    case = ALL_CASES[name]
    x = (1e30 * (loc + _normal(3, case.shape))).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.isfinite(x).all() and not np.isfinite(x**2).all()  # x*x overflows float32
    scale, bias = _affine(case)
    y = np.asarray(case.op(x, scale, bias), np.float64)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, case.reference(x, scale, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, shape", [(np.float32, (6, 48)), (np.float32, (1024, 1024)),
                                          (jnp.bfloat16, (1024, 1024))])
@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_rms_norm_gradient_with_scale_at_large_magnitudes(dtype, shape, magnitude):
    # The derivative's mean(x * dx) times inv_std: its transpose multiplied x by
    # the cotangent times inv_std^2, which underflows past |x| ~ 1e17, and dx
    # was off by 10-30% of its size. The float64 closed form, as reference.
    x = jnp.asarray(_normal(31, shape) * magnitude, dtype)
    g = jnp.asarray(_normal(32, shape), dtype)
    scale = jnp.asarray(1.0 + 0.5 * _normal(33, (shape[-1],)), jnp.float32)
    dx = jax.jit(lambda x, g: jax.vjp(lambda x: nj.rms_norm(x, scale), x)[1](g)[0])(x, g)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    g64 = np.asarray(g.astype(jnp.float32), np.float64) * np.asarray(scale, np.float64)
    expected = ref.rms_normalize_grad(x64, g64, (-1,), 1e-6)
    error = np.abs(np.asarray(dx.astype(jnp.float32), np.float64) - expected).max()
    assert error <= 2 * float(jnp.finfo(dtype).eps) * np.abs(expected).max(), error


# Batch norm's sets of a whole batch (instance norm's sets of H x W keep the
# plain form, and its limits: benchmarks/README.md).
_WIDE_SETS = {
    "rows": (lambda x: _bn(x, None, None), (4096, 8), (0,), 1e-5),
    "images": (lambda x: _bn(x, None, None), (4, 32, 32, 8), (0, 1, 2), 1e-5),
}


@pytest.mark.parametrize("paths", ["platform", "off-cpu"])
@pytest.mark.parametrize("name", list(_WIDE_SETS))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_batch_norm_derivatives_at_extreme_std(name, mode, paths, request):
    # The derivative's sample term. Reverse mode: its transpose summed g * (x -
    # sample) over each set, 1e6 * 1e32 * sqrt(4096) here, past float32's
    # 3.4e38, and every gradient of the set was NaN (as for a cotangent of 1 at
    # std 1e36 on sets of 65536). Forward mode (std 1e20, tangents of 1): it
    # multiplied deviations of 1e20 by inv_std times a per-set coefficient,
    # 1e-20 * 1e-20, below float32's smallest normal number and flushed: 2.6%
    # off. The float64 closed forms, as reference.
    if paths == "off-cpu":
        request.getfixturevalue("off_cpu_paths")
    op, shape, axes, epsilon = _WIDE_SETS[name]
    std, direction = (1e32, 1e6) if mode == "reverse" else (1e20, 1.0)
    x = (std * _normal(34, shape)).astype(np.float32)
    d = (direction * _normal(35, shape)).astype(np.float32)
    if mode == "reverse":
        derivative = jax.jit(lambda x, g: jax.vjp(op, x)[1](g)[0])(x, d)
        expected = ref.normalize_grad(x, d, axes, epsilon)
    else:
        derivative = jax.jit(lambda x, dx: jax.jvp(op, (x,), (dx,))[1])(x, d)
        expected = ref.normalize_jvp(x, d, axes, epsilon)
    error = np.abs(np.asarray(derivative, np.float64) - expected)
    assert error.max() <= 1e-6 * np.abs(expected).max()


def test_magnitude_1e30_jit():
    x = (1e30 * _normal(4, (4, 64))).astype(np.float32)
    y = np.asarray(jax.jit(nj.layer_norm)(x), np.float64)
    np.testing.assert_allclose(y, ref.layer_norm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_set_holding_inf_or_nan_normalizes_to_nan_and_no_other(name, bad):
    # Its mean and variance are not numbers, so neither is any of its outputs
    # (an infinite offset times a finite inv_std would give +-inf, not NaN);
    # every other set is normalized as without it.
    case = CASES[name]
    x, poisoned = _with_constant_set(case, 0.0)
    x.reshape(-1)[poisoned] = _normal(6, poisoned.size)
    x.reshape(-1)[poisoned[1]] = bad
    y = np.asarray(case.op(x, None, None), np.float64).reshape(-1)
    assert np.isnan(y[poisoned]).all()
    others = np.setdiff1d(np.arange(x.size), poisoned)
    with np.errstate(invalid="ignore"):  # the reference's poisoned set
        expected = case.reference(x, None, None).reshape(-1)
    np.testing.assert_allclose(y[others], expected[others], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, shape, dtype", [
    ("layer_norm", (2048, 512), jnp.float32),  # large: the guard's one-pass sums
    ("layer_norm", (65536, 64), jnp.bfloat16),  # the CPU's branch-free path
    ("batch_norm", (64, 32, 32, 64), jnp.float32),
])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_large_input_holding_inf_or_nan_normalizes_that_set_to_nan(op, shape, dtype, bad):
    x = _normal(7, shape).astype(np.float32)
    x.reshape(-1, shape[-1])[5, 3] = bad
    if op == "layer_norm":
        y = np.asarray(jax.jit(nj.layer_norm)(jnp.asarray(x, dtype)), np.float32)
        poisoned = np.zeros(shape, bool).reshape(-1, shape[-1])
        poisoned[5] = True
    else:
        train = jax.jit(lambda x: nj.batch_norm(x, nj.batch_norm_state(shape[-1]), training=True))
        y = np.asarray(train(jnp.asarray(x, dtype))[0], np.float32)
        poisoned = np.zeros(shape, bool)
        poisoned[..., 3] = True
    poisoned = poisoned.reshape(shape)
    assert np.isnan(y[poisoned]).all()
    assert np.isfinite(y[~poisoned]).all()


# -------------------------------------------------------------------- constant channels


def _with_constant_set(case: Case, value: float, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """An input whose first normalization set is constant, and that set's flat indices."""
    x = _normal(seed, case.shape).astype(np.float32)
    indices = case.sets(np.arange(x.size).reshape(case.shape))[0]
    flat = x.reshape(-1)
    flat[indices] = np.float32(value)
    return flat.reshape(case.shape), indices


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("value, atol", [(3.0, 1e-6), (2.0**100, 1e-6), (0.1, 1e-4)])
def test_constant_set_gives_bias(name, value, atol):
    case = CASES[name]
    x, constant = _with_constant_set(case, value)
    scale, bias = _affine(case)
    y = np.asarray(case.op(x, scale, bias), np.float64)
    assert np.isfinite(y).all()
    expected = np.broadcast_to(ref.feature_broadcast(bias, x.ndim, -1), x.shape).reshape(-1)
    np.testing.assert_allclose(y.reshape(-1)[constant], expected[constant], atol=atol)
    others = np.setdiff1d(np.arange(x.size), constant)
    np.testing.assert_allclose(y.reshape(-1)[others],
                               case.reference(x, scale, bias).reshape(-1)[others],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("width", [12, 768, 1000])
def test_constant_rows_of_any_width_normalize_to_exactly_the_bias(dtype, width):
    # n * (x / n) is not x for most widths: the shift must be an entry of the row.
    values = [0.1, 1.7, 2.0**100, 1.234e30, 3e38]
    x = jnp.asarray(np.repeat(np.float32(values)[:, None], width, axis=1), dtype)
    bias = np.float32(0.5)
    for op in (jax.jit(lambda x: nj.layer_norm(x, bias=jnp.full(width, bias))),
               jax.jit(lambda x: nj.batch_norm(x.T, nj.batch_norm_state(len(values)),
                                               bias=jnp.full(len(values), bias),
                                               training=True)[0].T)):
        assert (np.asarray(op(x).astype(jnp.float32)) == bias).all()


def test_constant_large_bfloat16_rows_of_width_48_normalize_to_exactly_the_bias():
    # The branch-free path (more than 2^21 bfloat16 entries in rows of at most 64)
    x = np.full((43691, 48), 1.7, np.float32)
    x[1], x[2], x[3] = 2.0**100, 1.234e30, 3e38
    y = jax.jit(nj.layer_norm)(jnp.asarray(x, jnp.bfloat16))
    assert (np.asarray(y.astype(jnp.float32)) == 0).all()


def test_constant_channel_batch_norm_state():
    x = _normal(6, (8, 2)).astype(np.float32)
    x[:, 0] = 3.0
    y, state = nj.batch_norm(x, nj.batch_norm_state(2), None, jnp.array([0.5, 0.0]),
                             training=True)
    np.testing.assert_array_equal(np.asarray(y)[:, 0], 0.5)
    assert float(state.var[0]) == 0.0 and float(state.mean[0]) == 3.0
    assert int(state.count) == 1


def test_zero_row_rms_norm_is_zero():
    x = _normal(7, (3, 5)).astype(np.float32)
    x[1] = 0.0
    y = np.asarray(nj.rms_norm(x))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1], 0.0)


# --------------------------------------------------------------- low-precision inputs


def _within_resolution(y, expected, dtype):
    """|y - expected| within one unit of `dtype` resolution at |expected| (plus a floor)."""
    spacing = float(jnp.finfo(dtype).eps)
    error = np.abs(np.asarray(y, np.float64) - expected)
    bound = spacing * np.abs(expected) + spacing / 8
    assert (error <= bound).all(), f"max error {error.max():.3g}, worst ratio " \
        f"{(error / bound).max():.3g}"


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_bfloat16_mean_10_within_resolution(name, record_property):
    case = ALL_CASES[name]
    x = jnp.asarray(10.0 + _normal(8, case.shape), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    scale, bias = _affine(case)
    y = case.op(x, scale, bias)
    chex.assert_type(y, jnp.bfloat16)
    expected = case.reference(x64, scale, bias)
    record_property("max abs error", float(np.abs(np.asarray(y, np.float64) - expected).max()))
    _within_resolution(y, expected, jnp.bfloat16)

    # dtype=float32 shows the statistics themselves: bfloat16 statistics would be 1e-2 off
    y32 = case.op(x, scale, bias, dtype=jnp.float32)
    chex.assert_type(y32, jnp.float32)
    np.testing.assert_allclose(np.asarray(y32, np.float64), expected, rtol=1e-4, atol=1e-4)


F16_SHAPES = {
    "batch_norm": (4096, 2),
    "batch_renorm": (4096, 2),
    "layer_norm": (2, 4096),
    "rms_norm": (2, 4096),
    "group_norm": (2, 1024, 4),
    "instance_norm": (2, 2048, 2),
}


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_float16_sums_beyond_float16_range(name):
    """Mean 100 over 4096 values: a float16 sum overflows, float32 statistics do not."""
    case = ALL_CASES[name]
    shape = F16_SHAPES[name]
    x = jnp.asarray(100.0 + _normal(9, shape), jnp.float16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    features = shape[-1]
    scale = np.ones(features, np.float32)
    bias = np.zeros(features, np.float32)
    y = case.op(x, scale, bias)
    chex.assert_type(y, jnp.float16)
    _within_resolution(y, case.reference(x64, scale, bias), jnp.float16)


def test_low_precision_batch_norm_state_is_float32_and_exact():
    x = jnp.asarray(100.0 + _normal(10, (4096, 2)), jnp.float16)
    _, state = nj.batch_norm(x, nj.batch_norm_state(2), training=True)
    chex.assert_type([state.mean, state.var], jnp.float32)
    mean, var, _ = ref.batch_stats(np.asarray(x.astype(jnp.float32), np.float64))
    np.testing.assert_allclose(np.asarray(state.mean, np.float64), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var, np.float64), var, rtol=1e-4)

    xb = jnp.asarray(10.0 + _normal(11, (64, 3)), jnp.bfloat16)
    y, state = nj.batch_norm(xb, nj.batch_norm_state(3), training=True)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_type([state.mean, state.var], jnp.float32)
    y_eval, _ = nj.batch_norm(xb, state, training=False)
    chex.assert_type(y_eval, jnp.bfloat16)


@pytest.mark.parametrize(
    "name, dtype",
    [(name, jnp.bfloat16) for name in ALL_CASES] + [("batch_norm", jnp.float16),
                                                     ("layer_norm", jnp.float16)],
)
def test_dtype_argument_sets_output_dtype(name, dtype):
    case = ALL_CASES[name]
    x = _normal(12, case.shape).astype(np.float32)
    y = case.op(x, None, None)
    chex.assert_type(y, jnp.float32)
    y = case.op(x, None, None, dtype=dtype)
    chex.assert_type(y, dtype)
    _within_resolution(y, case.reference(x, None, None), dtype)


def test_float64_statistics_under_x64():
    with jax.enable_x64(True):
        # float64 resolves 1e8 + N(0,1) to ~1e-8; float32 statistics would be off by O(1)
        x = 1e8 + _normal(13, (16, 3))
        train = jax.jit(lambda x, s: nj.batch_norm(x, s, training=True))
        y, state = train(jnp.asarray(x), nj.batch_norm_state(3, jnp.float64))
        chex.assert_type([y, state.mean], jnp.float64)
        np.testing.assert_allclose(np.asarray(y), ref.batch_norm_train(x), atol=1e-6)
        y = jax.jit(nj.layer_norm)(jnp.asarray(x.T))
        chex.assert_type(y, jnp.float64)
        np.testing.assert_allclose(np.asarray(y), ref.layer_norm(x.T), atol=1e-6)


@pytest.mark.parametrize("magnitude", [1e200, 1e300])
def test_float64_magnitudes_beyond_float32s_scale_for_squares(magnitude):
    # float64 squares overflow past 1e154, and past 1e178 even times 2^-80: the
    # exact passes' downscale must be sized for float64 (float32's 2^-80 left
    # the sum of squares at inf there: output 0).
    with jax.enable_x64(True):
        x = magnitude * _normal(50, (4, 16))
        x[1] += 3 * magnitude  # far from zero too
        for op, reference in ((nj.layer_norm, ref.layer_norm), (nj.rms_norm, ref.rms_norm)):
            y = jax.jit(op)(jnp.asarray(x))
            chex.assert_type(y, jnp.float64)
            # (the reference on x / magnitude: its own squares would overflow;
            # epsilon is negligible at either scale)
            expected = reference(x / magnitude, epsilon=0.0)
            np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)


def test_vmap_keeps_one_predicate_and_the_exact_path_where_one_example_needs_it():
    # Under jax.vmap the one-pass/two-pass choice is made once for all examples, so
    # the conditional survives (a batched predicate would run both branches). An
    # example far from zero sends the whole batch down the exact path.
    rows = _normal(11, (6, 256))
    rows[2] += 1e4
    x = rows.astype(np.float32)
    xd = x.astype(np.float64)
    expected = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-6)
    per_row = jax.jit(jax.vmap(lambda r: nj.layer_norm(r)))
    np.testing.assert_allclose(np.asarray(per_row(x), np.float64), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(per_row(x[[0, 1, 3]]), np.float64),
                               expected[[0, 1, 3]], rtol=0, atol=5e-6)
    weights = np.linspace(-1.0, 1.0, 256)
    grads = jax.vmap(jax.grad(lambda r: jnp.sum(nj.layer_norm(r) * weights)))(x)
    expected_grads = ref.normalize_grad(x, np.broadcast_to(weights, x.shape), 1, 1e-6)
    np.testing.assert_allclose(np.asarray(grads, np.float64), expected_grads, rtol=0, atol=2e-6)
    assert "conditional(" in _cpu_hlo(per_row, x)  # on the CPU, which keeps the guard


# ------------------------------------ hard rows: exact statistics on either path


def _hard_float32_rows() -> np.ndarray:
    """float32 rows (the guarded path): tiny to float32's largest magnitudes, far
    from zero at every scale, (near-)constant, zero."""
    x = _normal(22, (16, 256))
    for i, magnitude in enumerate([1e-30, 1e10, 1e15, 1e20, 1e30, 1e37]):
        x[i] *= magnitude
    x[6] = 1e4 + x[6]
    x[7] = 1e24 + 1e18 * x[7]  # a variance in range whose rescaling, 1e48, is not
    x[8] = 2e38 + 1e37 * x[8]  # the sum of the row would overflow float32,
    x[8, 0] = 1e38  # and so would that of its deviations from the first entry
    x[9] = 1.0
    x[9, 5] = 1.0 + 2.0**-20
    x[10], x[11], x[12], x[13] = 3.0, 0.1, 2.0**100, 0.0
    x[14] = 3e38
    return np.asarray(x.astype(np.float32), np.float64)


def _assert_exact_statistics(stats, ms, x64):
    """Against float64 over each row's entries (NaN: not counted)."""
    mean, var = np.nanmean(x64, 1, keepdims=True), np.nanvar(x64, 1, keepdims=True)
    # within float32's rounding of the mean, plus 1e-6 std
    mean_error = np.abs(np.asarray(stats.mean, np.float64) - mean)
    assert (mean_error <= 2.0**-23 * np.abs(mean) + 1e-6 * np.sqrt(var)).all()
    # var beyond float32's range (rows scaled by 1e20 and up) is inf; inv_std is not
    finite = var < 3e38
    np.testing.assert_allclose(np.asarray(stats.var, np.float64)[finite], var[finite],
                               rtol=1e-5, atol=1e-37)  # 1e-30 rows: var below float32's
    assert np.isinf(np.asarray(stats.var)[~finite]).all()
    np.testing.assert_allclose(np.asarray(stats.inv_std, np.float64),
                               1 / np.sqrt(var + 1e-6), rtol=1e-5, atol=0)
    # |x| ~ 3e38: an inverse RMS below float32's normal range, which XLA flushes to 0
    mean_square = np.nanmean(x64**2, 1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ms.inv_std, np.float64),
                               1 / np.sqrt(mean_square + 1e-6),
                               rtol=1e-5, atol=float(np.finfo(np.float32).tiny))
    finite = mean_square < 3e38
    np.testing.assert_allclose(np.asarray(ms.var, np.float64)[finite], mean_square[finite],
                               rtol=1e-5, atol=1e-37)
    assert np.isinf(np.asarray(ms.var)[~finite]).all()


def _statistics_by_path(path, axes, channel_groups=None):
    """Both statistics (centered and mean square) of one path: as ``moments``
    dispatches them on this platform, guarded, or branch-free (the path every
    unmasked float32-statistics norm takes off the CPU)."""
    sets = nj._stats._Sets(axes, channel_groups, None, None, None)

    def statistics(x):
        if path == "branch-free":
            return tuple(nj._stats._branch_free(x, sets, 1e-6, center) for center in (True, False))
        kw = dict(epsilon=1e-6, channel_groups=channel_groups, branch_free=path == "default")
        return (nj._stats.moments(x, axes, **kw), nj._stats.moments(x, axes, center=False, **kw))

    return statistics


@pytest.mark.parametrize("path", ["default", "guarded", "branch-free"])
@pytest.mark.parametrize("data", ["bfloat16 rows of 64", "float32 rows of 256"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_statistics_of_hard_rows_are_exact(path, data, jit):
    bfloat16 = data.startswith("bfloat16")
    x64 = _hard_bfloat16_rows() if bfloat16 else _hard_float32_rows()
    x = jnp.asarray(x64, jnp.bfloat16 if bfloat16 else jnp.float32)
    # (Under jit, XLA also folds constant rescalings that eager dispatch leaves
    # alone, hence both.)
    statistics = _statistics_by_path(path, (1,))
    _assert_exact_statistics(*(jax.jit(statistics) if jit else statistics)(x), x64)


@pytest.mark.parametrize("fill", [np.nan, 3e38])
def test_statistics_of_masked_hard_rows_are_exact(fill):
    # Masked sets always take the guarded path. A quarter of each hard row is
    # hidden and holds NaN or 3e38, which must not reach the statistics nor
    # the scale of the squares (found from the counted sum of squares).
    x64 = _hard_float32_rows()
    mask = np.random.default_rng(34).random(x64.shape) < 0.75
    mask[:, 0] = True
    counted = np.where(mask, x64, np.nan)
    x = jnp.asarray(np.where(mask, x64, fill), jnp.float32)
    stats, ms = jax.jit(lambda x, m: (
        nj._stats.moments(x, (1,), epsilon=1e-6, mask=m),
        nj._stats.moments(x, (1,), epsilon=1e-6, mask=m, center=False)))(x, jnp.asarray(mask))
    _assert_exact_statistics(stats, ms, counted)


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
@pytest.mark.parametrize("size", [37, 1000])
def test_masked_sets_of_std_near_the_means_resolution(op, size):
    # Data of mean 1e4 whose std is 0.3 to 3 units in the last place of the
    # mean, and a constant set. The masked shift was the sum of x / n, rounded
    # several units off: the variance about it lost 46 units, and the constant
    # set normalized to 1.16 instead of 0 (epsilon 1e-20). The float64 masked
    # closed form, as reference.
    rng = np.random.default_rng(38)
    std = np.array([0.0, 3e-4, 1e-3, 3e-3])[:, None].repeat(8, 0)
    x = (1e4 + std * rng.standard_normal((32, size))).astype(np.float32)
    mask = rng.random(x.shape) < 0.7
    mask[:, 0] = True
    x = np.where(mask, x, np.nan).astype(np.float32)
    if op == "layer_norm":
        y = jax.jit(lambda x, m: nj.layer_norm(x, mask=m, epsilon=1e-20))(x, mask)
        axes = (1,)
    else:
        x, mask = x.T, mask.T
        y = jax.jit(lambda x, m: nj.batch_norm(
            x, nj.batch_norm_state(32), training=True, mask=m, epsilon=1e-20)[0])(x, mask)
        axes = (0,)
    x64 = x.astype(np.float64)
    mean, var, _ = ref.masked_moments(x64, axes, mask)
    expected = np.where(mask, (x64 - mean) / np.sqrt(var + 1e-20), 0)
    error = np.abs(np.where(mask, np.asarray(y, np.float64), 0) - expected)
    constant = np.broadcast_to(var == 0, x.shape)  # the first 8 sets, and any by chance
    assert constant.sum() >= 8 * size and (error[constant] == 0).all()
    assert error.max() <= 8 * 2.0**-24 * np.abs(expected).max()


def test_the_cpu_takes_the_branch_free_path_only_for_large_bfloat16_rows_of_layer_norm():
    def conditionals(x, center):
        return _cpu_hlo(lambda x: nj._stats.moments(x, (1,), epsilon=1e-6, center=center),
                        x).count("conditional(")

    rows = jnp.asarray(_hard_bfloat16_rows(), jnp.bfloat16)
    assert conditionals(rows, center=True) == 0
    assert conditionals(rows, center=False) > 0  # RMS norm's statistics: guarded
    assert conditionals(rows.astype(jnp.float32), center=True) > 0
    assert conditionals(rows[:4], center=True) > 0


@pytest.mark.parametrize("path", ["default", "guarded", "branch-free"])
@pytest.mark.parametrize(
    "shape, axes, channel_groups, sets",
    [
        ((256, 16), (0,), None, lambda y: y.T),  # batch norm
        ((4, 256, 4), (1,), None, lambda y: y.transpose(0, 2, 1).reshape(16, 256)),  # instance
        ((2, 64, 32), (1,), 8,  # group norm, 8 groups of 4 channels
         lambda y: y.reshape(2, 64, 8, 4).transpose(0, 2, 1, 3).reshape(16, 256)),
        ((16, 16, 16), (1, 2), None, lambda y: y.reshape(16, 256)),  # layer norm of images
    ],
    ids=["batch", "instance", "group", "layer-2d"])
def test_statistics_of_hard_sets_of_every_shape_are_exact(path, shape, axes, channel_groups,
                                                          sets):
    # The hard float32 rows laid out as the sets of batch, instance, group and
    # 2-D layer norm.
    index = sets(np.arange(int(np.prod(shape))).reshape(shape))
    x64 = np.empty(int(np.prod(shape)))
    x64[index] = _hard_float32_rows()
    x64 = x64.reshape(shape)
    stats, ms = jax.jit(_statistics_by_path(path, axes, channel_groups))(jnp.asarray(x64,
                                                                                  jnp.float32))

    def per_set(moments):
        return types.SimpleNamespace(**{
            name: sets(np.broadcast_to(np.asarray(getattr(moments, name), np.float64),
                                       shape))[:, :1]
            for name in ("mean", "var", "inv_std")})

    _assert_exact_statistics(per_set(stats), per_set(ms), sets(x64))


@pytest.mark.parametrize(
    "name", ["batch_norm", "layer_norm", "rms_norm", "instance_norm", "group_norm"])
def test_bfloat16_sums_convert_the_input_in_their_own_kernels(name):
    # XLA merges identical conversions into one and writes a conversion that
    # several kernels read out in full: a float32 copy of the input, read back
    # by each sum. Through optimization barriers, each sum of the guarded path,
    # and of its exact branch, converts x inside its own kernel instead: the
    # forward keeps no buffer of half a float32 copy's size (the statistics
    # take 2-33 KB here, a copy 128 KB).
    x = jnp.asarray(_normal(24, (16, 8, 8, 32)), jnp.bfloat16)
    ops = {
        "batch_norm": lambda x: nj.batch_norm(x, nj.batch_norm_state(32), training=True)[0],
        "layer_norm": nj.layer_norm,
        "rms_norm": nj.rms_norm,
        "instance_norm": nj.instance_norm,
        "group_norm": lambda x: nj.group_norm(x, num_groups=8),
    }
    # (XLA on the CPU: the GPU compiles the branch-free path, a kernel of its own.)
    compiled = _cpu_compiled(ops[name], x)
    hlo = compiled.as_text()
    assert "f32[16,8,8,32]" not in hlo[hlo.index("ENTRY"):]
    assert compiled.memory_analysis().temp_size_in_bytes < x.size * 4 / 2


def _for_either_cotangent(g, check):
    """``check(cotangent)`` passes for one of a bfloat16 output's two possible
    cotangents, as float64: ``g`` rounded to bfloat16, as on the CPU, or ``g``
    itself, as on the GPU (xla_allow_excess_precision drops the float32 ->
    bfloat16 -> float32 round trip; H100: an instance norm gradient 2.06 units
    of bfloat16 resolution from the rounded cotangent's closed form)."""
    failures = []
    for cotangent in (g.astype(jnp.bfloat16).astype(jnp.float32), g):
        try:
            return check(np.asarray(cotangent, np.float64))
        except AssertionError as e:
            failures.append(str(e))
    raise AssertionError(f"neither cotangent's closed form holds: {failures}")


@pytest.mark.parametrize("name, axes", [("batch_norm", (0, 1, 2)), ("instance_norm", (1, 2))])
def test_bfloat16_gradient_converts_x_inside_its_kernels(name, axes):
    # The derivative's (x - sample) term converts a bfloat16 x itself, and each
    # kernel that reads the bfloat16 cotangent converts it itself: no float32
    # copy of x or of the cotangent is written out (two copies before). And
    # the gradient is the closed form's.
    x = jnp.asarray(_normal(25, (16, 8, 8, 32)), jnp.bfloat16)
    g = jnp.asarray(_normal(26, x.shape), jnp.float32)
    ops = {
        "batch_norm": lambda x: nj.batch_norm(x, nj.batch_norm_state(32), training=True)[0],
        "instance_norm": nj.instance_norm,
    }
    grad = jax.grad(lambda x, g: jnp.sum(ops[name](x).astype(jnp.float32) * g))
    epsilon = 1e-5 if name == "batch_norm" else 1e-6
    dx = jax.jit(grad)(x, g)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    _for_either_cotangent(g, lambda c: _within_resolution(
        dx, ref.normalize_grad(x64, c, axes, epsilon), jnp.bfloat16))
    temp = _cpu_compiled(grad, x, g).memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * x.size * 4


def _in_sets(case: Case, shape: tuple[int, ...]) -> np.ndarray:
    """The flat indices of an array of ``shape``, laid out as ``case``'s sets."""
    return case.sets(np.arange(int(np.prod(shape))).reshape(shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name, shape", [
    *[(name, case.shape) for name, case in ALL_CASES.items()],
    ("layer_norm", (256, 4096)),  # 2^20 entries in rows of more than 1024
    ("rms_norm", (256, 4096)),
])
@pytest.mark.parametrize("along", ["random", "x"])
def test_forward_mode_derivative_is_the_closed_form(name, shape, dtype, along):
    # jax.jvp with tangents of x, the scale and the bias all nonzero. With
    # J the Jacobian of xhat (symmetric: the transpose's closed form is its own),
    # dy = (J dx) scale + xhat dscale + dbias. On the CPU a bfloat16 output's
    # derivative is a sum of terms each rounded to bfloat16, so that its
    # transpose converts the cotangent once per term (_stats._tangent_sum):
    # within two units of bfloat16's resolution of the sum of the closed
    # form's elementary terms' magnitudes (J dx's split as scale inv (dx -
    # mean(dx) - xhat mean(xhat dx))), about the error a rounding of dx itself
    # would make. Along x, where normalization is scale-invariant, J dx is
    # about 0 and the terms cancel: the bound is the terms', not the result's.
    case = ALL_CASES[name]
    x = jnp.asarray(1.0 + 2.0 * _normal(31, shape), dtype)
    dx = jnp.asarray(_normal(32, shape), dtype) if along == "random" else x
    case = case._replace(features=shape[-1])
    scale, bias = _affine(case)
    dscale, dbias = _affine(case, seed=33)
    y, dy = jax.jit(lambda *a: jax.jvp(case.op, a[:3], a[3:]))(x, scale, bias, dx, dscale, dbias)
    chex.assert_type(dy, dtype)

    index = _in_sets(case, shape)
    xs = np.asarray(x.astype(jnp.float32), np.float64).ravel()[index]
    dxs = np.asarray(dx.astype(jnp.float32), np.float64).ravel()[index]
    epsilon = 1e-5 if name in ("batch_norm", "batch_renorm") else 1e-6
    if name == "rms_norm":
        inv = 1 / np.sqrt((xs**2).mean(1, keepdims=True) + epsilon)
        xhat = xs * inv
        jdx = ref.rms_normalize_grad(xs, dxs, -1, epsilon)
    else:
        inv = 1 / np.sqrt(xs.var(1, keepdims=True) + epsilon)
        xhat = (xs - xs.mean(1, keepdims=True)) * inv
        jdx = ref.normalize_grad(xs, dxs, -1, epsilon)
    # |J dx| at most the sum of its elementary terms' magnitudes
    jdx_size = inv * (np.abs(dxs) + np.abs(xhat * (xhat * dxs).mean(1, keepdims=True)))
    if name != "rms_norm":
        jdx_size = jdx_size + inv * np.abs(dxs.mean(1, keepdims=True))

    def unset(v):
        out = np.empty(index.size)
        out[index.ravel()] = v.ravel()
        return out.reshape(shape)

    terms = [unset(jdx) * scale, unset(xhat) * dscale]
    if name != "rms_norm":
        terms.append(np.broadcast_to(dbias, shape))
    expected = sum(terms)
    error = np.abs(np.asarray(dy, np.float64) - expected)
    if dtype == jnp.float32:
        np.testing.assert_allclose(dy, expected, rtol=1e-4, atol=1e-5)
    else:
        size = unset(jdx_size) * scale + sum(np.abs(t) for t in terms[1:])
        # half a unit for each term's rounding and each partial sum's (up to
        # five terms; measured: at most 1.5 units)
        bound = 2 * float(jnp.finfo(dtype).eps) * size + 1e-6
        assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3g}"


def _split_path_ops(width: int) -> dict[str, Callable]:
    """``(x, scale, bias) -> y`` of each derivative path that sums its terms
    apart (_stats._tangent_sum); layer norm's long rows are its input's."""
    state = nj.BatchNormState(jnp.full(width, 0.3), jnp.full(width, 2.0), jnp.asarray(3))
    return {
        "layer_norm": nj.layer_norm,
        "layer_norm_long_rows": nj.layer_norm,
        "batch_norm": lambda x, s, b: nj.batch_norm(x, state, s, b, training=True)[0],
        "batch_norm_eval": lambda x, s, b: nj.batch_norm(x, state, s, b, training=False)[0],
        "group_norm": lambda x, s, b: nj.group_norm(x, s, b, num_groups=2),
    }


@pytest.mark.parametrize("name", ["layer_norm", "layer_norm_long_rows", "batch_norm",
                                  "batch_norm_eval", "group_norm"])
def test_split_cotangent_derivatives_pass_check_grads_to_second_order(name, monkeypatch, request):
    # The derivative that converts a bfloat16 cotangent once per term on the
    # CPU (_stats._tangent_sum's chain of optimization barriers) taken for
    # float64 too, where its conversions are exact, so that
    # jax.test_util.check_grads can compare it with finite differences:
    # forward and reverse mode, to second order.
    monkeypatch.setattr(nj._stats, "_split_cotangent", lambda dtype, compute_dtype: True)
    caches = (nj._stats._standardize_op, nj._stats._normalize_op)
    for cache in caches:  # (ops built before the patch, and after it for the next tests)
        cache.cache_clear()
        request.addfinalizer(cache.cache_clear)
    with jax.enable_x64(True):
        rng = np.random.default_rng(38)
        # rows of more than 1024, 2^20 entries: each term times the scale on its own
        rows, width = (512, 2048) if name == "layer_norm_long_rows" else (6, 8)
        x = jnp.asarray(rng.normal(size=(rows, width)) * 2 + 1)
        scale, bias = jnp.asarray(rng.uniform(0.5, 2, width)), jnp.asarray(rng.normal(size=width))
        op = _split_path_ops(width)[name]
        check_grads(jax.jit(op), (x, scale, bias), order=2, modes=("fwd", "rev"))


def _flax_split_path_ops(width: int) -> dict[str, Callable]:
    """Flax's layers (stable variance) in the signature of :func:`_split_path_ops`."""
    stats = {"mean": jnp.full(width, 0.3), "var": jnp.full(width, 2.0)}

    def applied(module, **state):
        def op(x, s, b):
            variables = {"params": {"scale": s, "bias": b}, **state}
            return module.apply(variables, x, mutable=list(state) if state else False)
        return op

    train = applied(nn.BatchNorm(use_running_average=False, use_fast_variance=False),
                    batch_stats=stats)
    layer = applied(nn.LayerNorm(use_fast_variance=False))
    return {
        "layer_norm": layer,
        "layer_norm_long_rows": layer,
        "batch_norm": lambda x, s, b: train(x, s, b)[0],
        "batch_norm_eval": lambda x, s, b: nn.BatchNorm(use_running_average=True).apply(
            {"params": {"scale": s, "bias": b}, "batch_stats": stats}, x),
        "group_norm": applied(nn.GroupNorm(num_groups=2, use_fast_variance=False)),
    }


@pytest.mark.parametrize("name", ["layer_norm", "layer_norm_long_rows", "batch_norm",
                                  "batch_norm_eval", "group_norm"])
def test_bfloat16_gradients_of_any_subset_of_arguments_and_under_vmap(name):
    # The derivative's terms apart (_stats._tangent_sum) with the tangents of
    # some arguments zero (a gradient with respect to the parameters alone, or
    # x alone), and per-example gradients under jax.vmap: each Flax's layer's
    # gradient in float32 on the same values, to bfloat16's resolution.
    rows, width = (512, 2048) if name == "layer_norm_long_rows" else (16, 8)
    rng = np.random.default_rng(39)
    x32 = jnp.asarray(rng.normal(size=(2, rows, width)) * 2 + 1, jnp.float32)
    x32 = x32.astype(jnp.bfloat16).astype(jnp.float32)  # the bfloat16 input's values
    g = jnp.asarray(rng.normal(size=x32.shape), jnp.float32)
    scale, bias = jnp.asarray(rng.uniform(0.5, 2, width)), jnp.asarray(rng.normal(size=width))

    def loss_of(op):
        return lambda x, s, b, g: jnp.sum(op(x, s, b).astype(jnp.float32) * g)

    loss, flax_loss = loss_of(_split_path_ops(width)[name]), loss_of(
        _flax_split_path_ops(width)[name])
    for argnums in [(0,), (1,), (2,), (1, 2)]:
        actual = jax.jit(jax.grad(loss, argnums=argnums))(
            x32[0].astype(jnp.bfloat16), scale, bias, g[0])
        expected = jax.jit(jax.grad(flax_loss, argnums=argnums))(x32[0], scale, bias, g[0])
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=2e-2,
                                       atol=2e-2 * np.abs(e).max())

    def per_example(loss):
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, None, 0)))

    actual = per_example(loss)(x32.astype(jnp.bfloat16), scale, bias, g)
    expected = per_example(flax_loss)(x32, scale, bias, g)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=2e-2,
                                   atol=2e-2 * np.abs(e).max())


@pytest.mark.parametrize("shape", [(64, 4), (16, 16, 16, 32)])
def test_bfloat16_batch_norm_evaluation_derivatives_are_the_closed_form(shape):
    # Evaluation mode normalizes with the running statistics, and its
    # derivative (_normalize_op) sums its terms as the training path's does:
    # on the CPU each kernel that reads the bfloat16 cotangent converts it
    # itself, so no float32 copy of it is written out (Flax's: one). Forward
    # and reverse mode, with respect to x, the scale, the bias and the
    # running mean and variance, against the float64 closed form.
    c = shape[-1]
    x = jnp.asarray(1.0 + 2.0 * _normal(34, shape), jnp.bfloat16)
    g = jnp.asarray(_normal(35, shape), jnp.bfloat16)
    rng = np.random.default_rng(36)
    mean, var = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 4, c).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    primals = (x, mean, var, scale, bias)
    tangents = (jnp.asarray(_normal(37, shape), jnp.bfloat16),
                *(rng.normal(size=c).astype(np.float32) for _ in range(4)))

    def evaluate(x, mean, var, scale, bias):
        state = nj.BatchNormState(mean, var, jnp.asarray(10, jnp.int32))
        return nj.batch_norm(x, state, scale, bias, training=False)[0]

    def loss(x, mean, var, scale, bias, g):  # g an argument: a constant, XLA folds it
        return jnp.sum(evaluate(x, mean, var, scale, bias).astype(jnp.float32) * g)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    _, dy = jax.jit(lambda p, t: jax.jvp(evaluate, p, t))(primals, tangents)
    grads = jax.jit(grad)(*primals, g)

    x64, g64 = (np.asarray(v.astype(jnp.float32), np.float64) for v in (x, g))
    dx64 = np.asarray(tangents[0].astype(jnp.float32), np.float64)
    dmean, dvar, dscale, dbias = (np.asarray(t, np.float64) for t in tangents[1:])
    inv = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    deviation = x64 - mean
    terms = [scale * inv * dx64, -scale * inv * dmean, deviation * (-0.5 * inv**3 * dvar) * scale,
             deviation * inv * dscale, np.broadcast_to(dbias, shape)]
    expected = sum(terms)
    error = np.abs(np.asarray(dy, np.float64) - expected)
    # as in test_forward_mode_derivative_is_the_closed_form
    bound = 2 * float(jnp.finfo(jnp.bfloat16).eps) * sum(map(np.abs, terms)) + 1e-6
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3g}"

    summed = tuple(range(len(shape) - 1))
    _within_resolution(grads[0], g64 * scale * inv, jnp.bfloat16)
    expected = [-(g64.sum(summed)) * scale * inv,
                (g64 * deviation).sum(summed) * scale * (-0.5 * inv**3),
                (g64 * deviation * inv).sum(summed), g64.sum(summed)]
    for actual, e in zip(grads[1:], expected, strict=True):
        np.testing.assert_allclose(actual, e, rtol=1e-5, atol=1e-4 * np.abs(e).max())
    temp = _cpu_compiled(grad, *primals, g).memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * x.size * 4 + 2**14  # (plus the small buffers of a small x)


@pytest.mark.parametrize("name, width", [
    ("layer_norm", 64), ("layer_norm", 4096), ("rms_norm", 64), ("rms_norm", 4096),
    ("group_norm", 64)])
def test_large_bfloat16_gradient_keeps_no_float32_copy(name, width):
    # On inputs of 2^20 entries or more, the derivative computes the xhat of
    # one of its full-size terms from a conversion of x of its own (the scale
    # gradient's for layer and RMS norm, the input gradient's for group norm),
    # and each kernel that reads the bfloat16 cotangent converts it itself
    # (_stats._tangent_sum); in rows of 4096 also the row sum's xhat, and each
    # term multiplies by the scale itself. So XLA on the CPU writes out no
    # float32 buffer of x's size (rows of 4096: one before; RMS norm's three
    # before the per-kernel conversions): past 32 MB every call page-faults on
    # all of its temporary memory. The gradients with respect to x, the scale
    # and the bias are the closed form's.
    x = jnp.asarray(1.0 + 2.0 * _normal(27, (2**20 // width, width)), jnp.bfloat16)
    # A bfloat16 cotangent, as a bfloat16 model's next layer gives it: a float32
    # one would be rounded to bfloat16 first, in a buffer of half a copy's size.
    g = jnp.asarray(_normal(28, x.shape), jnp.bfloat16)
    scale, bias = _affine(Case(None, None, x.shape, width, None))
    groups = 8
    if name == "group_norm":
        x, g = x.reshape(16, 32, 32, width), g.reshape(16, 32, 32, width)
        op = lambda x, s, b: nj.group_norm(x, s, b, num_groups=groups)  # noqa: E731
    else:
        op = ALL_CASES[name].op
    grad = jax.grad(lambda x, s, b, g: jnp.sum(op(x, s, b).astype(jnp.float32) * g),
                    argnums=(0, 1, 2))
    dx, dscale, dbias = jax.jit(grad)(x, scale, bias, g)

    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    def grouped(v):  # group norm's sets as the reduced axes (1, 2, 4)
        return v.reshape(v.shape[:-1] + (groups, width // groups))
    axes = (1, 2, 4) if name == "group_norm" else (-1,)
    view = grouped if name == "group_norm" else (lambda v: v)
    if name == "rms_norm":
        xhat = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    else:
        mean, var, _ = ref.masked_moments(view(x64), axes, None)
        xhat = ((view(x64) - mean) / np.sqrt(var + 1e-6)).reshape(x64.shape)
    summed_axes = tuple(range(x.ndim - 1))
    grad_x = ref.rms_normalize_grad if name == "rms_norm" else ref.normalize_grad

    def closed_form(c):
        expected_dx = grad_x(view(x64), view(c * scale), axes, 1e-6).reshape(x64.shape)
        _within_resolution(dx, expected_dx, jnp.bfloat16)
        np.testing.assert_allclose(dscale, (c * xhat).sum(summed_axes), rtol=1e-5, atol=1e-3)
        if name != "rms_norm":
            np.testing.assert_allclose(dbias, c.sum(summed_axes), rtol=1e-5, atol=1e-3)

    _for_either_cotangent(g, closed_form)
    temp = _cpu_compiled(grad, x, scale, bias, g).memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * x.size * 4


@pytest.mark.parametrize("shape", [(4096, 768), (256, 4096), (65536, 64)])
def test_layer_norm_float32_gradient_temporary_memory(shape):
    # The target: layer norm's forward+backward keeps at most 0.1x the
    # input's size in temporary memory (Flax's keeps 2x). XLA on the CPU fuses
    # rows of up to 1024 into one kernel once the scale gradient has an xhat of
    # its own; on rows of 4096 the input gradient's terms also take the scale
    # each on its own, or XLA writes g * scale out (8 MB at 512x4096), and the
    # row sum sum(g * scale) takes the scale through a barrier of its own:
    # sharing the input gradient's broadcast of it, XLA wrote that out in
    # full, a third full-size buffer beside xhat's and the gradient itself
    # (512x4096 fwd+bwd took 1.3-1.5x the time). On rows of 64 what remains
    # are per-row statistics, five of them live at once (1.25 MB of 16 MB;
    # nine before 1c28e72). The gradients are the closed form's.
    x = jnp.asarray(_normal(29, shape), jnp.float32)
    g = jnp.asarray(_normal(30, shape), jnp.float32)
    scale, bias = _affine(Case(None, None, shape, shape[-1], None))
    grad = jax.grad(lambda x, s, b, g: jnp.sum(nj.layer_norm(x, s, b) * g), argnums=(0, 1, 2))
    dx, dscale, dbias = jax.jit(grad)(x, scale, bias, g)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    expected_dx = ref.normalize_grad(x64, g64 * scale, (-1,), 1e-6)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, (g64 * xhat).sum(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dbias, g64.sum(0), rtol=1e-4, atol=1e-3)
    compiled = _cpu_compiled(grad, x, scale, bias, g)
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.1 * x.size * 4
    hlo = compiled.as_text()
    full_size = [line for line in hlo[hlo.index("\nENTRY"):].splitlines()
                 if " fusion(" in line and f"= f32[{shape[0]},{shape[1]}]" in line]
    assert len(full_size) <= 2, full_size


# ------------------------------------------- large half-precision rows: branch-free path


def _hard_bfloat16_rows(rows: int = 32769, width: int = 64) -> np.ndarray:
    """More than 2^21 bfloat16 entries in rows of 64 (the branch-free path's
    inputs), one kind of row each: tiny to near-overflow magnitudes, far from
    zero, (near-)constant, zero."""
    x = _normal(20, (rows, width))
    for i, magnitude in enumerate([1e-30, 1e-10, 1e10, 1e15, 1e20, 1e30, 1e35]):
        x[i] *= magnitude
    x[7] = 1e4 + 64 * x[7]  # bfloat16 resolves 1e4 to 64
    x[8] = 1.0
    x[8, 5] = 1.0 + 2.0**-7  # variance 6e-8, below epsilon: no room for cancellation
    x[9], x[10], x[11], x[12] = 3.0, 0.1, 2.0**100, 0.0
    # squares in float32's range, their sum not: RMS norm's plain sum overflows
    x[13] = 1.5e19 * (1 + 2.0**-7 * (np.arange(width) % 2))
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_large_bfloat16_rows_within_resolution(name):
    x64 = _hard_bfloat16_rows()
    x = jnp.asarray(x64, jnp.bfloat16)
    case = ALL_CASES[name]
    scale, bias = _affine(Case(case.op, case.reference, x.shape, x.shape[-1], case.sets))
    op = jax.jit(lambda x: case.op(x, scale, bias))
    y = op(x)
    chex.assert_type(y, jnp.bfloat16)
    _within_resolution(y, case.reference(x64, scale, bias), jnp.bfloat16)
    # On the CPU, layer norm: one kernel, no conditional (the branch-free path,
    # not the guarded one); RMS norm: guarded.
    assert ("conditional" not in _cpu_hlo(op, x)) == (name == "layer_norm")


def test_branch_free_statistics_are_exact_where_the_plain_sum_of_squares_overflows():
    # Rows of std 2^40 to 2^75, a third of them far from zero, and rows of +-2^60
    # to +-2^66 (squares near float32's largest, and sums of them past it): the
    # plain sum of squares overflows within this range, is clipped, and the
    # downscaled sum must take over exactly there.
    rng = np.random.default_rng(23)
    rows, width = 32769, 64
    x = rng.normal(size=(rows, width)) * 2.0 ** np.linspace(40, 75, rows)[:, None]
    x[::3] += 5 * x[::3].std(1, keepdims=True)
    for i, e in enumerate(np.linspace(60, 66, 60)):
        x[30 * i + 1] = np.where(np.arange(width) % 2 == 0, 2.0**e, -(2.0**e))
    x = jnp.asarray(x, jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)

    def statistics(x):
        return (nj._stats.moments(x, (1,), epsilon=1e-6),
                nj._stats.moments(x, (1,), epsilon=1e-6, center=False))

    stats, ms = jax.jit(statistics)(x)
    for moments, var in ((stats, x64.var(1, keepdims=True)),
                         (ms, (x64**2).mean(1, keepdims=True))):
        np.testing.assert_allclose(np.asarray(moments.inv_std, np.float64),
                                   1 / np.sqrt(var + 1e-6), rtol=1e-6)
        finite = var < np.finfo(np.float32).max
        np.testing.assert_allclose(np.asarray(moments.var, np.float64)[finite], var[finite],
                                   rtol=1e-6)
        assert np.isinf(np.asarray(moments.var)[~finite]).all()
    # layer norm's on the branch-free path, RMS norm's guarded (on the CPU;
    # elsewhere both branch-free)
    assert "conditional" not in _cpu_hlo(lambda x: statistics(x)[0], x)


@pytest.mark.parametrize("path", ["default", "guarded", "branch-free"])
def test_deviations_past_float32s_largest_do_not_overflow(path):
    # Entries of 0.5 to 1 times bfloat16's largest: the deviations from the mean
    # sum past float32's largest in some rows. And a row whose sample (entry 0)
    # is -1.8e38 and another entry +1.8e38: x minus the sample overflows.
    # (2^21 + 64 entries in rows of 64: the CPU's branch-free path by default.)
    x = np.random.default_rng(51).uniform(0.5, 1, (32769, 64)) * 3.38e38
    x[0] = 0.0
    x[0, 0], x[0, 5] = -1.8e38, 1.8e38
    x = jnp.asarray(x, jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for values in (x, x.astype(jnp.float32)[:512]):  # the guarded path in float32
        stats, ms = jax.jit(_statistics_by_path(path, (1,)))(values)
        _assert_exact_statistics(stats, ms, x64[: values.shape[0]])
    if path == "default":
        y = jax.jit(nj.layer_norm)(x)
        _within_resolution(y, ref.layer_norm(x64), jnp.bfloat16)


def test_branch_free_output_mean_is_zero_to_float32():
    # Rows of bfloat16 values a few units from a mean m, with 30% tiny entries that
    # make float32 sums round: the normalized rows (float32 output) still have mean
    # zero to float32 precision, because the first pass's mean is corrected by the
    # mean deviation from it (0.2e-6 without that offset).
    rng = np.random.default_rng(1)
    x = np.zeros((32769, 64))
    for row in x:
        m = 2.0 ** rng.uniform(4, 30)
        row[:] = m + rng.integers(-2, 3, row.size) * m * 2.0**-8
        tiny = rng.random(row.size) < 0.3
        row[tiny] = m * rng.uniform(-1, 1, tiny.sum()) * 2.0 ** rng.uniform(-30, -10, tiny.sum())
    x = jnp.asarray(x, jnp.bfloat16)
    y = np.asarray(jax.jit(lambda x: nj.layer_norm(x, dtype=jnp.float32))(x), np.float64)
    assert np.abs(y.mean(1)).max() < 1e-7


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_large_float16_rows_within_resolution(name):
    # float16 keeps the guarded path at every size (the branch-free one is slower)
    x = _normal(21, (2049, 1024))
    for i, magnitude in enumerate([1e-3, 1e2, 1e4]):
        x[i] *= magnitude
    x[3] = 1000.0 + x[3]  # float16 resolves 1000 to 0.5
    x[4], x[5] = 3.0, 0.0
    x[6] = 1.0
    x[6, 7] = 1.0 + 2.0**-10
    x = jnp.asarray(x, jnp.float16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    case = ALL_CASES[name]
    scale, bias = _affine(Case(case.op, case.reference, x.shape, x.shape[-1], case.sets))
    y = jax.jit(lambda x: case.op(x, scale, bias))(x)
    chex.assert_type(y, jnp.float16)
    _within_resolution(y, case.reference(x64, scale, bias), jnp.float16)


@pytest.mark.parametrize("shape", [(4, 64), (32769, 64)])
def test_bfloat16_rows_half_a_unit_off_the_grid_have_the_exact_variance(shape):
    # Rows of two neighbouring bfloat16 values, half and half: the mean is half a
    # unit in the last place from each, the farthest the branch-free path's
    # rounded shift (the larger shape) can be from it, and the variance is
    # (unit / 2)^2. At 1e20 a unit is 2^59, past the capped sum's range: the
    # downscaled sum must be corrected too. On the guarded path (the smaller
    # shape) the variance 8e34 must not overflow with its rescaling (1e20^2).
    width = shape[1]
    rows = []
    for v in (1.0, 3.0, 1e20, 1e30):
        low = float(jnp.asarray(v, jnp.bfloat16))
        high = float(jnp.nextafter(jnp.asarray(low, jnp.bfloat16), jnp.bfloat16(np.inf)))
        rows.append(np.where(np.arange(width) % 2 == 0, low, high))
    x64 = np.resize(np.asarray(rows), shape)
    x = jnp.asarray(x64, jnp.bfloat16)
    stats = jax.jit(lambda x: nj._stats.moments(x, (1,), epsilon=1e-6))(x)
    var = x64.var(1, keepdims=True)
    finite = var < 3e38
    np.testing.assert_allclose(np.asarray(stats.var, np.float64)[finite], var[finite], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.inv_std, np.float64),
                               1 / np.sqrt(var + 1e-6), rtol=1e-6)


# ---------------------------------------------- the GPU's paths, run on the CPU


def _rms_norm_grad(x, g, epsilon=1e-6):
    """d/dx of sum(g * x / sqrt(mean(x^2) + eps)) over the last axis, in float64."""
    r = 1 / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon)
    return g * r - x * r**3 * (g * x).mean(-1, keepdims=True)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_off_cpu_paths_match_float64_forward_and_gradient(name, off_cpu_paths):
    case = ALL_CASES[name]
    x64 = _normal(30, case.shape)
    sets = case.sets(np.arange(x64.size).reshape(case.shape))
    x64.reshape(-1)[sets[0]] += 1e4  # one set far from zero, one constant
    x64.reshape(-1)[sets[1]] = 3.0
    x = jnp.asarray(x64, jnp.float32)
    x64 = np.asarray(x, np.float64)
    scale, bias = _affine(case)
    assert "conditional" not in jax.jit(lambda x: case.op(x, scale, bias)).lower(x).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: case.op(x, scale, bias))(x)),
                               case.reference(x64, scale, bias), rtol=0, atol=2e-5)
    reduce_axes = {"batch_norm": 0, "batch_renorm": 0, "layer_norm": -1, "instance_norm": 1}
    if name == "group_norm":
        return  # its sets span no axis of x; its forward is checked above
    weights = _normal(31, case.shape)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(case.op(x, scale, bias) * weights)))(x)
    g = weights * scale
    epsilon = 1e-5 if name.startswith("batch") else 1e-6  # each op's default, as Flax's
    expected = (_rms_norm_grad(x64, g) if name == "rms_norm"
                else ref.normalize_grad(x64, g, reduce_axes[name], epsilon))
    # the constant set's gradient is its inv_std (1e3) times float32 rounding
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=0, atol=5e-4)


@pytest.mark.parametrize("center", [True, False], ids=["centered", "mean square"])
def test_branch_free_statistics_have_the_closed_form_derivative(center):
    # Autodiff through the two sums of squares would give NaN (an underflowed
    # sum's rsqrt has an infinite slope); batch_renorm differentiates moments.
    x64 = _normal(32, (64, 6)) * np.array([1.0, 1e-3, 1e3, 1e20, 1.0, 0.0])
    x64[:, 4] += 1e4  # far from zero; the last column is constant
    t64 = _normal(33, x64.shape)
    x = jnp.asarray(x64, jnp.float32)
    x64 = np.asarray(x, np.float64)
    sets = nj._stats._Sets((0,), None, None, None, None)
    _, tangents = jax.jvp(lambda x: nj._stats._branch_free(x, sets, 1e-6, center),
                          (x,), (jnp.asarray(t64, jnp.float32),))
    mean = x64.mean(0) if center else 0 * x64.mean(0)
    var = ((x64 - mean) ** 2).mean(0)
    d_mean = t64.mean(0) if center else 0 * mean
    d_var = 2 * ((x64 - mean) * t64).mean(0)
    d_inv_std = -0.5 * (var + 1e-6) ** -1.5 * d_var
    for got, want in ((tangents.mean, d_mean), (tangents.var, d_var),
                      (tangents.inv_std, d_inv_std)):
        got = np.asarray(got, np.float64).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


# ---------------------------------------------------------------- jax.export


def test_export_with_a_symbolic_batch_equals_float64():
    # Shape comparisons that choose a faster path, and the power of two the
    # exact passes scale by, read the batch size: a symbolic one was
    # InconclusiveDimensionOperation at trace time for every op but RMS norm.
    # Each op is exported once and run on data near 0 (the one-pass path) and
    # near 1e4 (the exact passes), at two batch sizes.
    from jax import export

    (b,) = export.symbolic_shape("b")
    rng = np.random.default_rng(41)
    scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    running = nj.BatchNormState(
        jnp.full(16, 5.0, jnp.float32), jnp.full(16, 2.0, jnp.float32), jnp.asarray(1, jnp.int32)
    )
    mask = np.arange(16) % 3 > 0  # broadcast over the batch, and any batch size
    cases = {
        "layer_norm": (lambda x: nj.layer_norm(x, scale, bias), ref.layer_norm),
        "rms_norm": (lambda x: nj.rms_norm(x, scale), lambda x, s, b: ref.rms_norm(x, s)),
        "group_norm": (
            lambda x: nj.group_norm(x, scale, bias, num_groups=4),
            lambda x, s, b: ref.group_norm(x, s, b, num_groups=4),
        ),
        "instance_norm": (lambda x: nj.instance_norm(x, scale, bias), ref.instance_norm),
        "layer_norm_masked": (
            lambda x: jnp.where(mask, nj.layer_norm(x, scale, bias, mask=mask), 0),
            lambda x, s, b: np.where(mask, ref.layer_norm(x, s, b, mask=mask), 0),
        ),
        "batch_norm_eval": (
            lambda x: nj.batch_norm(x, running, scale, bias, training=False)[0],
            lambda x, s, b: ref.batch_norm_eval(x, running.mean, running.var, s, b),
        ),
        "batch_norm": (
            lambda x: nj.batch_norm(x, running, scale, bias, training=True),
            lambda x, s, b: ref.batch_norm_train(x, s, b),
        ),
    }
    for name, (op, expected) in cases.items():
        exported = export.export(jax.jit(op))(jax.ShapeDtypeStruct((b, 4, 3, 16), jnp.float32))
        for loc, batch in ((0.0, 3), (1e4, 3), (0.0, 6), (1e4, 6)):
            x = (loc + rng.normal(size=(batch, 4, 3, 16))).astype(np.float32)
            out = exported.call(x)
            y = out[0] if name == "batch_norm" else out
            want = expected(x, scale, bias)
            np.testing.assert_allclose(
                np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-4, err_msg=f"{name}@{loc}"
            )
            if name == "batch_norm":
                mean, var, _ = ref.batch_stats(x)
                # One step from a count of 1 with momentum 0.99, debiased.
                w = 0.01 / (1 - 0.99**2)
                np.testing.assert_allclose(out[1].mean, (1 - w) * 5.0 + w * mean, rtol=1e-5)
                np.testing.assert_allclose(out[1].var, (1 - w) * 2.0 + w * var, rtol=1e-4)
        if name == "batch_norm":
            # The training step also survives serialization (its state is a
            # NamedTuple, which jax.export must have registered).
            restored = export.deserialize(exported.serialize())
            chex.assert_trees_all_equal(restored.call(x), out)
