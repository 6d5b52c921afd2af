"""Tests of normjax.initializers against the papers' formulas and PyTorch's rules.

References used here are independent of the code under test: fans are hand
computed or follow PyTorch's documented rule (``fan_in = size(1) *
prod(size()[2:])``), gains are the closed forms of ``torch.nn.init.calculate_gain``,
standard deviations and bounds are the papers' formulas evaluated in float64,
the truncated-normal constant comes from scipy, and Flax's own layers fix the
kernel layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from normjax import initializers as ni

# Standard deviation of a standard normal truncated to (-2, 2).
TRUNCATED_STD = float(scipy.stats.truncnorm(-2.0, 2.0).std())

# The statistics under test do not depend on the PRNG, and an "rbg" key compiles about ten
# times faster than the default threefry one on CPU, which keeps this module within budget.
# DEFAULT_KEY checks that the default key works too.
KEY = jax.random.key(0, impl="rbg")
DEFAULT_KEY = jax.random.key(0)

# (name, shape, in_axis, out_axis, fan_in, fan_out), fans computed by hand.
LAYOUTS = [
    ("flax_dense", (256, 128), -2, -1, 256, 128),
    ("flax_conv2d", (3, 3, 32, 64), -2, -1, 3 * 3 * 32, 3 * 3 * 64),
    ("torch_conv2d", (64, 32, 3, 3), 1, 0, 32 * 3 * 3, 64 * 3 * 3),
    ("flax_conv3d", (3, 3, 3, 16, 32), -2, -1, 27 * 16, 27 * 32),
]


def torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """PyTorch's documented rule for an (out, in, *spatial) tensor."""
    receptive_field = int(np.prod(shape[2:], dtype=np.int64))
    return shape[1] * receptive_field, shape[0] * receptive_field


def assert_sample_std(sample: jax.Array, sigma: float) -> None:
    """Checks mean 0 and std sigma within 6 standard errors of the sample size.

    The standard error of a sample std is sigma/sqrt(2n) for a normal; the
    truncated normal and the uniform have lighter tails (smaller kurtosis), so
    the same bound is conservative for them.
    """
    values = np.asarray(sample, dtype=np.float64).ravel()
    n = values.size
    assert abs(values.std() - sigma) <= 6 * sigma / math.sqrt(2 * n), (values.std(), sigma)
    assert abs(values.mean()) <= 6 * sigma / math.sqrt(n), (values.mean(), sigma)


def assert_distribution_shape(sample: jax.Array, sigma: float, kind: str) -> None:
    """Checks the support: uniform fills [-b, b]; truncated stops at 2 std; normal does not."""
    values = np.abs(np.asarray(sample, dtype=np.float64).ravel())
    n = values.size
    if kind == "uniform":
        bound = sigma * math.sqrt(3.0)
        assert values.max() <= bound * (1 + 1e-6)
        # P(max < b(1 - 20/n)) = (1 - 20/n)^n ~ exp(-20).
        assert values.max() >= bound * (1 - 20 / n)
    elif kind == "truncated_normal":
        assert values.max() <= 2 * sigma / TRUNCATED_STD * (1 + 1e-6)
    else:
        # A plain normal passes 2 std of the truncated one (2.27 sigma) with p ~ 0.023 per draw.
        assert values.max() > 2 * sigma / TRUNCATED_STD


def xavier_std(gain: float) -> Callable[[int, int], float]:
    return lambda fan_in, fan_out: gain * math.sqrt(2.0 / (fan_in + fan_out))


# (id, factory(in_axis, out_axis), expected std from (fan_in, fan_out), distribution kind)
NAMED_CASES = [
    (
        "xavier_uniform_gain_tanh",
        lambda i, o: ni.xavier_uniform(5.0 / 3.0, in_axis=i, out_axis=o),
        # Glorot & Bengio eq. 16: b = gain * sqrt(6 / (fan_in + fan_out)); std = b / sqrt(3).
        lambda fi, fo: 5.0 / 3.0 * math.sqrt(6.0 / (fi + fo)) / math.sqrt(3.0),
        "uniform",
    ),
    ("xavier_normal", lambda i, o: ni.xavier_normal(in_axis=i, out_axis=o), xavier_std(1.0),
     "normal"),
    (
        "glorot_normal_truncated_gain2",
        lambda i, o: ni.glorot_normal(2.0, in_axis=i, out_axis=o, distribution="truncated_normal"),
        xavier_std(2.0),
        "truncated_normal",
    ),
    (
        "he_uniform_relu",
        lambda i, o: ni.he_uniform(in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(2.0) * math.sqrt(3.0 / fi) / math.sqrt(3.0),
        "uniform",
    ),
    (
        "he_normal_relu",
        lambda i, o: ni.he_normal(in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(2.0) / math.sqrt(fi),
        "normal",
    ),
    (
        "kaiming_normal_leaky02_fan_out",
        lambda i, o: ni.kaiming_normal("leaky_relu", 0.2, "fan_out", in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(2.0 / (1.0 + 0.2**2)) / math.sqrt(fo),
        "normal",
    ),
    (
        # PyTorch's kaiming with nonlinearity="leaky_relu" and a=0 uses gain sqrt(2).
        "kaiming_uniform_leaky_slope0_fan_out",
        lambda i, o: ni.kaiming_uniform("leaky_relu", 0.0, "fan_out", in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(2.0) * math.sqrt(3.0 / fo) / math.sqrt(3.0),
        "uniform",
    ),
    (
        "he_normal_tanh_truncated",
        lambda i, o: ni.he_normal("tanh", in_axis=i, out_axis=o, distribution="truncated_normal"),
        lambda fi, fo: 5.0 / 3.0 / math.sqrt(fi),
        "truncated_normal",
    ),
    (
        "lecun_uniform",
        lambda i, o: ni.lecun_uniform(in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(3.0 / fi) / math.sqrt(3.0),
        "uniform",
    ),
    (
        "lecun_normal",
        lambda i, o: ni.lecun_normal(in_axis=i, out_axis=o),
        lambda fi, fo: 1.0 / math.sqrt(fi),
        "normal",
    ),
    (
        "variance_scaling_fan_geo_avg_normal",
        lambda i, o: ni.variance_scaling(2.0, "fan_geo_avg", "normal", in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(2.0 / math.sqrt(fi * fo)),
        "normal",
    ),
    (
        "variance_scaling_fan_avg_truncated",
        lambda i, o: ni.variance_scaling(0.5, "fan_avg", "truncated_normal", i, o),
        lambda fi, fo: math.sqrt(0.5 / ((fi + fo) / 2)),
        "truncated_normal",
    ),
    (
        "variance_scaling_fan_out_uniform",
        lambda i, o: ni.variance_scaling(3.0, "fan_out", "uniform", in_axis=i, out_axis=o),
        lambda fi, fo: math.sqrt(3.0 / fo),
        "uniform",
    ),
]


@pytest.mark.parametrize(
    ("factory", "expected_std", "kind"),
    [pytest.param(*case[1:], id=case[0]) for case in NAMED_CASES],
)
@pytest.mark.parametrize(
    ("shape", "in_axis", "out_axis", "fan_in", "fan_out"),
    [pytest.param(*layout[1:], id=layout[0]) for layout in LAYOUTS],
)
def test_empirical_std_matches_formula(
    factory, expected_std, kind, shape, in_axis, out_axis, fan_in, fan_out
):
    sigma = expected_std(fan_in, fan_out)
    weights = factory(in_axis, out_axis)(KEY, shape)
    chex.assert_shape(weights, shape)
    chex.assert_type(weights, jnp.float32)
    assert_sample_std(weights, sigma)
    assert_distribution_shape(weights, sigma, kind)


def test_truncated_normal_constant_matches_scipy():
    # The constant the std is divided by must be the truncated normal's std, 0.8796...
    weights = ni.variance_scaling(1.0, "fan_in", "truncated_normal")(KEY, (1, 200_000))
    assert_sample_std(weights, 1.0)
    assert np.abs(np.asarray(weights)).max() <= 2.0 / TRUNCATED_STD * (1 + 1e-6)
    assert TRUNCATED_STD == pytest.approx(0.87962566103423978, rel=1e-12)


# ---------------------------------------------------------------------------- fans


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        pytest.param((64, 10), {}, (64, 10), id="flax_dense"),
        pytest.param((10, 64), {"in_axis": 1, "out_axis": 0}, (64, 10), id="torch_linear"),
        pytest.param((5, 16, 32), {}, (5 * 16, 5 * 32), id="flax_conv1d"),
        pytest.param((32, 16, 5), {"in_axis": 1, "out_axis": 0}, (80, 160), id="torch_conv1d"),
        pytest.param((3, 3, 16, 32), {}, (144, 288), id="flax_conv2d"),
        pytest.param((32, 16, 3, 3), {"in_axis": 1, "out_axis": 0}, (144, 288), id="torch_conv2d"),
        pytest.param((2, 3, 4, 8, 16), {}, (24 * 8, 24 * 16), id="flax_conv3d"),
        # ConvTranspose(16) on 64 channels: Flax (3, 3, 64, 16); torch's weight is
        # (64, 16, 3, 3), whose fans it takes as (16 * 9, 64 * 9).
        pytest.param((3, 3, 64, 16), {}, (576, 144), id="flax_conv_transpose"),
        pytest.param(
            (3, 3, 64, 16), {"in_axis": -1, "out_axis": -2}, (144, 576),
            id="flax_conv_transpose_as_torch",
        ),
        pytest.param(
            (16, 8, 2, 3, 4), {"in_axis": 1, "out_axis": 0}, (192, 384), id="torch_conv3d"
        ),
        pytest.param(
            (4, 5, 6), {"in_axis": (0, 1), "out_axis": 2}, (20, 6), id="dense_general_in_seq"
        ),
        pytest.param(
            (4, 5, 6, 7), {"in_axis": 0, "out_axis": [-2, -1]}, (4 * 5, 42 * 5), id="out_seq"
        ),
        pytest.param((8, 3, 16, 32), {"batch_axis": 0}, (48, 96), id="batch_axis_ignored"),
        pytest.param((5,), {"in_axis": 0, "out_axis": ()}, (5, 1), id="1d_with_explicit_axes"),
    ],
)
def test_compute_fans_hand_computed(shape, kwargs, expected):
    fans = ni.compute_fans(shape, **kwargs)
    assert fans == expected
    assert all(isinstance(fan, int) for fan in fans)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=2, max_size=5))
def test_compute_fans_follows_torch_rule_in_both_layouts(torch_shape):
    torch_shape = tuple(torch_shape)
    expected = torch_fans(torch_shape)
    assert ni.compute_fans(torch_shape, in_axis=1, out_axis=0) == expected
    # The same kernel in Flax's layout: (*spatial, in, out).
    flax_shape = (*torch_shape[2:], torch_shape[1], torch_shape[0])
    assert ni.compute_fans(flax_shape) == expected


@pytest.mark.parametrize("int_type", [np.int64, np.int32, int])
def test_axes_may_be_numpy_ints(int_type):
    # PyTorch's (out, in, kh, kw) layout: fan_in = 8 * 3 * 3 = 72, so He uniform's
    # bound is sqrt(6 / 72). numpy ints reached jax's sampler as they came (a
    # TypeError from inside jax at the first call).
    init = ni.he_uniform(in_axis=int_type(1), out_axis=int_type(0), batch_axis=())
    w = np.asarray(init(KEY, (16, 8, 3, 3)), np.float64)
    bound = math.sqrt(6 / 72)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    chex.assert_trees_all_equal(w, np.asarray(ni.he_uniform(in_axis=1, out_axis=0)(KEY, w.shape)))
    fans = ni.compute_fans((16, 8, 3, 3), in_axis=(int_type(1),), out_axis=int_type(0))
    assert fans == (72, 144)


def test_flax_layers_use_the_default_layout():
    # Flax's own Dense and Conv fix which kernel axes are inputs and outputs.
    # eval_shape reads the kernel shapes without compiling anything.
    dense = jax.eval_shape(nn.Dense(7).init, KEY, jnp.ones((1, 5)))["params"]["kernel"]
    conv = jax.eval_shape(nn.Conv(7, (2, 3)).init, KEY, jnp.ones((1, 6, 6, 5)))
    conv = conv["params"]["kernel"]
    assert ni.compute_fans(dense.shape) == (5, 7)
    assert ni.compute_fans(conv.shape) == (2 * 3 * 5, 2 * 3 * 7)


# ---------------------------------------------------------------------------- gains


@pytest.mark.parametrize(
    ("nonlinearity", "param", "expected"),
    [
        *[
            (name, None, 1.0)
            for name in (
                "linear",
                "identity",
                "conv1d",
                "conv2d",
                "conv3d",
                "conv_transpose1d",
                "conv_transpose2d",
                "conv_transpose3d",
                "sigmoid",
            )
        ],
        ("tanh", None, 5.0 / 3.0),
        ("relu", None, math.sqrt(2.0)),
        ("selu", None, 0.75),
        ("leaky_relu", None, math.sqrt(2.0 / (1.0 + 0.01**2))),
        ("leaky_relu", 0.2, math.sqrt(2.0 / 1.04)),
        ("leaky_relu", 0, math.sqrt(2.0)),
        ("leaky_relu", 1, 1.0),
        ("leaky_relu", np.float32(0.5), math.sqrt(2.0 / 1.25)),
        ("leaky_relu", jnp.asarray(0.5), math.sqrt(2.0 / 1.25)),
        # PyTorch's sqrt(2 / (1 + a^2)) raises OverflowError here.
        ("leaky_relu", 1e200, math.sqrt(2.0) * 1e-200),
        ("relu", 0.3, math.sqrt(2.0)),
    ],
)
def test_calculate_gain_matches_pytorch_table(nonlinearity, param, expected):
    gain = ni.calculate_gain(nonlinearity, param)
    assert isinstance(gain, float)
    assert gain == pytest.approx(expected, rel=1e-15)


# ---------------------------------------------------------------------------- orthogonal


def assert_orthogonal(weights: jax.Array, gain: float, column_axis: int, atol: float) -> None:
    matrix = np.moveaxis(np.asarray(weights, dtype=np.float64), column_axis, -1)
    matrix = matrix.reshape(-1, matrix.shape[-1])
    rows, cols = matrix.shape
    # Tall: orthonormal columns (Q^T Q = I); wide: orthonormal rows (Q Q^T = I).
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    chex.assert_trees_all_close(gram, gain**2 * np.eye(min(rows, cols)), atol=atol * gain**2)


@pytest.mark.parametrize(
    ("shape", "column_axis"),
    [
        pytest.param((8, 4), -1, id="tall"),
        pytest.param((4, 8), -1, id="wide"),
        pytest.param((6, 6), -1, id="square"),
        pytest.param((3, 3, 4, 16), -1, id="flax_conv_tall"),
        pytest.param((3, 3, 2, 32), -1, id="flax_conv_wide"),
        pytest.param((16, 4, 3, 3), 0, id="torch_conv_column_axis0"),
    ],
)
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_orthogonal_gram_is_scaled_identity(shape, column_axis, gain):
    weights = ni.orthogonal(gain, column_axis=column_axis)(KEY, shape)
    chex.assert_shape(weights, shape)
    chex.assert_type(weights, jnp.float32)
    assert_orthogonal(weights, gain, column_axis, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=3),
    st.data(),
    st.floats(0.1, 3.0),
)
def test_orthogonal_any_shape(shape, data, gain):
    column_axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    weights = ni.orthogonal(gain, column_axis)(KEY, tuple(shape))
    chex.assert_shape(weights, tuple(shape))
    assert_orthogonal(weights, gain, column_axis, atol=1e-5)


def test_orthogonal_float64_and_half_precision():
    with jax.enable_x64(True):
        weights = ni.orthogonal(1.5)(KEY, (12, 5), jnp.float64)
        chex.assert_type(weights, jnp.float64)
        assert_orthogonal(weights, 1.5, -1, atol=1e-12)
    for dtype in (jnp.bfloat16, jnp.float16):
        weights = ni.orthogonal(1.5)(KEY, (12, 5), dtype)
        chex.assert_type(weights, dtype)
        # Rounding each entry to 8 (bfloat16) or 11 (float16) bits perturbs the Gram matrix.
        assert_orthogonal(weights, 1.5, -1, atol=3e-2)


# ---------------------------------------------------------------------------- determinism

ALL_FACTORIES = {
    "xavier_uniform": ni.xavier_uniform,
    "xavier_normal": ni.xavier_normal,
    "glorot_uniform": ni.glorot_uniform,
    "glorot_normal": ni.glorot_normal,
    "he_uniform": ni.he_uniform,
    "he_normal": ni.he_normal,
    "kaiming_uniform": ni.kaiming_uniform,
    "kaiming_normal": ni.kaiming_normal,
    "lecun_uniform": ni.lecun_uniform,
    "lecun_normal": ni.lecun_normal,
    "orthogonal": ni.orthogonal,
    "variance_scaling": lambda: ni.variance_scaling(1.0, "fan_geo_avg", "truncated_normal"),
}


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_same_key_same_array_different_key_different_array(name):
    init = ALL_FACTORIES[name]()
    first = init(DEFAULT_KEY, (6, 5))
    chex.assert_trees_all_equal(first, init(DEFAULT_KEY, (6, 5)))
    other = init(jax.random.key(1), (6, 5))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_aliases_are_the_same_functions():
    assert ni.glorot_uniform is ni.xavier_uniform
    assert ni.glorot_normal is ni.xavier_normal
    assert ni.kaiming_uniform is ni.he_uniform
    assert ni.kaiming_normal is ni.he_normal


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_is_honored(name, dtype):
    init = ALL_FACTORIES[name]()
    weights = init(KEY, (64, 32), dtype)
    chex.assert_type(weights, dtype)
    chex.assert_shape(weights, (64, 32))
    assert np.isfinite(np.asarray(weights, dtype=np.float32)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_formula_std_and_bound(dtype):
    shape = (256, 128)
    normal = ni.he_normal(dtype=dtype)(KEY, shape)
    chex.assert_type(normal, dtype)
    assert_sample_std(normal, math.sqrt(2.0 / 256))
    assert_distribution_shape(normal, math.sqrt(2.0 / 256), "normal")
    uniform = ni.xavier_uniform()(KEY, shape, dtype)
    bound = math.sqrt(6.0 / (256 + 128))
    # Rounding to nearest is monotone, so no entry can pass the bound rounded to dtype.
    assert np.abs(np.asarray(uniform, np.float64)).max() <= float(jnp.asarray(bound, dtype))
    assert_sample_std(uniform, bound / math.sqrt(3.0))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_weights_are_sampled_in_float32_and_rounded(dtype):
    # float8's promote to no float32: sampling in promote_types(dtype, float32)
    # was JAX's TypePromotionError. The formula's std, and each the float32
    # sample rounded once.
    normal = ni.he_normal(dtype=dtype)(KEY, (256, 128))
    chex.assert_type(normal, dtype)
    assert_sample_std(normal, math.sqrt(2.0 / 256))
    for init in (ni.he_normal(), ni.orthogonal()):
        chex.assert_trees_all_equal(init(KEY, (64, 64), dtype),
                                    init(KEY, (64, 64), jnp.float32).astype(dtype))


@pytest.mark.parametrize("name", ["he_normal", "xavier_uniform", "lecun_normal", "orthogonal"])
def test_float64_under_x64(name):
    with jax.enable_x64(True):
        init = ALL_FACTORIES[name]()
        weights = init(KEY, (64, 32), jnp.float64)
        chex.assert_type(weights, jnp.float64)
        values = np.asarray(weights)
        # Real float64 samples, not float32 values widened to float64.
        assert not np.array_equal(values, values.astype(np.float32).astype(np.float64))


def test_factory_dtype_is_the_default_and_call_dtype_overrides_it():
    init = ni.he_uniform(dtype=jnp.bfloat16)
    chex.assert_type(init(KEY, (4, 3)), jnp.bfloat16)
    chex.assert_type(init(KEY, (4, 3), jnp.float32), jnp.float32)
    chex.assert_type(ni.he_uniform()(KEY, (4, 3)), jnp.float32)
    chex.assert_type(ni.he_uniform(dtype=None)(KEY, (4, 3)), jnp.float32)
    with jax.enable_x64(True):
        chex.assert_type(ni.lecun_normal(dtype=jnp.float64)(KEY, (4, 3)), jnp.float64)
        # None follows jax: the default float, float64 under x64.
        chex.assert_type(ni.lecun_normal(dtype=None)(KEY, (4, 3)), jnp.float64)


# ---------------------------------------------------------------------------- Flax and jit


def test_flax_dense_kernel_init_under_jit():
    model = nn.Dense(256, kernel_init=ni.he_normal())
    kernel = jax.jit(model.init)(KEY, jnp.ones((1, 256)))["params"]["kernel"]
    chex.assert_shape(kernel, (256, 256))
    chex.assert_type(kernel, jnp.float32)
    assert_sample_std(kernel, math.sqrt(2.0 / 256))
    assert_distribution_shape(kernel, math.sqrt(2.0 / 256), "normal")


def test_flax_conv_kernel_init_and_param_dtype():
    model = nn.Conv(64, (3, 3), kernel_init=ni.xavier_uniform(), param_dtype=jnp.bfloat16)
    kernel = model.init(KEY, jnp.ones((1, 8, 8, 32)))["params"]["kernel"]
    chex.assert_shape(kernel, (3, 3, 32, 64))
    chex.assert_type(kernel, jnp.bfloat16)
    bound = math.sqrt(6.0 / (3 * 3 * 32 + 3 * 3 * 64))
    assert np.abs(np.asarray(kernel, np.float64)).max() <= float(jnp.asarray(bound, jnp.bfloat16))
    assert_sample_std(kernel, bound / math.sqrt(3.0))


@pytest.mark.parametrize("name", ["he_uniform", "orthogonal"])
def test_jit_matches_eager(name):
    init = ALL_FACTORIES[name]()
    jitted = jax.jit(init, static_argnums=(1, 2))(KEY, (3, 3, 4, 8), jnp.float32)
    chex.assert_trees_all_close(jitted, init(KEY, (3, 3, 4, 8), jnp.float32), rtol=1e-5, atol=1e-6)


def test_shape_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="zero-size fan"):
        jax.jit(ni.he_normal(), static_argnums=(1, 2))(KEY, (0, 3), jnp.float32)


@settings(max_examples=10, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),
    st.sampled_from(["xavier_uniform", "he_uniform", "lecun_uniform"]),
    st.floats(0.0, 3.0),
    st.booleans(),
)
def test_uniform_bounds_for_any_shape_and_gain(torch_shape, name, gain, torch_layout):
    torch_shape = tuple(torch_shape)
    fan_in, fan_out = torch_fans(torch_shape)
    if torch_layout:
        shape, axes = torch_shape, {"in_axis": 1, "out_axis": 0}
    else:
        shape, axes = (*torch_shape[2:], torch_shape[1], torch_shape[0]), {}
    if name == "xavier_uniform":
        init, bound = ni.xavier_uniform(gain, **axes), gain * math.sqrt(6.0 / (fan_in + fan_out))
    elif name == "he_uniform":
        slope = gain  # reuse the drawn float as a leaky ReLU slope
        init = ni.he_uniform("leaky_relu", slope, **axes)
        bound = math.sqrt(2.0 / (1 + slope**2)) * math.sqrt(3.0 / fan_in)
    else:
        init, bound = ni.lecun_uniform(**axes), math.sqrt(3.0 / fan_in)
    weights = init(KEY, shape)
    chex.assert_shape(weights, shape)
    assert np.abs(np.asarray(weights, np.float64)).max() <= bound * (1 + 1e-6)


def test_empty_batch_axis_gives_empty_array():
    weights = ni.variance_scaling(1.0, "fan_in", "normal", batch_axis=0)(KEY, (0, 3, 4))
    chex.assert_shape(weights, (0, 3, 4))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        # calculate_gain
        (lambda: ni.calculate_gain("softplus"), ValueError, r"nonlinearity.*leaky_relu.*softplus"),
        (lambda: ni.calculate_gain(None), ValueError, "nonlinearity"),
        (lambda: ni.calculate_gain("leaky_relu", True), ValueError, "param"),
        (lambda: ni.calculate_gain("leaky_relu", "0.1"), ValueError, "param"),
        (lambda: ni.calculate_gain("leaky_relu", float("nan")), ValueError, "param"),
        # compute_fans
        (lambda: ni.compute_fans((5,)), ValueError, r"at least 2 dimensions.*\(5,\)"),
        (lambda: ni.compute_fans(()), ValueError, "at least 2 dimensions"),
        (lambda: ni.compute_fans((0, 3)), ValueError, "zero-size fan"),
        (lambda: ni.compute_fans((3, 0, 4, 5)), ValueError, "zero-size fan"),
        (lambda: ni.compute_fans((3, 3), in_axis=2), ValueError, r"in_axis=2 is out of range"),
        (lambda: ni.compute_fans((3, 3), out_axis=-3), ValueError, "out_axis=-3 is out of range"),
        (lambda: ni.compute_fans((3, 3), batch_axis=(5,)), ValueError, "batch_axis"),
        (lambda: ni.compute_fans((3, 3, 3), 0, 0), ValueError, r"in_axis.*out_axis.*share"),
        (lambda: ni.compute_fans((3, 3, 3), batch_axis=-1), ValueError, "batch_axis.*share"),
        (lambda: ni.compute_fans((3, 3, 3), in_axis=(0, 0)), ValueError, "in_axis.*twice"),
        (lambda: ni.compute_fans((3, 3), in_axis=0.5), TypeError, "in_axis"),
        (lambda: ni.compute_fans((3, -1)), ValueError, "shape"),
        # variance_scaling, at construction
        (lambda: ni.variance_scaling(-1.0, "fan_in", "normal"), ValueError, "scale"),
        (lambda: ni.variance_scaling(float("inf"), "fan_in", "normal"), ValueError, "scale"),
        (lambda: ni.variance_scaling("1", "fan_in", "normal"), TypeError, "scale"),
        (lambda: ni.variance_scaling(1.0, "fan_sum", "normal"), ValueError, r"mode.*fan_geo_avg"),
        (
            lambda: ni.variance_scaling(1.0, "fan_in", "gaussian"),
            ValueError,
            r"distribution.*truncated_normal",
        ),
        (lambda: ni.variance_scaling(1.0, "fan_in", "normal", dtype=jnp.int8), ValueError,
         "dtype"),
        (lambda: ni.variance_scaling(1.0, "fan_in", "normal", in_axis="0"), TypeError, "in_axis"),
        # gains of the named initializers
        (lambda: ni.xavier_uniform(gain=-1.0), ValueError, "gain"),
        (lambda: ni.xavier_normal(gain=True), TypeError, "gain"),
        (lambda: ni.xavier_normal(gain=jnp.ones(2)), TypeError, "gain"),
        (lambda: ni.calculate_gain("leaky_relu", jnp.asarray(True)), ValueError, "param"),
        (lambda: ni.orthogonal(gain=-0.5), ValueError, "gain"),
        (lambda: ni.he_normal(nonlinearity="swish"), ValueError, "nonlinearity"),
        (lambda: ni.he_uniform(mode="fan_both"), ValueError, "mode"),
        (lambda: ni.he_normal(distribution="uniform"), ValueError, "distribution"),
        (lambda: ni.xavier_normal(distribution="uniform"), ValueError, "distribution"),
        (lambda: ni.lecun_normal(distribution="laplace"), ValueError, "distribution"),
        (lambda: ni.he_normal("relu", 0.1), ValueError, "negative_slope"),
        (lambda: ni.he_uniform("leaky_relu", float("inf")), ValueError, "negative_slope"),
        (lambda: ni.orthogonal(column_axis=1.0), TypeError, "column_axis"),
        # at call time
        (lambda: ni.he_normal()(KEY, (3, 3), jnp.int32), ValueError, "dtype.*int32"),
        (lambda: ni.xavier_uniform()(KEY, (3, 3), jnp.complex64), ValueError, "dtype"),
        (lambda: ni.orthogonal()(KEY, (3, 3), jnp.uint8), ValueError, "dtype"),
        (lambda: ni.lecun_uniform()(KEY, (0, 4)), ValueError, "zero-size fan"),
        (lambda: ni.he_uniform()(KEY, (7,)), ValueError, "at least 2 dimensions"),
        (lambda: ni.orthogonal()(KEY, (5,)), ValueError, "at least 2 dimensions"),
        (lambda: ni.orthogonal(column_axis=3)(KEY, (3, 3)), ValueError, "column_axis"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_all_is_exported():
    assert set(ni.__all__) >= {
        "calculate_gain",
        "compute_fans",
        "variance_scaling",
        "xavier_uniform",
        "xavier_normal",
        "glorot_uniform",
        "glorot_normal",
        "he_uniform",
        "he_normal",
        "kaiming_uniform",
        "kaiming_normal",
        "lecun_uniform",
        "lecun_normal",
        "orthogonal",
    }
    for name in ni.__all__:
        assert hasattr(ni, name)
