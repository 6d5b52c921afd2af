"""fold_batch_norm: the folded Dense/Conv layer equals BN(eval) after the original layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

import normjax as nj


def _normal(seed: int, shape, loc=0.0, scale=1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _bn_state(seed: int, features: int) -> nj.BatchNormState:
    rng = np.random.default_rng(seed)
    return nj.BatchNormState(
        jnp.asarray(rng.normal(0.5, 2.0, features), jnp.float32),
        jnp.asarray(rng.uniform(0.1, 5.0, features), jnp.float32),
        jnp.asarray(12, jnp.int32),
    )


def _bn_eval_after(z: np.ndarray, state, scale, bn_bias, epsilon) -> np.ndarray:
    return ref.batch_norm_eval(z, state.mean, state.var, scale, bn_bias, axis=-1,
                               epsilon=epsilon)


_OPTIONS = [
    pytest.param(True, True, id="bias-scale"),
    pytest.param(False, True, id="nobias-scale"),
    pytest.param(True, False, id="bias-noscale"),
    pytest.param(False, False, id="nobias-noscale"),
]


@pytest.mark.parametrize("with_bias, with_scale", _OPTIONS)
@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_folded_dense_equals_bn_eval_after_dense(with_bias, with_scale, epsilon):
    x = _normal(0, (7, 5))
    kernel = _normal(1, (5, 4))
    bias = _normal(2, (4,)) if with_bias else None
    state = _bn_state(3, 4)
    scale = _normal(4, (4,)) if with_scale else None
    bn_bias = _normal(5, (4,))

    folded_kernel, folded_bias = nj.fold_batch_norm(kernel, bias, state, scale, bn_bias,
                                                    epsilon=epsilon)
    assert folded_kernel.shape == kernel.shape
    assert folded_bias.shape == (4,)
    expected_kernel, expected_bias = ref.fold_batch_norm(
        kernel, bias, state.mean, state.var, scale, bn_bias, epsilon=epsilon
    )
    np.testing.assert_allclose(folded_kernel, expected_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded_bias, expected_bias, rtol=1e-5, atol=1e-5)

    expected = _bn_eval_after(ref.dense(x, kernel, bias), state, scale, bn_bias, epsilon)
    folded = np.asarray(x @ folded_kernel + folded_bias, np.float64)
    np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)
    # and equal to normjax's own eval-mode batch norm after the float32 layer
    z = x @ kernel + (0.0 if bias is None else bias)
    bn, _ = nj.batch_norm(z, state, scale, bn_bias, training=False, epsilon=epsilon)
    np.testing.assert_allclose(folded, np.asarray(bn, np.float64), rtol=1e-4, atol=1e-4)


def test_fold_default_epsilon_is_batch_norms():
    kernel, state = _normal(6, (3, 2)), _bn_state(7, 2)
    state = state._replace(var=jnp.asarray([1e-5, 2e-5]))  # epsilon matters here
    folded_kernel, _ = nj.fold_batch_norm(kernel, None, state, None, None)
    expected_kernel, _ = ref.fold_batch_norm(kernel, None, state.mean, state.var, None, None,
                                             epsilon=1e-5)
    np.testing.assert_allclose(folded_kernel, expected_kernel, rtol=1e-5)


@pytest.mark.parametrize("with_bias, with_scale", _OPTIONS)
def test_folded_conv_equals_bn_eval_after_conv(with_bias, with_scale):
    x = _normal(10, (2, 6, 5, 3))
    kernel = _normal(11, (3, 2, 3, 4))  # HWIO
    bias = _normal(12, (4,)) if with_bias else None
    state = _bn_state(13, 4)
    scale = _normal(14, (4,)) if with_scale else None
    bn_bias = _normal(15, (4,))

    folded_kernel, folded_bias = nj.fold_batch_norm(kernel, bias, state, scale, bn_bias)
    assert folded_kernel.shape == kernel.shape

    def conv(x, k, b):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if b is None else y + b

    expected = _bn_eval_after(ref.conv2d_nhwc_valid(x, kernel, bias), state, scale, bn_bias, 1e-5)
    folded = np.asarray(conv(x, folded_kernel, folded_bias), np.float64)
    np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)


def test_folded_flax_conv_and_batch_norm_layers():
    """Fold a flax Conv + flax BatchNorm pair; the folded Conv reproduces the pair."""
    x = _normal(20, (2, 5, 5, 3))
    conv = nn.Conv(4, (3, 3), padding="SAME")
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
    conv_params = conv.init(jax.random.key(0), x)["params"]
    z = conv.apply({"params": conv_params}, x)
    bn_vars = bn.init(jax.random.key(1), z)
    rng = np.random.default_rng(21)
    bn_vars = {
        "params": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                        "var": jnp.asarray(rng.uniform(0.2, 3.0, 4), jnp.float32)},
    }
    expected = np.asarray(bn.apply(bn_vars, z), np.float64)

    state = nj.BatchNormState(bn_vars["batch_stats"]["mean"], bn_vars["batch_stats"]["var"],
                              jnp.asarray(1, jnp.int32))
    kernel, bias = nj.fold_batch_norm(conv_params["kernel"], conv_params["bias"], state,
                                      bn_vars["params"]["scale"], bn_vars["params"]["bias"],
                                      epsilon=1e-3)
    folded = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(folded, np.float64), expected, rtol=1e-4, atol=1e-4)


def test_fold_under_jit():
    kernel, bias, state = _normal(30, (4, 3)), _normal(31, (3,)), _bn_state(32, 3)
    scale, bn_bias = _normal(33, (3,)), _normal(34, (3,))
    got = jax.jit(nj.fold_batch_norm)(kernel, bias, state, scale, bn_bias)
    expected = ref.fold_batch_norm(kernel, bias, state.mean, state.var, scale, bn_bias)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_fold_epsilon_not_positive():
    with pytest.raises(ValueError, match="epsilon"):
        nj.fold_batch_norm(jnp.ones((4, 3)), None, nj.batch_norm_state(3), None, None,
                           epsilon=0.0)


def test_check_grads_fold_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(40)
        kernel, bias = jnp.asarray(rng.normal(size=(3, 2))), jnp.asarray(rng.normal(size=2))
        scale, bn_bias = jnp.asarray(rng.normal(size=2)), jnp.asarray(rng.normal(size=2))
        mean, var = jnp.asarray(rng.normal(size=2)), jnp.asarray(rng.uniform(0.5, 2.0, 2))

        def fold(kernel, bias, mean, var, scale, bn_bias):
            state = nj.BatchNormState(mean, var, jnp.asarray(1, jnp.int32))
            return nj.fold_batch_norm(kernel, bias, state, scale, bn_bias)

        check_grads(jax.jit(fold), (kernel, bias, mean, var, scale, bn_bias), order=1,
                    modes=("fwd", "rev"))


def test_a_flax_batch_stats_dict_as_state_is_a_clear_error():
    stats = {"mean": jnp.zeros(4), "var": jnp.ones(4), "count": jnp.asarray(1)}
    with pytest.raises(TypeError, match=r"`state` must be a BatchNormState, got dict"):
        nj.fold_batch_norm(jnp.ones((3, 4)), None, stats, None, None)


def test_a_pytorch_layout_kernel_is_an_error_naming_the_kernel():
    # nn.Linear(10, 6).weight is (6, 10): its last axis is the input.
    state = nj.batch_norm_state(6)
    with pytest.raises(ValueError, match=r"`kernel` must hold the output features.*\(6, 10\)"):
        nj.fold_batch_norm(jnp.ones((6, 10)), None, state, None, None)
    # Moved as the message says, it folds: the Flax layout's reference.
    weight = np.random.default_rng(5).normal(size=(6, 10, 3, 3))
    kernel = jnp.moveaxis(jnp.asarray(weight, jnp.float32), (0, 1), (-1, -2))
    assert kernel.shape == (3, 3, 10, 6)
    folded, _ = nj.fold_batch_norm(kernel, None, state, None, None)
    expected, _ = ref.fold_batch_norm(np.transpose(weight, (2, 3, 1, 0)), None, np.zeros(6),
                                      np.ones(6), None, None, epsilon=1e-5)
    np.testing.assert_allclose(folded, expected, rtol=1e-6)


def test_fold_under_rank_promotion_raise():
    # Users who set jax_numpy_rank_promotion="raise" get the same fold: the
    # per-output multiplier is broadcast explicitly.
    kernel = jnp.asarray(np.random.default_rng(91).normal(size=(3, 3, 2, 4)), jnp.float32)
    mean, var = jnp.asarray([0.5, -1.0, 2.0, 0.0]), jnp.asarray([1.0, 4.0, 0.25, 2.0])
    state = nj.BatchNormState(mean, var, jnp.asarray(1, jnp.int32))
    scale, bn_bias = jnp.asarray([1.0, 2.0, -1.0, 0.5]), jnp.asarray([0.0, 1.0, 2.0, 3.0])
    expected = nj.fold_batch_norm(kernel, None, state, scale, bn_bias)
    with jax.numpy_rank_promotion("raise"):
        actual = nj.fold_batch_norm(kernel, None, state, scale, bn_bias)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)
    inv = np.asarray(scale) / np.sqrt(np.asarray(var, np.float64) + 1e-5)
    np.testing.assert_allclose(actual[0], np.asarray(kernel) * inv, rtol=1e-6)
    np.testing.assert_allclose(actual[1], (0 - np.asarray(mean)) * inv + np.asarray(bn_bias),
                               rtol=1e-6)
