"""layer_norm, rms_norm, group_norm and instance_norm against float64 closed forms and Flax."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import normjax as nj

RTOL = 2e-5
ATOL = 2e-5


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _normal(seed: int, shape, loc=0.0, scale=1.0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(dtype)


def _assert_names_shapes(excinfo: pytest.ExceptionInfo, *shapes: tuple[int, ...]) -> None:
    message = str(excinfo.value)
    for shape in shapes:
        assert str(tuple(shape)) in message or str(list(shape)) in message, message


@st.composite
def _shape_and_axes(draw):
    """A shape, non-empty reduction axes and non-empty feature axes (ints or tuples)."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=ndim, max_size=ndim)))

    def axes_subset(min_size):
        chosen = sorted(draw(st.permutations(range(ndim)))[: draw(st.integers(min_size, ndim - 1))])
        if draw(st.booleans()):
            chosen = [a - ndim for a in chosen]
        return chosen[0] if len(chosen) == 1 and draw(st.booleans()) else tuple(chosen)

    reduction_axes = axes_subset(1)
    feature_axes = axes_subset(1)
    return shape, reduction_axes, feature_axes


def _feature_shape(shape, feature_axes):
    return tuple(shape[a] for a in ref.canonical_axes(len(shape), feature_axes))


# Jitted once per shape: far cheaper than op-by-op dispatch over many hypothesis shapes.
_layer_norm = jax.jit(nj.layer_norm, static_argnames=("reduction_axes", "feature_axes"))
_rms_norm = jax.jit(nj.rms_norm, static_argnames=("reduction_axes", "feature_axes"))
_group_norm = jax.jit(nj.group_norm, static_argnames=("num_groups", "group_size"))
_instance_norm = jax.jit(nj.instance_norm, static_argnames=("feature_axes",))

# ----------------------------------------------------------------------------- layer norm


@settings(max_examples=10, deadline=None)
@given(case=_shape_and_axes(), with_affine=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_matches_reference(case, with_affine, seed):
    shape, reduction_axes, feature_axes = case
    x = _normal(seed, shape, loc=2.0, scale=3.0)
    fshape = _feature_shape(shape, feature_axes)
    scale = _normal(seed + 1, fshape) if with_affine else None
    bias = _normal(seed + 2, fshape) if with_affine else None
    y = _layer_norm(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes)
    chex.assert_shape(y, shape)
    chex.assert_type(y, jnp.float32)
    expected = ref.layer_norm(x, scale, bias, reduction_axes=reduction_axes,
                              feature_axes=feature_axes)
    _close(y, expected)


def test_layer_norm_default_epsilon_is_flax():
    # variance 1e-6 is the size of the default epsilon: a different default shows
    x = _normal(0, (3, 8), scale=1e-3)
    _close(nj.layer_norm(x), ref.layer_norm(x, epsilon=1e-6), rtol=1e-4, atol=1e-5)
    _close(nj.layer_norm(x, epsilon=1e-3), ref.layer_norm(x, epsilon=1e-3))


def test_layer_norm_matches_flax_layer():
    x = _normal(1, (2, 3, 4, 6), loc=1.0)
    module = nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=(2, 3), use_fast_variance=False)
    params = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
    expected = np.asarray(module.apply(params, x), np.float64)
    p = params["params"]
    y = nj.layer_norm(x, p["scale"], p["bias"], reduction_axes=(1, 2, 3), feature_axes=(2, 3))
    _close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [None, np.nan, 1e30])
def test_layer_norm_mask(fill):
    x = _normal(2, (4, 7), loc=1.0, scale=2.0)
    mask = np.random.default_rng(3).random((4, 7)) < 0.6
    mask[:, :2] = True
    scale, bias = _normal(4, (7,)), _normal(5, (7,))
    filled = np.where(mask, x, x if fill is None else fill).astype(np.float32)
    y = np.asarray(nj.layer_norm(filled, scale, bias, mask=mask), np.float64)
    _close(y[mask], ref.layer_norm(x, scale, bias, mask=mask)[mask])
    if fill is None or np.isfinite(fill):
        _close(y[~mask], ref.layer_norm(filled, scale, bias, mask=mask)[~mask], rtol=1e-5)


def test_layer_norm_jit_vmap():
    x = _normal(6, (5, 3, 4), loc=-1.0)
    scale = _normal(7, (4,))
    expected = ref.layer_norm(x, scale)
    _close(jax.jit(nj.layer_norm)(x, scale), expected)
    per_example = jax.jit(jax.vmap(nj.layer_norm, in_axes=(0, None)))(x, scale)
    _close(per_example, expected)
    # vmapping over the last axis: reduction_axes=-1 then refers to the per-example last axis
    swapped = jax.jit(
        jax.vmap(functools.partial(nj.layer_norm, reduction_axes=-1), in_axes=2, out_axes=2)
    )(x)
    _close(swapped, ref.layer_norm(np.moveaxis(x, 2, 0)).transpose(1, 2, 0))


def test_layer_norm_grad_matches_closed_form():
    x = _normal(8, (3, 6), loc=1.0, scale=2.0)
    scale = _normal(9, (6,))
    cot = _normal(10, (3, 6))
    gx = jax.grad(lambda x: jnp.sum(nj.layer_norm(x, scale) * cot))(x)
    _close(gx, ref.normalize_grad(x, cot * scale.astype(np.float64), -1, 1e-6), atol=1e-4)


@pytest.mark.parametrize("dtype, shape", [(np.float32, (64, 96)), (np.float32, (2048, 512)),
                                          (jnp.bfloat16, (64, 96))])
def test_layer_norm_parameter_grads_are_exact_far_from_zero(dtype, shape):
    # On float32 inputs of 2^20 entries and more, the scale gradient's xhat is
    # computed apart from the input gradient's (so that XLA writes no full-size
    # xhat); it must keep the deviations' precision on data with mean 1e4 and
    # std 1 as the other does.
    x = np.asarray(jnp.asarray(_normal(11, shape, loc=1e4), dtype).astype(np.float32))
    cot = _normal(12, x.shape).astype(np.float32)
    scale = np.random.default_rng(13).uniform(0.5, 2.0, shape[1]).astype(np.float32)
    bias = _normal(14, (shape[1],)).astype(np.float32)

    def loss(scale, bias, x):
        y = nj.layer_norm(jnp.asarray(x, dtype), scale, bias, dtype=jnp.float32)
        return jnp.sum(y * cot)

    dscale, dbias, dx = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(scale, bias, x)
    x64 = x.astype(np.float64)
    xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
    _close(dscale, (cot * xhat).sum(0), rtol=1e-5, atol=1e-4)
    _close(dbias, cot.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
    if dtype == np.float32:  # (bfloat16's input gradient has bfloat16's precision)
        _close(dx, ref.normalize_grad(x, cot * scale.astype(np.float64), -1, 1e-6), atol=1e-4)


# ------------------------------------------------------------------------------- rms norm


@settings(max_examples=10, deadline=None)
@given(case=_shape_and_axes(), with_scale=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_matches_reference(case, with_scale, seed):
    shape, reduction_axes, feature_axes = case
    x = _normal(seed, shape, loc=1.0, scale=3.0)
    scale = _normal(seed + 1, _feature_shape(shape, feature_axes)) if with_scale else None
    y = _rms_norm(x, scale, reduction_axes=reduction_axes, feature_axes=feature_axes)
    chex.assert_shape(y, shape)
    expected = ref.rms_norm(x, scale, reduction_axes=reduction_axes, feature_axes=feature_axes)
    _close(y, expected)


@pytest.mark.parametrize("shape", [(16, 256), (512, 4096)])
def test_rms_norm_grads_match_the_closed_form(shape):
    # float32 inputs take mean(x * dx) * inv_std in the derivative (so that XLA
    # reduces x itself); the gradients are those of the float64 closed form:
    # y = x r s, r = (mean(x^2) + eps)^-1/2, dx = r g s - x r^3 mean(x g s), ds = sum(g x r).
    x = _normal(15, shape, loc=0.5, scale=2.0)
    cot = _normal(16, shape)
    scale = np.random.default_rng(17).uniform(0.5, 2.0, shape[1]).astype(np.float32)

    def loss(x, scale):
        return jnp.sum(nj.rms_norm(x, scale) * cot)

    dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
    x64, g = x.astype(np.float64), cot.astype(np.float64) * scale
    r = 1 / np.sqrt((x64**2).mean(1, keepdims=True) + 1e-6)
    _close(dx, r * g - x64 * r**3 * (x64 * g).mean(1, keepdims=True), rtol=1e-5, atol=1e-5)
    _close(dscale, (cot * x64 * r).sum(0), rtol=1e-5, atol=1e-4)


def test_rms_norm_matches_flax_layer():
    x = _normal(11, (3, 5), loc=0.5, scale=1e-3)  # mean square near the default epsilon
    module = nn.RMSNorm()
    params = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
    y = nj.rms_norm(x, params["params"]["scale"])
    _close(y, np.asarray(module.apply(params, x), np.float64), rtol=1e-5, atol=1e-5)
    _close(y, ref.rms_norm(x, params["params"]["scale"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [np.nan, 1e30])
def test_rms_norm_mask(fill):
    x = _normal(12, (3, 2, 5), loc=1.0)
    mask = np.random.default_rng(13).random((3, 1, 5)) < 0.5
    mask[..., 0] = True
    full = np.broadcast_to(mask, x.shape)
    filled = np.where(full, x, fill).astype(np.float32)
    y = np.asarray(nj.rms_norm(filled, reduction_axes=(1, 2), feature_axes=-1, mask=mask))
    _close(y[full], ref.rms_norm(x, reduction_axes=(1, 2), mask=mask)[full])


# ----------------------------------------------------------------------------- group norm


@st.composite
def _group_case(draw):
    ndim = draw(st.integers(2, 4))
    groups = draw(st.integers(1, 3))
    size = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(2, 3), min_size=ndim - 2, max_size=ndim - 2)))
    shape = (draw(st.integers(1, 3)),) + spatial + (groups * size,)
    if groups * size == 1 and not spatial:
        shape = shape[:-1] + (2,)
        groups, size = 1, 2
    by_size = draw(st.booleans())
    return shape, groups, size, by_size


@settings(max_examples=10, deadline=None)
@given(case=_group_case(), with_affine=st.booleans(), seed=st.integers(0, 2**16))
def test_group_norm_matches_reference(case, with_affine, seed):
    shape, groups, size, by_size = case
    x = _normal(seed, shape, loc=-2.0, scale=2.0)
    scale = _normal(seed + 1, shape[-1:]) if with_affine else None
    bias = _normal(seed + 2, shape[-1:]) if with_affine else None
    if by_size:
        y = _group_norm(x, scale, bias, num_groups=None, group_size=size)
    else:
        y = _group_norm(x, scale, bias, num_groups=groups)
    chex.assert_shape(y, shape)
    _close(y, ref.group_norm(x, scale, bias, num_groups=groups))


def test_group_norm_default_32_groups_and_flax_agreement():
    x = _normal(14, (2, 3, 3, 64), loc=1.0)
    module = nn.GroupNorm(use_fast_variance=False)
    params = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
    p = params["params"]
    y = nj.group_norm(x, p["scale"], p["bias"])
    _close(y, ref.group_norm(x, p["scale"], p["bias"], num_groups=32))
    _close(y, np.asarray(module.apply(params, x), np.float64), rtol=1e-5, atol=1e-5)


def test_group_norm_explicit_reduction_axes():
    x = _normal(15, (2, 3, 4, 6), loc=1.0)  # two leading batch axes
    y = nj.group_norm(x, num_groups=2, reduction_axes=(2, 3))
    _close(y, ref.group_norm(x, num_groups=2, reduction_axes=(2, 3)))


@pytest.mark.parametrize("fill", [np.nan, 1e30])
def test_group_norm_mask(fill):
    x = _normal(16, (2, 5, 4), loc=1.0)
    mask = np.random.default_rng(17).random((2, 5, 1)) < 0.5
    mask[:, :2] = True
    full = np.broadcast_to(mask, x.shape)
    filled = np.where(full, x, fill).astype(np.float32)
    y = np.asarray(nj.group_norm(filled, num_groups=2, mask=mask))
    _close(y[full], ref.group_norm(x, num_groups=2, mask=mask)[full])


# -------------------------------------------------------------------------- instance norm


@settings(max_examples=10, deadline=None)
@given(
    shape=st.lists(st.integers(2, 4), min_size=3, max_size=4).map(tuple),
    two_feature_axes=st.booleans(),
    with_affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_instance_norm_matches_reference(shape, two_feature_axes, with_affine, seed):
    feature_axes = (1, -1) if two_feature_axes and len(shape) == 4 else -1
    x = _normal(seed, shape, loc=3.0, scale=0.5)
    fshape = _feature_shape(shape, feature_axes)
    scale = _normal(seed + 1, fshape) if with_affine else None
    bias = _normal(seed + 2, fshape) if with_affine else None
    y = _instance_norm(x, scale, bias, feature_axes=feature_axes)
    _close(y, ref.instance_norm(x, scale, bias, feature_axes=feature_axes))


def test_instance_norm_matches_flax_layer():
    x = _normal(18, (2, 4, 3, 5), loc=1.0)
    module = nn.InstanceNorm(use_fast_variance=False)
    params = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
    p = params["params"]
    y = nj.instance_norm(x, p["scale"], p["bias"])
    _close(y, np.asarray(module.apply(params, x), np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [np.nan, 1e30])
def test_instance_norm_mask(fill):
    x = _normal(19, (2, 6, 3), loc=1.0)
    mask = np.random.default_rng(20).random((2, 6, 3)) < 0.6
    mask[:, :2] = True
    filled = np.where(mask, x, fill).astype(np.float32)
    y = np.asarray(nj.instance_norm(filled, mask=mask))
    _close(y[mask], ref.instance_norm(x, mask=mask)[mask])


# --------------------------------------------------------------------------- equivalences


def test_layer_norm_over_hwc_is_group_norm_with_one_group():
    x = _normal(21, (2, 3, 4, 6), loc=1.0, scale=2.0)
    scale, bias = _normal(22, (6,)), _normal(23, (6,))
    ln = nj.layer_norm(x, scale, bias, reduction_axes=(1, 2, 3), feature_axes=-1)
    gn = nj.group_norm(x, scale, bias, num_groups=1)
    _close(ln, np.asarray(gn, np.float64), rtol=1e-5, atol=1e-5)
    _close(gn, ref.layer_norm(x, scale, bias, reduction_axes=(1, 2, 3)))


def test_instance_norm_is_group_norm_with_group_size_one_and_spatial_layer_norm():
    x = _normal(24, (2, 3, 4, 6), loc=1.0, scale=2.0)
    scale, bias = _normal(25, (6,)), _normal(26, (6,))
    inn = np.asarray(nj.instance_norm(x, scale, bias), np.float64)
    gn = nj.group_norm(x, scale, bias, num_groups=None, group_size=1)
    ln = nj.layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=-1)
    _close(gn, inn, rtol=1e-5, atol=1e-5)
    _close(ln, inn, rtol=1e-5, atol=1e-5)
    _close(inn, ref.instance_norm(x, scale, bias))


# ------------------------------------------------------------------------------ gradients


def _check_float64(fn, shapes, seed, order=1):
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(_normal(seed + i, s, dtype=np.float64)) for i, s in
                     enumerate(shapes))
        check_grads(jax.jit(fn), args, order=1, modes=("fwd", "rev"))
        if order == 2:
            check_grads(jax.jit(fn), args, order=2, modes=("rev",))


def test_check_grads_layer_norm():
    _check_float64(
        lambda x, s, b: nj.layer_norm(x, s, b, reduction_axes=(1, 2), feature_axes=-1),
        [(2, 3, 4), (4,), (4,)],
        30,
        order=2,
    )


def test_check_grads_rms_norm():
    _check_float64(lambda x, s: nj.rms_norm(x, s), [(3, 5), (5,)], 31)


def test_check_grads_group_norm():
    _check_float64(lambda x, s, b: nj.group_norm(x, s, b, num_groups=2), [(2, 3, 4), (4,), (4,)],
                   32)


def test_check_grads_instance_norm():
    _check_float64(lambda x, s, b: nj.instance_norm(x, s, b), [(2, 4, 3), (3,), (3,)], 33)


def test_check_grads_masked_layer_norm():
    mask = np.array([[True, True, False, True], [True, False, True, True]])
    _check_float64(lambda x: nj.layer_norm(x, mask=mask), [(2, 4)], 34)


# --------------------------------------------------------------------------------- errors

_OPS = {
    "layer_norm": nj.layer_norm,
    "rms_norm": nj.rms_norm,
    "group_norm": functools.partial(nj.group_norm, num_groups=2),
    "instance_norm": nj.instance_norm,
}


@pytest.mark.parametrize("op", list(_OPS))
def test_concrete_scalar_epsilon_equals_the_python_number(op):
    x = _normal(90, (2, 3, 4))
    expected = _OPS[op](x, epsilon=1e-2)
    for box in (np.float32, jnp.float32, jnp.asarray):
        chex.assert_trees_all_equal(_OPS[op](x, epsilon=box(1e-2)), expected)
    with pytest.raises(TypeError, match="`epsilon` must be a static number"):
        jax.jit(lambda e: _OPS[op](x, epsilon=e))(1e-2)


@pytest.mark.parametrize("op", list(_OPS))
def test_output_dtype_must_be_floating(op):
    with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype.*int32"):
        _OPS[op](jnp.ones((2, 3, 4)), dtype=jnp.int32)


def test_axes_of_the_wrong_type_are_a_clear_type_error():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(TypeError, match=r"`reduction_axes` must be an int or a sequence of ints"):
        nj.layer_norm(x, reduction_axes=1.0)
    with pytest.raises(TypeError, match=r"`feature_axes` must be an int or a sequence of ints"):
        nj.layer_norm(x, feature_axes=None)


@pytest.mark.parametrize("op", list(_OPS))
def test_integer_input_is_a_type_error(op):
    with pytest.raises(TypeError, match="int32"):
        _OPS[op](jnp.ones((2, 3, 4), jnp.int32))


@pytest.mark.parametrize("op", list(_OPS))
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_input_and_output_are_a_type_error_naming_them(op, dtype):
    # float8's promote to no float32: JAX's TypePromotionError came from inside.
    name = jnp.dtype(dtype).name
    with pytest.raises(TypeError, match=f"`x` must be a floating-point array.*{name}"):
        _OPS[op](jnp.ones((2, 3, 4), dtype))
    with pytest.raises(TypeError, match=f"`dtype` must be a floating-point dtype.*{name}"):
        _OPS[op](jnp.ones((2, 3, 4)), dtype=dtype)


@pytest.mark.parametrize("op", list(_OPS))
def test_none_input_is_a_type_error_naming_x(op):
    with pytest.raises(TypeError, match="`x` must be a floating-point array.*got None"):
        _OPS[op](None)


def test_an_axis_given_twice_counts_once_as_in_flax():
    x = jnp.asarray(_normal(71, (2, 3, 4)))
    chex.assert_trees_all_equal(nj.layer_norm(x, reduction_axes=(-1, 2), feature_axes=(2, -1)),
                                nj.layer_norm(x, reduction_axes=2))
    # flax.linen merges them too
    flax_ln = nn.LayerNorm(reduction_axes=(-1, 2), feature_axes=(2, -1))
    y = flax_ln.apply(flax_ln.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(y, ref.layer_norm(x, reduction_axes=2), atol=1e-5)


def test_scale_and_bias_as_lists_equal_arrays():
    x = jnp.asarray(_normal(70, (4, 3)))
    expected = nj.layer_norm(x, jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, -1.0, 3.0]))
    chex.assert_trees_all_equal(nj.layer_norm(x, [1.0, 2.0, 0.5], [0.0, -1.0, 3]), expected)
    expected = nj.group_norm(x[:, None], jnp.asarray([1.0, 2.0, 0.5]), num_groups=1)
    chex.assert_trees_all_equal(nj.group_norm(x[:, None], [1.0, 2.0, 0.5], num_groups=1), expected)


@pytest.mark.parametrize("op", list(_OPS))
@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf"), "1e-5"])
def test_epsilon_not_positive(op, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        _OPS[op](jnp.ones((2, 3, 4)), epsilon=epsilon)


@pytest.mark.parametrize("op", list(_OPS))
def test_scale_shape_mismatch_names_shapes(op):
    with pytest.raises(ValueError, match="scale") as excinfo:
        _OPS[op](jnp.ones((2, 3, 4)), jnp.ones((3,)))
    _assert_names_shapes(excinfo, (4,), (3,))


@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "instance_norm"])
def test_bias_shape_mismatch_names_shapes(op):
    with pytest.raises(ValueError, match="bias") as excinfo:
        _OPS[op](jnp.ones((2, 3, 4)), None, jnp.ones((5,)))
    _assert_names_shapes(excinfo, (4,), (5,))


@pytest.mark.parametrize("op", list(_OPS))
def test_mask_not_broadcastable_names_shapes(op):
    with pytest.raises(ValueError, match="mask") as excinfo:
        _OPS[op](jnp.ones((2, 3, 4)), mask=jnp.ones((2, 3, 3), bool))
    _assert_names_shapes(excinfo, (2, 3, 4), (2, 3, 3))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("argument", ["reduction_axes", "feature_axes"])
def test_axes_out_of_range(op, argument):
    with pytest.raises(ValueError, match=argument):
        _OPS[op](jnp.ones((2, 3)), **{argument: 2})
    with pytest.raises(ValueError, match=argument):
        _OPS[op](jnp.ones((2, 3)), **{argument: (0, -3)})


def test_instance_norm_feature_axes_out_of_range():
    with pytest.raises(ValueError, match="feature_axes"):
        nj.instance_norm(jnp.ones((2, 3, 4)), feature_axes=3)


def test_instance_norm_feature_axes_with_the_batch_axis_name_it():
    # Axes 1 and 2 are left to reduce: the error said that nothing was.
    with pytest.raises(ValueError, match=r"include axis 0, the batch axis"):
        nj.instance_norm(jnp.ones((4, 3, 8)), feature_axes=0)
    with pytest.raises(ValueError, match=r"leaves nothing to reduce"):
        nj.instance_norm(jnp.ones((4, 8)))


def test_group_norm_of_one_example_normalizes_each_group_of_its_channels():
    # A (channels,) input, as under jax.vmap, as Flax takes it (it was an error).
    x = _normal(74, (4, 6), loc=1.0)
    expected = ref.group_norm(x, num_groups=3)  # per example: the same sets
    y = jax.vmap(lambda row: nj.group_norm(row, num_groups=3))(x)
    _close(y, expected)
    _close(nj.group_norm(x[0], num_groups=3, reduction_axes=-1), expected[0])
    with pytest.raises(ValueError, match="needs `x` with a channel axis"):
        nj.group_norm(jnp.float32(1.0), num_groups=1)


def test_group_norm_reduction_axes_out_of_range():
    with pytest.raises(ValueError, match="reduction_axes"):
        nj.group_norm(jnp.ones((2, 3, 4)), num_groups=2, reduction_axes=(1, 3))


def test_group_norm_group_arguments():
    x = jnp.ones((2, 3, 6))
    with pytest.raises(ValueError, match="num_groups"):
        nj.group_norm(x, num_groups=4)
    with pytest.raises(ValueError, match="group_size"):
        nj.group_norm(x, num_groups=None, group_size=4)
    with pytest.raises(ValueError, match="num_groups"):
        nj.group_norm(x, num_groups=2, group_size=3)  # both
    with pytest.raises(ValueError, match="num_groups"):
        nj.group_norm(x, num_groups=None, group_size=None)  # neither
    with pytest.raises(ValueError, match="num_groups"):
        nj.group_norm(x)  # the default 32 groups do not divide 6 channels


@pytest.mark.parametrize(
    "groups", [{"num_groups": np.int64(3)}, {"num_groups": None, "group_size": np.int32(2)}]
)
def test_group_norm_takes_numpy_integer_group_arguments(groups):
    # A group count read from a config array: its error used to call 3 "not a
    # positive divisor" of 6.
    x = _normal(70, (2, 4, 6), loc=1.0)
    _close(nj.group_norm(x, **groups), ref.group_norm(x, num_groups=3))
    with pytest.raises(ValueError, match="positive int"):
        nj.group_norm(jnp.asarray(x), num_groups=True)


def test_errors_fire_under_jit():
    with pytest.raises(ValueError, match="num_groups"):
        jax.jit(lambda x: nj.group_norm(x, num_groups=4))(jnp.ones((2, 3, 6)))
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda x, s: nj.layer_norm(x, s))(jnp.ones((2, 3)), jnp.ones((4,)))


def test_layers_of_one_configuration_share_one_traced_core():
    """Identical layers trace the statistics, and the rule for their derivative,
    once: their calls share one jaxpr and one derivative rule, and a different
    epsilon or dtype gets its own."""

    def stack(x):
        for _ in range(3):
            x = jnp.tanh(nj.layer_norm(x))
        return nj.layer_norm(x, epsilon=1e-3) + nj.layer_norm(x, dtype=jnp.bfloat16)

    def custom_jvp_calls(jaxpr):
        # also inside calls that a JAX version does not inline
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "custom_jvp_call":
                yield eqn
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        sub = sub.jaxpr
                    if isinstance(sub, jax.extend.core.Jaxpr):
                        yield from custom_jvp_calls(sub)

    x = jnp.asarray(_normal(0, (4, 8)))
    calls = list(custom_jvp_calls(jax.make_jaxpr(stack)(x).jaxpr))
    assert len(calls) == 5
    for param in ("call_jaxpr", "jvp_jaxpr_fun"):
        traced = [e.params[param] for e in calls]
        assert traced[0] is traced[1] is traced[2]
        assert len({id(t) for t in traced}) == 3
    # and the values are the layer's
    y = nj.layer_norm(x)
    x64 = np.asarray(x, np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    _close(y, expected)


@pytest.mark.parametrize(
    "op, flax_module, shape",
    [
        pytest.param(nj.layer_norm, nn.LayerNorm(), (3, 0), id="layer"),
        pytest.param(nj.instance_norm, nn.InstanceNorm(), (2, 0, 3), id="instance"),
        pytest.param(functools.partial(nj.group_norm, num_groups=2),
                     nn.GroupNorm(num_groups=2), (2, 0, 4), id="group"),  # fmt: skip
    ],
)
def test_empty_reduced_axes_give_an_empty_output_as_flax_does(op, flax_module, shape):
    # Sampling a shift from an empty axis took an index modulo its size 0.
    x = jnp.zeros(shape)
    expected, _ = flax_module.init_with_output(jax.random.key(0), x)
    y = op(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert jax.grad(lambda x: jnp.sum(op(x)))(x).shape == shape


@pytest.mark.parametrize("fill", [np.nan, np.inf, -3e38])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_hidden_non_finite_entries_leave_the_gradient_of_the_rest_alone(fill, center):
    # Padding that holds NaN or inf, hidden by the mask and by a masked loss:
    # its x entered the derivative's products, and the transposes summed it
    # times a zero cotangent into NaN for every entry of its row (Flax too).
    x = _normal(72, (3, 9), loc=0.5, scale=2.0)
    lengths = np.array([9, 6, 3])
    mask = np.arange(9)[None, :] < lengths[:, None]
    cot = _normal(73, (3, 9))
    scale = _normal(76, (9,))
    op = nj.layer_norm if center else nj.rms_norm
    padded = np.where(mask, x, fill).astype(np.float32)

    def loss(v, scale):
        return jnp.sum(jnp.where(mask, op(v, scale, mask=mask), 0) * cot)

    grad, grad_scale = jax.grad(loss, argnums=(0, 1))(padded, scale)
    grad = np.asarray(grad, np.float64)
    reference_grad = ref.normalize_grad if center else ref.rms_normalize_grad
    expected_scale = np.zeros(9)
    for row, n in enumerate(lengths):
        visible, cot_row = x[row : row + 1, :n], cot[row : row + 1, :n]
        expected = reference_grad(visible, cot_row * scale[:n], -1, 1e-6)
        _close(grad[row, :n], expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(grad[row, n:], 0.0)
        normalized = (ref.layer_norm if center else ref.rms_norm)(visible)
        expected_scale[:n] += (cot_row * normalized)[0]
    _close(grad_scale, expected_scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, length", [(1024, 1024), (256, 4096)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_hidden_nan_entries_of_large_inputs_give_flaxs_gradient_of_zero_padding(
    center, dtype, rows, length
):
    # Inputs of 2^20 entries or more take the derivative's rewrites for the
    # CPU, which convert x again for terms of their own (and rows of more than
    # 1024 more of them). The reference is Flax's own layer on zero padding (on
    # NaN padding, Flax's is all NaN).
    x = _normal(77, (rows, length), loc=0.5)
    mask = np.arange(length)[None, :] < (np.arange(rows)[:, None] % length + 1)
    scale, cot = _normal(78, (length,)), _normal(79, (rows, length))
    op = nj.layer_norm if center else nj.rms_norm
    module = (nn.LayerNorm if center else nn.RMSNorm)(dtype=dtype, use_fast_variance=False)
    params = {"scale": scale} | ({"bias": np.zeros(length, np.float32)} if center else {})

    def masked_loss(y):
        return jnp.sum(jnp.where(mask, y, 0).astype(jnp.float32) * cot)

    def ours(v, s):
        return masked_loss(op(v, s, mask=mask))

    def flax(v, s):
        return masked_loss(module.apply({"params": params | {"scale": s}}, v, mask=mask))

    def padded(padding):
        return jnp.asarray(np.where(mask, x, padding), dtype)

    actual = jax.grad(ours, argnums=(0, 1))(padded(np.nan), scale)
    expected = jax.grad(flax, argnums=(0, 1))(padded(0.0), scale)
    # bfloat16 gradients of x: within a few of their units in the last place.
    tol = 1e-4 if dtype == np.float32 else 2e-2
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * np.abs(e).max())


def _flax_batch_norm_train(x, mask):
    module = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = module.init(jax.random.key(0), x)
    return module.apply(variables, x, mask=mask, mutable=["batch_stats"])[0]


@pytest.mark.parametrize(
    "op, flax_op",
    [
        pytest.param(
            lambda x, m: nj.instance_norm(x, mask=m),
            lambda x, m: nn.InstanceNorm(use_fast_variance=False).init_with_output(
                jax.random.key(0), x, mask=m)[0],
            id="instance",
        ),
        pytest.param(
            lambda x, m: nj.group_norm(x, num_groups=2, mask=m),
            lambda x, m: nn.GroupNorm(num_groups=2, use_fast_variance=False).init_with_output(
                jax.random.key(0), x, mask=m)[0],
            id="group",
        ),
        pytest.param(
            lambda x, m: nj.batch_norm(x, nj.batch_norm_state(4), training=True, mask=m)[0],
            _flax_batch_norm_train,
            id="batch",
        ),
    ],
)  # fmt: skip
def test_hidden_nan_entries_give_flaxs_gradient_of_zero_padding(op, flax_op):
    # The statistics and a masked loss see no hidden entry: NaN padding gives
    # the gradient that Flax's own layer gives for zero padding (its own for
    # NaN padding is NaN).
    x = _normal(74, (3, 5, 4), loc=1.0)
    mask = np.broadcast_to((np.arange(5)[None, :] < np.array([5, 3, 4])[:, None])[..., None],
                           x.shape)  # fmt: skip
    cot = _normal(75, (3, 5, 4))

    def grad(f, padding):
        padded = jnp.asarray(np.where(mask, x, padding).astype(np.float32))
        return jax.grad(lambda v: jnp.sum(jnp.where(mask, f(v, mask), 0) * cot))(padded)

    expected = np.asarray(grad(flax_op, 0.0))
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(np.asarray(grad(op, np.nan)), expected, rtol=1e-5, atol=1e-5)
