"""Tests of normjax.diagnostics against numpy float64 closed forms."""

from __future__ import annotations

import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normjax import diagnostics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _reference_norm(array: np.ndarray) -> float:
    """The L2 norm as an exactly rounded float64 sum of squares."""
    return math.sqrt(math.fsum(float(v) ** 2 for v in np.asarray(array, np.float64).ravel()))


# ---------------------------------------------------------------- gradient_norms


@settings(max_examples=20, deadline=None)
@given(
    num_layers=st.integers(1, 13),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_gradient_norms_matches_float64_sum_of_squares_in_layer_order(num_layers, width, seed):
    rng = np.random.default_rng(seed)
    arrays = {
        f"Dense_{i}": {
            "kernel": rng.normal(size=(width, width + 1)).astype(np.float32),
            "bias": rng.normal(size=(width + 1,)).astype(np.float32),
        }
        for i in range(num_layers)
    }
    # jax.grad hands back dicts with sorted keys, i.e. Dense_10 before Dense_2.
    grads = {"params": jax.tree_util.tree_map(jnp.asarray, arrays)}

    norms = diagnostics.gradient_norms(grads)

    expected_keys = [f"Dense_{i}/{p}" for i in range(num_layers) for p in ("bias", "kernel")]
    assert list(norms) == expected_keys
    for i in range(num_layers):
        for p in ("bias", "kernel"):
            np.testing.assert_allclose(
                norms[f"Dense_{i}/{p}"], _reference_norm(arrays[f"Dense_{i}"][p]), rtol=1e-12
            )
    assert all(isinstance(v, float) for v in norms.values())


def test_gradient_norms_orders_nested_and_numbered_paths_numerically():
    leaf = jnp.ones((1,))
    grads = {
        "params": {
            "Dense_10": {"kernel": leaf},
            "Dense_2": {"kernel": leaf},
            "Block_1": {"Dense_0": {"kernel": leaf}},
            "Block_0": {"Dense_1": {"kernel": leaf}, "Dense_0": {"kernel": leaf}},
            "Dense_9": {"kernel": leaf},
        }
    }
    assert list(diagnostics.gradient_norms(grads)) == [
        "Block_0/Dense_0/kernel",
        "Block_0/Dense_1/kernel",
        "Block_1/Dense_0/kernel",
        "Dense_2/kernel",
        "Dense_9/kernel",
        "Dense_10/kernel",
    ]


def test_gradient_norms_keeps_a_non_params_top_level_name_and_names_list_entries():
    grads = {"encoder": [jnp.array([3.0, 4.0]), jnp.array([[5.0, 12.0]])]}
    assert diagnostics.gradient_norms(grads) == {"encoder/0": 5.0, "encoder/1": 13.0}


def test_gradient_norms_keeps_the_collection_name_where_dropping_it_would_merge_leaves():
    grads = {"params": {"Dense_0": {"kernel": jnp.array([3.0, 4.0])}},
             "batch_stats": {"Dense_0": {"kernel": jnp.array([5.0, 12.0])}},
             "other": {"w": jnp.array([1.0])}}
    assert diagnostics.gradient_norms(grads) == {
        "batch_stats/Dense_0/kernel": 13.0, "params/Dense_0/kernel": 5.0, "other/w": 1.0}
    # A top-level leaf named like a collection's leaf.
    grads = {"params": {"w": jnp.array([3.0, 4.0])}, "w": jnp.ones(1)}
    assert diagnostics.gradient_norms(grads) == {"params/w": 5.0, "w": 1.0}


def test_gradient_norms_of_complex_leaves_count_their_imaginary_parts():
    norms = diagnostics.gradient_norms({"params": {"a": jnp.array([3 + 4j, 0 + 12j])}})
    assert norms == {"a": pytest.approx(13.0, rel=1e-12)}


def test_gradient_norms_does_not_underflow_for_tiny_float32_gradients():
    # 1e-30 squared is below float32's smallest subnormal (~1.4e-45): a float32
    # sum of squares gives 0, the float64 norm gives sqrt(n) * 1e-30.
    tiny = jnp.full((4, 25), 1e-30, dtype=jnp.float32)
    assert float(jnp.sqrt(jnp.sum(tiny * tiny))) == 0.0
    norm = diagnostics.gradient_norms({"params": {"Dense_0": {"kernel": tiny}}})["Dense_0/kernel"]
    np.testing.assert_allclose(norm, 10.0 * float(np.float32(1e-30)), rtol=1e-12)


def test_gradient_norms_of_a_two_layer_linear_model_match_the_closed_form():
    """For y = (x W0 + b0) W1 + b1 and L = 0.5 ||y - t||^2, the gradients are
    dW1 = h^T r, db1 = sum_batch r, dW0 = x^T (r W1^T), db0 = sum_batch r W1^T
    with h = x W0 + b0 and r = y - t."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    t = rng.normal(size=(6, 2))
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=(4,))
    w1, b1 = rng.normal(size=(4, 2)), rng.normal(size=(2,))

    class TwoLayer(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            hidden = nn.Dense(4)(inputs)
            return nn.Dense(2)(hidden)

    params = {
        "Dense_0": {"kernel": jnp.asarray(w0, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(w1, jnp.float32), "bias": jnp.asarray(b1, jnp.float32)},
    }

    def loss(p):
        y = TwoLayer().apply({"params": p}, jnp.asarray(x, jnp.float32))
        return 0.5 * jnp.sum((y - jnp.asarray(t, jnp.float32)) ** 2)

    norms = diagnostics.gradient_norms({"params": jax.grad(loss)(params)})

    h = x @ w0 + b0
    r = h @ w1 + b1 - t
    back = r @ w1.T
    expected = {
        "Dense_0/bias": _reference_norm(back.sum(axis=0)),
        "Dense_0/kernel": _reference_norm(x.T @ back),
        "Dense_1/bias": _reference_norm(r.sum(axis=0)),
        "Dense_1/kernel": _reference_norm(h.T @ r),
    }
    assert list(norms) == list(expected)
    np.testing.assert_allclose(list(norms.values()), list(expected.values()), rtol=2e-5)


def test_gradient_norms_of_an_nnx_model_are_keyed_by_the_variable_path():
    """For L = sum(x W + b) over a batch, dL/dW = x^T 1 and dL/db = n * 1."""
    from flax import nnx

    class Chain(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(11)])

        def __call__(self, x):
            return self.layers[10](x)  # only the last layer is used: closed-form grads

    x = np.arange(12.0).reshape(4, 3) / 10.0
    model = Chain(nnx.Rngs(0))
    grads = nnx.grad(lambda m: m(jnp.asarray(x, jnp.float32)).sum())(model)

    norms = diagnostics.gradient_norms(grads)

    assert list(norms)[-4:] == [
        "layers/9/bias",
        "layers/9/kernel",
        "layers/10/bias",
        "layers/10/kernel",
    ]
    np.testing.assert_allclose(
        norms["layers/10/kernel"], _reference_norm(x.T @ np.ones((4, 3))), rtol=1e-6
    )
    np.testing.assert_allclose(norms["layers/10/bias"], _reference_norm(np.full(3, 4.0)))
    assert norms["layers/0/kernel"] == 0.0


def test_gradient_norms_of_bfloat16_gradients_match_float64():
    grads = {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.bfloat16),
                "bias": jnp.asarray([1e-20, -3.0, 250.0], jnp.bfloat16),
            }
        }
    }
    norms = diagnostics.gradient_norms(grads)
    for name in ("kernel", "bias"):
        leaf = np.asarray(grads["params"]["Dense_0"][name]).astype(np.float64)
        np.testing.assert_allclose(norms[f"Dense_0/{name}"], _reference_norm(leaf), rtol=1e-12)


def test_gradient_norms_leave_out_the_gradients_of_integer_leaves():
    # normjax.linen.BatchNorm keeps an int32 batch_stats/count: a gradient over
    # all variables needs allow_int=True and gives that leaf a float0 gradient.
    import normjax.linen as njl

    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, 3)), jnp.float32)
    model = njl.BatchNorm(use_running_average=True)
    variables = model.init(jax.random.key(0), x)
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2), allow_int=True)(variables)
    norms = diagnostics.gradient_norms(grads)
    # The reference: Flax's own BatchNorm, which keeps no count, on the same values.
    flax_model = nn.BatchNorm(use_running_average=True, epsilon=model.epsilon)
    flax_variables = {
        "params": variables["params"],
        "batch_stats": {k: variables["batch_stats"][k] for k in ("mean", "var")},
    }
    flax_grads = jax.grad(lambda v: jnp.sum(flax_model.apply(v, x) ** 2))(flax_variables)
    assert sorted(norms) == ["bias", "mean", "scale", "var"]
    for collection, name in [("params", "scale"), ("params", "bias"),
                             ("batch_stats", "mean"), ("batch_stats", "var")]:  # fmt: skip
        leaf = np.asarray(flax_grads[collection][name], np.float64)
        np.testing.assert_allclose(norms[name], _reference_norm(leaf), rtol=1e-5)


def test_gradient_norms_rejects_a_non_numeric_leaf_naming_its_path():
    with pytest.raises(TypeError, match=r"Dense_0/kernel.*dtype"):
        diagnostics.gradient_norms({"params": {"Dense_0": {"kernel": np.array(["a"])}}})



def test_gradient_norms_rejects_a_prng_key_leaf_naming_its_path():
    # The whole nnx.state of a model with Dropout holds its Rngs' typed key.
    state = {"dropout": {"rngs": {"key": jax.random.key(0)}}, "kernel": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"'dropout/rngs/key' is a PRNG key"):
        diagnostics.gradient_norms(state)


def test_gradient_norms_rejects_two_leaves_that_join_to_one_key():
    # Either norm alone would be right; a dict keyed "a/b" could keep only one.
    with pytest.raises(ValueError, match=r"same key 'a/b'"):
        diagnostics.gradient_norms({"a/b": jnp.ones(1), "a": {"b": jnp.ones(4)}})


# ---------------------------------------------------------------- activation_stats


class _DiagonalMLP(nn.Module):
    """Two hidden Dense layers followed by `activation`, then a linear output layer."""

    activation: str = "sigmoid"

    @nn.compact
    def __call__(self, x):
        act = getattr(jax.nn, self.activation)
        x = act(nn.Dense(3)(x))
        x = act(nn.Dense(3)(x))
        return nn.Dense(2, name="logits")(x)


def _diagonal_params(scale0, scale1):
    """Kernels diag(scale) and zero biases so each layer's pre-activation is known."""
    return {
        "params": {
            "Dense_0": {"kernel": jnp.diag(jnp.array(scale0)), "bias": jnp.zeros(3)},
            "Dense_1": {"kernel": jnp.diag(jnp.array(scale1)), "bias": jnp.zeros(3)},
            "logits": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        }
    }


def _hidden_only(module, method_name):
    return isinstance(module, nn.Dense) and module.name != "logits"


def _numpy_stats(values, saturated):
    return (np.mean(values), np.std(values), np.mean(saturated))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_activation_stats_matches_numpy_on_a_model_with_known_preactivations(activation):
    x = np.array([[-8.0, 0.5, 3.0], [2.0, -0.25, 7.0], [0.0, 6.0, -1.0], [-3.0, -6.0, 1.5]])
    scale0, scale1 = [1.0, 2.0, -1.0], [0.5, 3.0, 1.0]
    functions = {
        "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
        "tanh": np.tanh,
        "relu": lambda z: np.maximum(z, 0.0),
    }
    rules = {  # the documented rules, t = 0.01
        "sigmoid": lambda y: (y <= 0.01) | (y >= 0.99),
        "tanh": lambda y: np.abs(y) >= 0.99,
        "relu": lambda y: y == 0.0,
    }
    f, rule = functions[activation], rules[activation]
    h0 = f(x * np.array(scale0))
    h1 = f(h0 * np.array(scale1))

    stats = diagnostics.activation_stats(
        _DiagonalMLP(activation),
        _diagonal_params(scale0, scale1),
        jnp.asarray(x, jnp.float32),
        activation=activation,
        layers=_hidden_only,
    )

    assert list(stats) == ["Dense_0", "Dense_1"]
    for name, h in (("Dense_0", h0), ("Dense_1", h1)):
        np.testing.assert_allclose(stats[name], _numpy_stats(h, rule(h)), rtol=1e-5, atol=1e-6)
    # The example input is built so both outcomes occur: the rule is exercised.
    assert 0.0 < stats["Dense_0"].saturated_fraction < 1.0


def test_activation_stats_threshold_is_configurable():
    x = jnp.array([[0.0, 3.0, 5.0]])  # sigmoid: 0.5, 0.9526, 0.9933
    params = _diagonal_params([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    kwargs = dict(activation="sigmoid", layers=_hidden_only)
    strict = diagnostics.activation_stats(_DiagonalMLP(), params, x, **kwargs)
    loose = diagnostics.activation_stats(
        _DiagonalMLP(), params, x, saturation_threshold=0.05, **kwargs
    )
    assert strict["Dense_0"].saturated_fraction == pytest.approx(1 / 3)
    assert loose["Dense_0"].saturated_fraction == pytest.approx(2 / 3)


def test_activation_stats_default_layers_include_the_output_dense_and_accept_callables():
    params = _diagonal_params([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    stats = diagnostics.activation_stats(
        _DiagonalMLP("relu"), params, jnp.ones((2, 3)), activation=jax.nn.relu
    )
    assert list(stats) == ["Dense_0", "Dense_1", "logits"]
    # Every output is 1 (identity kernels, input 1) except the logits: 3 = 1+1+1.
    np.testing.assert_allclose(stats["logits"], (3.0, 0.0, 0.0))
    assert stats["Dense_0"].saturated_fraction == 0.0
    gelu = diagnostics.activation_stats(
        _DiagonalMLP("gelu"), params, jnp.ones((2, 3)), activation="gelu"
    )
    assert math.isnan(gelu["Dense_0"].saturated_fraction)


class _BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(nn.sigmoid(x))


def test_activation_stats_captures_norm_layers_and_passes_apply_kwargs():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    model = _BatchNormMLP()
    variables = model.init(jax.random.key(1), x, train=False)

    stats = diagnostics.activation_stats(
        model,
        variables,
        x,
        activation="sigmoid",
        layers=nn.BatchNorm,
        train=True,
        mutable=["batch_stats"],
    )

    # Reference: the batch-normalized pre-activation computed in numpy float64.
    z = np.asarray(x, np.float64) @ np.asarray(variables["params"]["Dense_0"]["kernel"])
    z = (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + 1e-5)
    h = 1.0 / (1.0 + np.exp(-z))
    assert list(stats) == ["BatchNorm_0"]
    np.testing.assert_allclose(
        stats["BatchNorm_0"], _numpy_stats(h, (h <= 0.01) | (h >= 0.99)), rtol=1e-4, atol=1e-6
    )


def test_activation_stats_leaves_out_what_the_model_sows_itself():
    # A model's own sow("intermediates", ...) lands in the same collection as
    # the captured outputs; it is not a layer.
    class Sowing(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, kernel_init=nn.initializers.ones)(x)
            self.sow("intermediates", "h", h * 100)
            return nn.Dense(2)(nn.relu(h))

    model, x = Sowing(), jnp.arange(15.0).reshape(3, 5) / 10
    variables = model.init(jax.random.key(0), x)
    stats = diagnostics.activation_stats(model, variables, x, activation="relu")
    assert list(stats) == ["Dense_0", "Dense_1"]
    first = np.maximum(np.asarray(x, np.float64).sum(1, keepdims=True) * np.ones(4), 0)
    np.testing.assert_allclose(stats["Dense_0"].mean, first.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="matched no layer"):
        diagnostics.activation_stats(model, variables, x, activation="relu", layers=nn.Conv)


def test_activation_stats_bad_input_gives_clear_errors():
    params = _diagonal_params([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match="activation.*'sigmod'"):
        diagnostics.activation_stats(_DiagonalMLP(), params, x, activation="sigmod")
    with pytest.raises(TypeError, match="activation.*int"):
        diagnostics.activation_stats(_DiagonalMLP(), params, x, activation=3)
    with pytest.raises(ValueError, match="saturation_threshold.*0.7"):
        diagnostics.activation_stats(
            _DiagonalMLP(), params, x, activation="sigmoid", saturation_threshold=0.7
        )
    with pytest.raises(ValueError, match="layers.*matched no layer"):
        diagnostics.activation_stats(
            _DiagonalMLP(), params, x, activation="sigmoid", layers=nn.Conv
        )



class _PairOfDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x), nn.Dense(4)(x)


class _SumOfPair(nn.Module):
    @nn.compact
    def __call__(self, x):
        a, b = _PairOfDense()(x)
        return a + b


def test_activation_stats_names_a_layer_whose_output_is_a_tuple():
    model, x = _SumOfPair(), jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'_PairOfDense_0' returns a tuple"):
        diagnostics.activation_stats(model, variables, x, activation="relu", layers=_PairOfDense)


class _Bfloat16Sigmoid(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.sigmoid(nn.Dense(64, dtype=jnp.bfloat16)(x))


def test_activation_stats_of_a_bfloat16_model_match_its_output():
    # Reference: the model's own jitted output, summarized in float64. XLA may
    # fuse the Dense and the sigmoid without rounding in between, where the
    # captured output is rounded to bfloat16: agreement to bfloat16's resolution.
    model, x = _Bfloat16Sigmoid(), jax.random.normal(jax.random.key(2), (256, 16)) * 3
    variables = model.init(jax.random.key(3), x)
    y = np.asarray(jax.jit(model.apply)(variables, x), np.float64)
    stats = diagnostics.activation_stats(model, variables, x, activation="sigmoid")["Dense_0"]
    resolution = float(jnp.finfo(jnp.bfloat16).eps)
    assert stats.mean == pytest.approx(y.mean(), rel=resolution)
    assert stats.std == pytest.approx(y.std(), rel=resolution)
    assert stats.saturated_fraction == pytest.approx(np.mean((y <= 0.01) | (y >= 0.99)), abs=0.01)


# ---------------------------------------------------------------- plot_gradient_norms


def test_plot_gradient_norms_writes_a_png(tmp_path):
    runs = {
        "sigmoid": {"Dense_0/kernel": 1e-9, "Dense_1/kernel": 1e-4, "Dense_2/kernel": 0.1},
        "relu": {"Dense_0/kernel": 0.3, "Dense_1/kernel": 0.0, "Dense_2/kernel": 0.5},
    }
    path = diagnostics.plot_gradient_norms(runs, tmp_path / "norms.png", title="test")
    assert path == tmp_path / "norms.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def test_plot_gradient_norms_without_matplotlib_names_the_examples_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "normjax\[examples\]"'):
        diagnostics.plot_gradient_norms({"a": {"Dense_0/kernel": 1.0}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_gradient_norms_draws_each_run_left_to_right(tmp_path, monkeypatch):
    # A run whose layers differ from the first run's: its new layer goes at the
    # end of the axis, and its line must still run left to right.
    import matplotlib.axes

    drawn = {}
    plot = matplotlib.axes.Axes.plot

    def recording_plot(self, xs, ys, *args, label=None, **kwargs):
        drawn[label] = (list(xs), list(ys))
        return plot(self, xs, ys, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    runs = {"dense": {"Dense_0/kernel": 1.0, "Dense_1/kernel": 2.0},
            "other": {"Conv_0/kernel": 3.0, "Dense_1/kernel": 4.0}}
    diagnostics.plot_gradient_norms(runs, tmp_path / "norms.png")
    assert drawn == {"dense": ([0, 1], [1.0, 2.0]), "other": ([1, 2], [4.0, 3.0])}


def test_plot_gradient_norms_rejects_no_runs(tmp_path):
    with pytest.raises(ValueError, match="runs"):
        diagnostics.plot_gradient_norms({}, tmp_path / "x.png")
