"""batch_norm and batch_renorm against numpy float64 closed forms (tests/reference.py)."""

from __future__ import annotations

import functools

import chex
import jax
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
    """The message must show the expected and the given shape."""
    message = str(excinfo.value)
    for shape in shapes:
        assert str(tuple(shape)) in message or str(list(shape)) in message, message


def _state(mean, var, count) -> nj.BatchNormState:
    return nj.BatchNormState(
        jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), jnp.asarray(count, jnp.int32)
    )


# ----------------------------------------------------------------------------- state


def test_initial_state():
    state = nj.batch_norm_state((3, 4))
    assert state._fields == ("mean", "var", "count")
    chex.assert_shape([state.mean, state.var], (3, 4))
    chex.assert_type([state.mean, state.var], jnp.float32)
    np.testing.assert_array_equal(state.mean, np.zeros((3, 4)))
    np.testing.assert_array_equal(state.var, np.ones((3, 4)))
    chex.assert_shape(state.count, ())
    chex.assert_type(state.count, jnp.int32)
    assert int(state.count) == 0
    chex.assert_shape(nj.batch_norm_state(5).mean, (5,))


# ------------------------------------------------------------------ training vs closed form


@st.composite
def _shape_and_feature_axes(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=ndim, max_size=ndim)))
    n_features = draw(st.integers(1, ndim - 1))
    feature_axes = sorted(draw(st.permutations(range(ndim)))[:n_features])
    negative = draw(st.booleans())
    axes = [a - ndim if negative else a for a in feature_axes]
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else tuple(axes)
    return shape, axis, feature_axes


@settings(max_examples=10, deadline=None)
@given(
    case=_shape_and_feature_axes(),
    with_scale=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_training_and_eval_match_reference(case, with_scale, with_bias, seed):
    shape, axis, feature_axes = case
    feature_shape = tuple(shape[a] for a in feature_axes)
    x = _normal(seed, shape, loc=3.0, scale=2.0)
    scale = _normal(seed + 1, feature_shape) if with_scale else None
    bias = _normal(seed + 2, feature_shape) if with_bias else None
    state = nj.batch_norm_state(feature_shape)

    train = jax.jit(functools.partial(nj.batch_norm, training=True, axis=axis, momentum=0.9))
    y, new_state = train(x, state, scale, bias)
    chex.assert_shape(y, shape)
    chex.assert_type(y, jnp.float32)
    _close(y, ref.batch_norm_train(x, scale, bias, axis=axis, epsilon=1e-5))
    mean, var, _ = ref.batch_stats(x, axis=axis)
    # debias=True: after the first update the state holds that batch's statistics
    _close(new_state.mean, mean)
    _close(new_state.var, var)
    assert int(new_state.count) == 1

    evaluate = jax.jit(functools.partial(nj.batch_norm, training=False, axis=axis))
    y_eval, eval_state = evaluate(x, new_state, scale, bias)
    _close(
        y_eval,
        ref.batch_norm_eval(x, new_state.mean, new_state.var, scale, bias, axis=axis),
    )
    chex.assert_trees_all_equal(eval_state, new_state)


def test_nchw_and_nhwc_via_axis():
    x_nchw = _normal(0, (3, 4, 5, 2), loc=-1.0, scale=3.0)
    scale, bias = _normal(1, (4,)), _normal(2, (4,))
    expected = ref.batch_norm_train(x_nchw, scale, bias, axis=1)

    y_nchw, s_nchw = nj.batch_norm(x_nchw, nj.batch_norm_state(4), scale, bias, training=True,
                                   axis=1)
    _close(y_nchw, expected)

    x_nhwc = np.transpose(x_nchw, (0, 2, 3, 1))
    y_nhwc, s_nhwc = nj.batch_norm(x_nhwc, nj.batch_norm_state(4), scale, bias, training=True,
                                   axis=-1)
    _close(y_nhwc, np.transpose(expected, (0, 2, 3, 1)))
    mean, var, _ = ref.batch_stats(x_nchw, axis=1)
    for s in (s_nchw, s_nhwc):
        _close(s.mean, mean)
        _close(s.var, var)


def test_multiple_feature_axes():
    x = _normal(3, (4, 3, 5, 2), loc=2.0)
    scale, bias = _normal(4, (3, 2)), _normal(5, (3, 2))
    y, state = nj.batch_norm(x, nj.batch_norm_state((3, 2)), scale, bias, training=True,
                             axis=(1, 3))
    _close(y, ref.batch_norm_train(x, scale, bias, axis=(1, 3)))
    mean, var, _ = ref.batch_stats(x, axis=(1, 3))
    chex.assert_shape([state.mean, state.var], (3, 2))
    _close(state.mean, mean)
    _close(state.var, var)


def test_training_with_custom_epsilon():
    x = _normal(6, (5, 3), scale=0.01)
    y, _ = nj.batch_norm(x, nj.batch_norm_state(3), training=True, epsilon=1e-3)
    _close(y, ref.batch_norm_train(x, epsilon=1e-3))


# ---------------------------------------------------------------------- running statistics


def _batches(num_steps: int, seed: int = 0) -> np.ndarray:
    # a drifting mean and spread make every step's weight visible in the result
    rng = np.random.default_rng(seed)
    steps = np.arange(num_steps, dtype=np.float64)[:, None, None]
    noise = rng.normal(size=(num_steps, 6, 3))
    return (np.sin(steps / 7.0) * 3.0 + (1.0 + 0.5 * np.cos(steps / 5.0)) * noise).astype(
        np.float32
    )


def _train_states(xs: np.ndarray, **kwargs) -> nj.BatchNormState:
    """Every intermediate state of len(xs) training steps, stacked along axis 0."""

    def step(state, x):
        _, state = nj.batch_norm(x, state, training=True, **kwargs)
        return state, state

    _, states = jax.jit(lambda xs: jax.lax.scan(step, nj.batch_norm_state(3), xs))(xs)
    return states


@pytest.mark.parametrize(
    "momentum, debias, unbiased",
    [
        (0.9, True, False),
        (0.99, True, False),
        (0.9, False, False),
        (0.99, False, False),
        (None, True, False),
        (0.9, True, True),
        (0.99, False, True),
        (None, True, True),
    ],
)
def test_running_statistics_closed_form_after_1_10_100_steps(momentum, debias, unbiased):
    xs = _batches(100)
    states = _train_states(xs, momentum=momentum, debias=debias, unbiased_running_var=unbiased)
    stats = [ref.batch_stats(x) for x in xs]
    batch_means = [s[0] for s in stats]
    n = xs.shape[1]
    batch_vars = [s[1] * (n / (n - 1) if unbiased else 1.0) for s in stats]
    for t in (1, 10, 100):
        expected_mean = ref.running_average(batch_means[:t], momentum, debias=debias, initial=0.0)
        expected_var = ref.running_average(batch_vars[:t], momentum, debias=debias, initial=1.0)
        _close(states.mean[t - 1], expected_mean, rtol=1e-5, atol=1e-6)
        _close(states.var[t - 1], expected_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(states.count, np.arange(1, 101))


@pytest.mark.parametrize("dtype, momentum", [(jnp.bfloat16, 0.999), (jnp.float16, 0.9999),
                                             (jnp.float32, 1 - 3e-8), (jnp.bfloat16, 0.99)])
def test_low_precision_states_average_with_the_exact_momentum(dtype, momentum):
    # The debiased weight (1 - m) / (1 - m^t) took m rounded to the state's
    # dtype: 1 for bfloat16 0.999, so 0 / 0 and a NaN running state from the
    # second step; 0.98828 for bfloat16 0.99. The float64 closed form of the
    # debiased average, rounded to the state's dtype, as reference.
    xs = _batches(20, seed=3)

    def step(state, x):
        _, state = nj.batch_norm(x, state, training=True, momentum=momentum)
        return state, state

    _, states = jax.jit(lambda xs: jax.lax.scan(step, nj.batch_norm_state(3, dtype), xs))(xs)
    means = [ref.batch_stats(x)[0] for x in xs]
    resolution = float(jnp.finfo(dtype).eps)
    for t in (2, 5, 20):
        expected = ref.running_average(means[:t], momentum, debias=True, initial=0.0)
        _close(np.asarray(states.mean[t - 1], np.float64), expected,
               rtol=resolution, atol=resolution)


def test_unbiased_running_var_does_not_change_the_normalization():
    x = _normal(7, (4, 3), loc=1.0)
    y, state = nj.batch_norm(x, nj.batch_norm_state(3), training=True, unbiased_running_var=True)
    _close(y, ref.batch_norm_train(x))
    _, var, _ = ref.batch_stats(x)
    _close(state.var, var * 4 / 3)


def test_eval_right_after_one_debiased_step_uses_that_steps_statistics():
    x = _normal(8, (6, 2, 3), loc=5.0, scale=4.0)
    scale, bias = _normal(9, (3,)), _normal(10, (3,))
    y_train, state = nj.batch_norm(x, nj.batch_norm_state(3), scale, bias, training=True,
                                   momentum=0.99)
    y_eval, _ = nj.batch_norm(x, state, scale, bias, training=False)
    _close(y_eval, np.asarray(y_train, np.float64), rtol=1e-5, atol=1e-5)
    _close(y_eval, ref.batch_norm_train(x, scale, bias))


def test_eval_leaves_state_unchanged_and_uses_it():
    state = _state([1.0, -2.0, 0.5], [4.0, 0.25, 1.0], 7)
    x = _normal(11, (5, 3))
    scale, bias = _normal(12, (3,)), _normal(13, (3,))
    y, same = nj.batch_norm(x, state, scale, bias, training=False, momentum=0.5)
    chex.assert_trees_all_equal(same, state)
    _close(y, ref.batch_norm_eval(x, state.mean, state.var, scale, bias))
    # a single example is fine in evaluation
    y1, _ = nj.batch_norm(x[:1], state, scale, bias, training=False)
    _close(y1, ref.batch_norm_eval(x[:1], state.mean, state.var, scale, bias))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_keeps_state_and_count(bad):
    state = _train_states(_batches(3))
    state = jax.tree.map(lambda a: a[-1], state)
    x = _normal(14, (4, 3))
    x[2, 1] = bad
    y, new_state = nj.batch_norm(x, state, training=True)
    chex.assert_trees_all_equal(new_state, state)
    # nothing hidden: the poisoned feature shows NaN, the others are normalized
    assert np.isnan(np.asarray(y)[:, 1]).all()
    clean = np.delete(x, 1, axis=1)
    _close(np.delete(np.asarray(y), 1, axis=1), ref.batch_norm_train(clean))


def test_non_finite_batch_updates_state_when_skip_disabled():
    x = _normal(15, (4, 3))
    x[0, 0] = np.nan
    _, state = nj.batch_norm(x, nj.batch_norm_state(3), training=True, skip_nonfinite=False)
    assert int(state.count) == 1
    assert np.isnan(np.asarray(state.mean)[0])


def test_float16_state_takes_a_batch_whose_mean_plus_variance_overflows_float16():
    # Mean 3e4 and variance 4e4 each fit float16 (max 65504); their sum does not.
    # The finiteness check used to add them and dropped this finite batch.
    x = np.array([[30000.0 - 200.0], [30000.0 + 200.0]], np.float32)
    _, state = nj.batch_norm(x, nj.batch_norm_state(1, jnp.float16), training=True)
    x64 = x.astype(np.float64)
    assert int(state.count) == 1
    np.testing.assert_array_equal(np.asarray(state.mean), x64.mean(0).astype(np.float16))
    np.testing.assert_array_equal(np.asarray(state.var), x64.var(0).astype(np.float16))


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_a_feature_the_mask_hides_keeps_its_running_values(skip_nonfinite):
    # Its batch statistics read 0/0 -> 0; the state used to move toward them.
    state = _state([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 10)
    x = _normal(71, (8, 3), loc=5.0)
    mask = np.ones((8, 3), bool)
    mask[:, 2] = False
    _, new = nj.batch_norm(x, state, training=True, mask=mask, momentum=0.5,
                           skip_nonfinite=skip_nonfinite)  # fmt: skip
    if skip_nonfinite:  # the one count waits for every feature
        chex.assert_trees_all_equal(new, state)
        return
    w = 0.5 / (1 - 0.5**11)
    mean, var, _ = ref.batch_stats(x[:, :2])
    _close(np.asarray(new.mean)[:2], (1 - w) * 1.0 + w * mean)
    _close(np.asarray(new.var)[:2], (1 - w) * 2.0 + w * var)
    np.testing.assert_array_equal(np.asarray(new.mean)[2], 1.0)
    np.testing.assert_array_equal(np.asarray(new.var)[2], 2.0)
    assert int(new.count) == 11


def test_count_rises_by_one_per_training_call():
    state = nj.batch_norm_state(3)
    counts = []
    for i, training in enumerate([True, False, True, True, False]):
        _, state = nj.batch_norm(_normal(20 + i, (4, 3)), state, training=training)
        counts.append(int(state.count))
    assert counts == [1, 1, 2, 3, 3]


# -------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_shape", [(8, 3), (8, 1), (8, 2, 3)])
@pytest.mark.parametrize("fill", [None, np.nan, 1e30])
def test_mask_statistics_ignore_masked_values(mask_shape, fill):
    x = _normal(30, (8, 2, 3), loc=1.0, scale=2.0)
    rng = np.random.default_rng(31)
    if len(mask_shape) == 2:
        mask = rng.random(mask_shape) < 0.6
        mask[:2] = True  # at least two valid rows for every feature
        mask = mask[:, None, :]
    else:
        mask = rng.random(mask_shape) < 0.6
        mask[:2] = True
    scale, bias = _normal(32, (3,)), _normal(33, (3,))
    filled = x.copy()
    full_mask = np.broadcast_to(mask, x.shape)
    if fill is not None:
        filled[~full_mask] = fill

    y, state = nj.batch_norm(filled, nj.batch_norm_state(3), scale, bias, training=True,
                             mask=mask, unbiased_running_var=True)
    expected = ref.batch_norm_train(x, scale, bias, mask=mask)
    y = np.asarray(y, np.float64)
    _close(y[full_mask], expected[full_mask])
    # the output is computed at masked positions too, from the masked statistics
    expected_filled = ref.batch_norm_train(filled, scale, bias, mask=mask)
    if fill is None or np.isfinite(fill):
        _close(y[~full_mask], expected_filled[~full_mask], rtol=1e-5, atol=1e-5)
    mean, var, count = ref.batch_stats(x, mask=mask)
    _close(state.mean, mean)
    _close(state.var, var * count / (count - 1))
    assert int(state.count) == 1


def test_eval_with_mask_normalizes_every_entry():
    state = _state([1.0, 2.0], [2.0, 3.0], 4)
    x = _normal(34, (3, 2))
    mask = np.array([True, False, True])[:, None]
    y, same = nj.batch_norm(x, state, training=False, mask=mask)
    _close(y, ref.batch_norm_eval(x, state.mean, state.var))
    chex.assert_trees_all_equal(same, state)


# --------------------------------------------------------------------------- batch renorm


def test_renorm_with_unit_r_max_and_zero_d_max_is_batch_norm():
    state = _state([0.3, -4.0, 2.0], [0.1, 9.0, 1.5], 3)
    x = _normal(40, (6, 2, 3), loc=1.0, scale=2.0)
    scale, bias = _normal(41, (3,)), _normal(42, (3,))
    kwargs = dict(training=True, momentum=0.9)
    y_bn, s_bn = nj.batch_norm(x, state, scale, bias, **kwargs)
    y_rn, s_rn = nj.batch_renorm(x, state, scale, bias, r_max=1.0, d_max=0.0, **kwargs)
    _close(y_rn, np.asarray(y_bn, np.float64), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(s_rn, s_bn, rtol=1e-6, atol=1e-7)
    _close(y_rn, ref.batch_norm_train(x, scale, bias))


@pytest.mark.parametrize(
    "running_mean, running_var",
    [
        ([1.1, 0.9, 1.0], [4.2, 3.5, 4.0]),  # close to the batch: no clipping
        ([-30.0, 40.0, 1.0], [0.01, 1e4, 4.0]),  # far: r and d clip
    ],
)
@pytest.mark.parametrize("r_max, d_max", [(3.0, 5.0), (1.5, 0.5)])
def test_renorm_matches_ioffe_2017(running_mean, running_var, r_max, d_max):
    state = _state(running_mean, running_var, 5)
    x = _normal(43, (2, 3, 8), loc=1.0, scale=2.0)  # NCL layout, features on axis 1
    scale, bias = _normal(44, (3,)), _normal(45, (3,))
    m = 0.9
    y, new_state = nj.batch_renorm(x, state, scale, bias, training=True, r_max=r_max,
                                   d_max=d_max, axis=1, momentum=m)
    expected = ref.batch_renorm_train(x, state.mean, state.var, scale, bias, r_max=r_max,
                                      d_max=d_max, axis=1)
    _close(y, expected, rtol=1e-5, atol=1e-4)
    # running update: the 6th debiased update, w = (1 - m) / (1 - m^6)
    mean, var, _ = ref.batch_stats(x, axis=1)
    w = (1 - m) / (1 - m**6)
    _close(new_state.mean, np.asarray(state.mean, np.float64) * (1 - w) + w * mean)
    _close(new_state.var, np.asarray(state.var, np.float64) * (1 - w) + w * var, rtol=1e-5)
    assert int(new_state.count) == 6

    y_eval, same = nj.batch_renorm(x, state, scale, bias, training=False, axis=1)
    chex.assert_trees_all_equal(same, state)
    _close(y_eval, ref.batch_norm_eval(x, state.mean, state.var, scale, bias, axis=1),
           rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_renorm_keeps_the_precision_of_data_far_from_zero(masked):
    # mu_B - mu is 0.3 sigma here; from mu_B rounded to float32 (1e4 to 2^-10)
    # d, and every output, would be off by up to 3e-4.
    state = _state([1e4 + 0.3] * 4, [1.0] * 4, 5)
    x = _normal(47, (64, 4), loc=1e4)
    mask = np.random.default_rng(48).random((64, 1)) < 0.8 if masked else None
    y, _ = nj.batch_renorm(x, state, training=True, mask=mask)
    expected = ref.batch_renorm_train(x, state.mean, state.var, r_max=3.0, d_max=5.0, mask=mask)
    counted = np.ones(64, bool) if mask is None else mask[:, 0]
    _close(np.asarray(y)[counted], expected[counted], rtol=0, atol=2e-6)


def test_renorm_of_an_entry_near_float32s_largest_is_finite():
    # (x - mu_B) / sigma_B * r + d: with d moved into the mean instead,
    # x - (mu_B - d sigma_B / r) overflows for x = 3e38 (r = 3, d = 5 here).
    state = _state([0.0], [1.0], 1)
    x = _normal(49, (16, 1))
    x[4, 0] = 3e38
    scale, bias = np.array([0.5], np.float32), np.array([2.0], np.float32)
    y, _ = nj.batch_renorm(x, state, scale, bias, training=True)
    _close(y, ref.batch_renorm_train(x, state.mean, state.var, scale, bias, r_max=3.0,
                                     d_max=5.0), rtol=1e-5, atol=1e-5)


def _dead_unit_next_to_a_constant_one():
    # An all-zero feature (a dead ReLU) beside a constant one, which sends the
    # statistics down the exact two-pass path: autodiff through its rsqrt of a
    # zero sum of squares gave the zero feature NaN gradients.
    return np.stack([np.zeros(6), np.full(6, 3.0), _normal(62, (6,))], 1).astype(np.float32)


@pytest.mark.parametrize(
    "make_x",
    [
        pytest.param(_dead_unit_next_to_a_constant_one, id="dead-unit"),
        # var**-1.5 underflowed float32 here and the xhat term was lost (20-50% off).
        pytest.param(lambda: _normal(63, (6, 3), scale=1e14), id="std-1e14"),
    ],
)
def test_renorm_input_gradient_matches_the_closed_form(make_x):
    x = make_x()
    state = _state([0.5, 2.0, -0.2], [2.0, 0.5, 1.5], 3)
    scale, cot = _normal(64, (3,)), _normal(65, (6, 3))

    def loss(x):
        return jnp.sum(nj.batch_renorm(x, state, scale, training=True)[0] * cot)

    gx = jax.grad(loss)(x)
    # r and d are constants to the gradient: it is batch norm's, times r * scale.
    x64 = x.astype(np.float64)
    sigma_b = np.sqrt(x64.var(0) + 1e-5)
    sigma = np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
    r = np.clip(sigma_b / sigma, 1 / 3.0, 3.0)
    expected = ref.normalize_grad(x64, cot * (r * scale.astype(np.float64)), 0, 1e-5)
    assert np.isfinite(np.asarray(gx)).all()
    _close(gx, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_renorm_masked_statistics_ignore_nan():
    state = _state([0.5, 0.5, 0.5], [2.0, 2.0, 2.0], 2)
    x = _normal(46, (6, 3))
    mask = np.array([True, True, False, True, False, True])[:, None]
    filled = np.where(mask, x, np.nan).astype(np.float32)
    y, new_state = nj.batch_renorm(filled, state, training=True, mask=mask)
    expected = ref.batch_renorm_train(x, state.mean, state.var, r_max=3.0, d_max=5.0, mask=mask)
    _close(np.asarray(y)[mask[:, 0]], expected[mask[:, 0]])
    assert int(new_state.count) == 3


# -------------------------------------------------------------------------- jit, vmap, grad


def test_jit_matches_reference():
    x = _normal(50, (3, 4, 2), loc=2.0)
    step = jax.jit(functools.partial(nj.batch_norm, training=True, axis=1, momentum=0.8))
    y, state = step(x, nj.batch_norm_state(4))
    _close(y, ref.batch_norm_train(x, axis=1))
    _close(state.mean, ref.batch_stats(x, axis=1)[0])


def test_vmap_over_independent_batches():
    xs = _normal(51, (5, 4, 3), loc=1.0)
    states = jax.vmap(lambda _: nj.batch_norm_state(3))(jnp.arange(5))
    ys, new_states = jax.jit(jax.vmap(functools.partial(nj.batch_norm, training=True)))(
        xs, states
    )
    for i in range(5):
        _close(ys[i], ref.batch_norm_train(xs[i]))
        _close(new_states.mean[i], ref.batch_stats(xs[i])[0])
    np.testing.assert_array_equal(new_states.count, np.ones(5))


def test_grad_matches_closed_form_backward():
    x = _normal(52, (6, 3), loc=1.0, scale=2.0)
    scale, bias = _normal(53, (3,)), _normal(54, (3,))
    cot = _normal(55, (6, 3))

    def loss(x, scale, bias):
        y, _ = nj.batch_norm(x, nj.batch_norm_state(3), scale, bias, training=True)
        return jnp.sum(y * cot)

    gx, gscale, gbias = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    x_hat = ref.batch_norm_train(x)
    _close(gx, ref.normalize_grad(x, cot * scale.astype(np.float64), 0, 1e-5), atol=1e-4)
    _close(gscale, (cot * x_hat).sum(0), atol=1e-4)
    _close(gbias, cot.astype(np.float64).sum(0), atol=1e-5)


def test_check_grads_batch_norm_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(_normal(56, (5, 2, 3), dtype=np.float64))
        scale = jnp.asarray(_normal(57, (2,), dtype=np.float64))
        bias = jnp.asarray(_normal(58, (2,), dtype=np.float64))
        state = nj.batch_norm_state(2, jnp.float64)

        def train(x, scale, bias):
            y, new_state = nj.batch_norm(x, state, scale, bias, training=True, axis=1)
            return y, new_state.mean, new_state.var

        # second order through the batch statistics; first order in both modes
        check_grads(jax.jit(train), (x, scale, bias), order=2, modes=("rev",))
        check_grads(jax.jit(train), (x, scale, bias), order=1, modes=("fwd",))

        def evaluate(x, scale, bias):
            return nj.batch_norm(x, state, scale, bias, training=False, axis=1)[0]

        check_grads(jax.jit(evaluate), (x, scale, bias), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("loc", [0.0, 10.0])  # the one-pass and the two-pass statistics
def test_check_grads_batch_norm_channels_last_float64(loc):
    # Sets off the last axis: the derivative reduces g * (x - s) for a sample s
    # of each set (see _stats.standardize); loc=10 takes the two-pass branch.
    with jax.enable_x64(True):
        x = jnp.asarray(loc + _normal(59, (4, 3, 2), dtype=np.float64))
        scale = jnp.asarray(_normal(60, (2,), dtype=np.float64))
        bias = jnp.asarray(_normal(61, (2,), dtype=np.float64))
        state = nj.batch_norm_state(2, jnp.float64)

        def train(x, scale, bias):
            return nj.batch_norm(x, state, scale, bias, training=True)[0]

        check_grads(jax.jit(train), (x, scale, bias), order=2, modes=("rev",))
        check_grads(jax.jit(train), (x, scale, bias), order=1, modes=("fwd",))


def test_check_grads_batch_renorm_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(_normal(59, (6, 3), dtype=np.float64))
        scale = jnp.asarray(_normal(60, (3,), dtype=np.float64))
        bias = jnp.asarray(_normal(61, (3,), dtype=np.float64))
        # r and d are stop_gradient constants; finite differences agree only where they
        # are locally constant, i.e. clipped: running var far off, running mean far off
        state = nj.BatchNormState(
            jnp.array([50.0, -500.0, 40.0]), jnp.array([1e-3, 1e3, 1e-3]), jnp.array(4, jnp.int32)
        )

        def train(x, scale, bias):
            return nj.batch_renorm(x, state, scale, bias, training=True)[0]

        check_grads(jax.jit(train), (x, scale, bias), order=1, modes=("fwd", "rev"))


# -------------------------------------------------------------------------------- errors


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="int32"):
        nj.batch_norm(jnp.ones((4, 3), jnp.int32), nj.batch_norm_state(3), training=True)
    with pytest.raises(TypeError, match="int32"):
        nj.batch_renorm(jnp.ones((4, 3), jnp.int32), nj.batch_norm_state(3), training=True)


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match="axis"):
        nj.batch_norm(jnp.ones((4, 3)), nj.batch_norm_state(3), training=True, axis=axis)


def test_state_shape_mismatch_names_shapes():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="state") as excinfo:
        nj.batch_norm(x, nj.batch_norm_state(5), training=True)
    _assert_names_shapes(excinfo, (3,), (5,))
    with pytest.raises(ValueError, match="state"):
        nj.batch_renorm(x, nj.batch_norm_state(5), training=False)


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_scale_or_bias_shape_mismatch_names_shapes(name):
    x = jnp.ones((4, 3, 2))
    kwargs = {name: jnp.ones((2,))}
    with pytest.raises(ValueError, match=name) as excinfo:
        nj.batch_norm(x, nj.batch_norm_state(3), training=True, axis=1, **kwargs)
    _assert_names_shapes(excinfo, (3,), (2,))
    with pytest.raises(ValueError, match=name):
        nj.batch_renorm(x, nj.batch_norm_state(3), training=True, axis=1, **kwargs)


def test_mask_not_broadcastable_names_shapes():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="mask") as excinfo:
        nj.batch_norm(x, nj.batch_norm_state(3), training=True, mask=jnp.ones((4, 2), bool))
    _assert_names_shapes(excinfo, (4, 3), (4, 2))


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1, float("nan"), True, "0.9"])
def test_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match="momentum"):
        nj.batch_norm(jnp.ones((4, 3)), nj.batch_norm_state(3), training=True, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        nj.batch_renorm(jnp.ones((4, 3)), nj.batch_norm_state(3), training=True,
                        momentum=momentum)


def test_momentum_1_is_allowed_in_evaluation_only():
    # Evaluation does not use momentum: a config with 1 can run inference, as
    # in Flax; the running statistics are the stored ones.
    x = _normal(72, (4, 3))
    state = nj.BatchNormState(jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, 4.0, 0.25]), 3)
    y, _ = nj.batch_norm(x, state, training=False, momentum=1.0)
    _close(y, (x - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var) + 1e-5))
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\] or None, got 1.5"):
        nj.batch_norm(x, state, training=False, momentum=1.5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_a_floating_count_counts_past_its_dtypes_integers(dtype):
    # A bfloat16 count stopped at 256 (256 + 1 rounds to 256) and kept the
    # debiasing weight of step 257: a running mean of 9.9 for the exact 7.2
    # after 500 batches of mean 1 and 500 of mean 11 (momentum 0.999). It
    # counts in float32 now. The float64 debiased average, as reference.
    batch = jnp.asarray([[0.0], [2.0], [0.0], [2.0]])
    step = jax.jit(lambda s, x: nj.batch_norm(x, s, training=True, momentum=0.999)[1])
    state = nj.BatchNormState(jnp.zeros(1), jnp.ones(1), jnp.zeros((), dtype))
    for i in range(600):
        state = step(state, batch + 10.0 * (i >= 300))
    assert state.count == 600 and state.count.dtype == jnp.float32
    expected = ref.running_average([1.0] * 300 + [11.0] * 300, 0.999, debias=True, initial=0.0)
    _close(state.mean, np.full(1, expected), rtol=1e-5, atol=0)


def test_momentum_zero_is_allowed_and_takes_the_batch():
    x = _normal(62, (4, 3))
    _, state = nj.batch_norm(x, nj.batch_norm_state(3), training=True, momentum=0.0,
                             debias=False)
    _close(state.mean, ref.batch_stats(x)[0])


@pytest.mark.parametrize("epsilon", [0.0, -1e-5, float("nan"), float("inf"), "1e-5"])
def test_epsilon_not_positive(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        nj.batch_norm(jnp.ones((4, 3)), nj.batch_norm_state(3), training=True, epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        nj.batch_renorm(jnp.ones((4, 3)), nj.batch_norm_state(3), training=True,
                        epsilon=epsilon)


def test_epsilon_below_float32s_smallest_normal_number_is_a_value_error():
    # 1e-38 is a subnormal, 0 on the CPU: a constant channel's running variance
    # of 0 gave 1 / sqrt(0 + 0) and NaN outputs; at float32's smallest normal
    # number the constant channel normalizes to the bias.
    x, state = jnp.ones((4, 3)), nj.BatchNormState(jnp.ones(3), jnp.zeros(3), jnp.asarray(1))
    with pytest.raises(ValueError, match="`epsilon` must be a finite number of at least"):
        nj.batch_norm(x, state, training=False, epsilon=1e-38)
    tiny = float(jnp.finfo(jnp.float32).tiny)
    y, _ = nj.batch_norm(x, state, bias=jnp.full(3, 0.5), training=False, epsilon=tiny)
    np.testing.assert_array_equal(y, 0.5)
    with pytest.raises(ValueError, match="`epsilon`"):
        nj.layer_norm(x, epsilon=1e-46)


@pytest.mark.parametrize("name", ["debias", "unbiased_running_var", "skip_nonfinite"])
@pytest.mark.parametrize("op", ["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("training", [True, False])
def test_boolean_options_must_be_bools(name, op, training):
    x, state = _normal(66, (6, 3)), nj.batch_norm_state(3)
    for value in ("False", None, 1):
        with pytest.raises(TypeError, match=f"`{name}` must be a Python bool, got {value!r}"):
            getattr(nj, op)(x, state, training=training, **{name: value})


def test_scale_and_bias_as_lists_equal_arrays():
    x, state = _normal(67, (6, 3)), nj.batch_norm_state(3)
    scale, bias = [1.0, 2.0, 0.5], [0.0, -1.0, 3]
    for op in (nj.batch_norm, nj.batch_renorm):
        expected = op(x, state, jnp.asarray(scale), jnp.asarray(bias, jnp.float32), training=True)
        chex.assert_trees_all_equal(op(x, state, scale, bias, training=True), expected)
    with pytest.raises(TypeError, match="`scale` must be an array of numbers"):
        nj.batch_norm(x, state, [None, None, None], training=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_integer_scale_and_bias_differentiate_as_floats(dtype):
    # An integer scale's tangent is float0: the bfloat16 evaluation derivative
    # failed on it ("setting an array element with a sequence").
    x = _normal(71, (6, 4)).astype(dtype)
    mean, var = jnp.asarray([0.5, -1.0, 2.0, 0.0]), jnp.asarray([1.0, 4.0, 0.25, 2.0])
    state = nj.BatchNormState(mean, var, jnp.asarray(3, jnp.int32))
    scale, bias = jnp.asarray([1, 2, 3, -1], jnp.int32), jnp.asarray([0, 1, -2, 5], jnp.int32)
    g = np.random.default_rng(72).normal(size=(6, 4))

    def loss(x):
        y = nj.batch_norm(x, state, scale, bias, training=False)[0]
        return jnp.sum(y.astype(jnp.float32) * g)

    dx = np.asarray(jax.grad(loss)(x), np.float64)
    # y = (x - mean) * scale / sqrt(var + eps) + bias: dx = g * scale / sqrt(var + eps).
    expected = g * np.asarray(scale) / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
    np.testing.assert_allclose(dx, expected, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_complex_scale_or_bias_is_a_type_error_naming_it():
    # It was cast to the real output with only a (hidden) warning.
    x, state = _normal(73, (6, 3)), nj.batch_norm_state(3)
    with pytest.raises(TypeError, match="`scale` must be real, got dtype complex64"):
        nj.batch_norm(x, state, jnp.asarray([1 + 2j, 1j, 2], jnp.complex64), training=True)
    with pytest.raises(TypeError, match="`bias` must be real"):
        nj.layer_norm(x, None, jnp.asarray([1j, 0, 0], jnp.complex64))


@pytest.mark.parametrize("box", [np.float32, jnp.float32, jnp.asarray, np.asarray])
def test_concrete_scalar_hyperparameters_equal_python_numbers(box):
    # Flax's BatchNorm takes momentum=jnp.float32(0.9); so do these, as the
    # Python number they hold.
    x = _normal(64, (8, 3))
    state = nj.BatchNormState(jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, 4.0, 0.25]),
                              jnp.asarray(3, jnp.int32))
    for op, extra in ((nj.batch_norm, {}), (nj.batch_renorm, {"r_max": 2.0, "d_max": 0.5})):
        boxed = {k: box(v) for k, v in extra.items()}
        expected = op(x, state, training=True, momentum=0.9, epsilon=1e-3, **extra)
        actual = op(x, state, training=True, momentum=box(0.9), epsilon=box(1e-3), **boxed)
        chex.assert_trees_all_equal(actual, expected)


def test_traced_hyperparameters_are_a_clear_type_error():
    x, state = jnp.ones((4, 3)), nj.batch_norm_state(3)
    for name in ("momentum", "epsilon"):
        run = jax.jit(lambda v, name=name: nj.batch_norm(x, state, training=True, **{name: v}))
        with pytest.raises(TypeError, match=f"`{name}` must be a static number"):
            run(0.5)
    with pytest.raises(TypeError, match="`r_max` must be a static number"):
        jax.jit(lambda v: nj.batch_renorm(x, state, training=True, r_max=v))(2.0)


def test_state_fields_are_checked():
    x = _normal(65, (6, 3))
    mean, var = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, 4.0, 0.25])
    with pytest.raises(TypeError, match=r"`state.mean` must be a floating-point array.*int32"):
        nj.batch_norm(x, nj.BatchNormState(mean.astype(jnp.int32), var, 0), training=True)
    with pytest.raises(TypeError, match=r"`state.var` must be a floating-point array.*int32"):
        nj.batch_norm(x, nj.BatchNormState(mean, var.astype(jnp.int32), 0), training=False)
    with pytest.raises(TypeError, match=r"`state.count` must be an integer \(or floating\) scalar"):
        nj.batch_norm(x, nj.BatchNormState(mean, var, jnp.zeros(3, jnp.int32)), training=True)
    with pytest.raises(TypeError, match=r"`state.count` must be an .*scalar, got complex64"):
        nj.batch_norm(x, nj.BatchNormState(mean, var, jnp.complex64(2)), training=True)
    # A Python int count is an int32 scalar; a floating one (lax.pmean's) keeps its dtype.
    expected = nj.batch_norm(x, nj.BatchNormState(mean, var, jnp.asarray(2, jnp.int32)),
                             training=True)
    actual = nj.batch_norm(x, nj.BatchNormState(mean, var, 2), training=True)
    chex.assert_trees_all_equal(actual, expected)
    y, state = nj.batch_norm(x, nj.BatchNormState(mean, var, jnp.float32(2)), training=True)
    chex.assert_trees_all_equal((y, state.mean, state.var), (expected[0], *expected[1][:2]))
    chex.assert_trees_all_equal(state.count, jnp.float32(3))


@pytest.mark.parametrize("feature_shape", [6.0, None, (3, -1), (2, 3.0), True])
def test_batch_norm_state_arguments_are_checked(feature_shape):
    with pytest.raises(TypeError, match="`feature_shape` must be a non-negative int"):
        nj.batch_norm_state(feature_shape)


def test_batch_norm_state_dtype_must_be_floating():
    with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype.*got int32"):
        nj.batch_norm_state(3, jnp.int32)


@pytest.mark.parametrize("training", [True, False])
def test_output_dtype_must_be_floating(training):
    x, state = jnp.ones((4, 3)), nj.batch_norm_state(3)
    for op in (nj.batch_norm, nj.batch_renorm):
        with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype.*int32"):
            op(x, state, training=training, dtype=jnp.int32)


def test_batch_of_one_in_training():
    with pytest.raises(ValueError):
        nj.batch_norm(jnp.ones((1, 3)), nj.batch_norm_state(3), training=True)
    with pytest.raises(ValueError):
        nj.batch_renorm(jnp.ones((1, 3)), nj.batch_norm_state(3), training=True)
    # a batch of one image still has spatial values per channel
    x = _normal(63, (1, 4, 4, 3))
    y, _ = nj.batch_norm(x, nj.batch_norm_state(3), training=True)
    _close(y, ref.batch_norm_train(x))


def test_errors_fire_under_jit():
    state = nj.batch_norm_state(3)
    with pytest.raises(ValueError, match="momentum"):
        jax.jit(lambda x: nj.batch_norm(x, state, training=True, momentum=1.0))(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="mask"):
        jax.jit(lambda x, m: nj.batch_norm(x, state, training=True, mask=m))(
            jnp.ones((4, 3)), jnp.ones((5, 3), bool)
        )
    with pytest.raises(ValueError, match="state"):
        jax.jit(lambda x: nj.batch_norm(x, nj.batch_norm_state(4), training=True))(
            jnp.ones((4, 3))
        )
