"""normjax.nnx against flax.nnx (the reference) and numpy float64 closed forms.

The drop-in proof: a small CNN built once with ``flax.nnx`` norms and once
with ``normjax.nnx`` norms from the same ``nnx.Rngs`` has the same
parameters, takes the same first optimizer step under ``nnx.jit`` and gives
the same outputs in evaluation mode (``debias=False`` for batch norm,
float32 tolerance). Keys use the ``rbg`` implementation only because its
initializers compile faster than threefry's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx
from sklearn.datasets import load_digits

from normjax import nnx as njx

KEY = functools.partial(jax.random.key, impl="rbg")

PAIRS = [
    (njx.BatchNorm, nnx.BatchNorm),
    (njx.LayerNorm, nnx.LayerNorm),
    (njx.RMSNorm, nnx.RMSNorm),
    (njx.GroupNorm, nnx.GroupNorm),
    (njx.InstanceNorm, nnx.InstanceNorm),
]


FLAX_VARIANTS = {"flax default": {}, "flax use_fast_variance=False": {"use_fast_variance": False}}


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(KEY(seed))


def _max_abs_diff(a, b) -> float:
    return max(
        (
            float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ),
        default=0.0,
    )


def _without_count(state: nnx.State) -> dict:
    flat = {path: v for path, v in nnx.to_flat_state(state) if path[-1] != "count"}
    return jax.tree.map(lambda v: v[...], flat, is_leaf=lambda v: isinstance(v, nnx.Variable))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[..., None], data.target.astype(np.int32)


# ----------------------------------------------------------------------------
# Interface: constructor, variables, modes, transforms.


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: getattr(c, "__name__", ""))
def test_constructor_extends_flax_nnx_with_the_same_defaults_and_order(ours, theirs):
    def params(cls):
        sig = inspect.signature(cls.__init__).parameters.values()
        return [(p.name, p.kind, p.default) for p in sig]

    theirs_params, ours_params = params(theirs), params(ours)
    assert ours_params[: len(theirs_params)] == theirs_params


def test_batch_renorm_takes_batch_norm_arguments_and_clips():
    module = njx.BatchRenorm(3, momentum=0.5, r_max=2.0, d_max=1.0, debias=False, rngs=_rngs())
    assert (module.momentum, module.r_max, module.d_max, module.debias) == (0.5, 2.0, 1.0, False)


@pytest.mark.parametrize("cls", [njx.BatchNorm, njx.BatchRenorm])
def test_variables_are_flax_names_plus_count(cls):
    ours, theirs = cls(5, rngs=_rngs()), nnx.BatchNorm(5, rngs=_rngs())
    for kind in (nnx.Param, nnx.BatchStat):
        flax_state = nnx.to_flat_state(nnx.state(theirs, kind))
        our_state = nnx.to_flat_state(nnx.state(ours, kind))
        assert {p for p, _ in our_state} == {p for p, _ in flax_state} | (
            {("count",)} if kind is nnx.BatchStat else set()
        )
    chex.assert_trees_all_equal(_without_count(nnx.state(ours)), _without_count(nnx.state(theirs)))
    assert ours.count[...].dtype == jnp.int32 and ours.count[...].shape == ()


def test_batch_norm_promotes_x_with_the_running_statistics_as_flax_nnx_does():
    # Flax NNX calls promote_dtype on (x, mean, var, scale, bias): a custom one
    # written to that contract works, and a bfloat16 x with float32 statistics
    # gives float32 (with bfloat16 parameters or none, too).
    seen = []

    def promote(arrays, dtype=None):
        seen.append(len(arrays))
        return flax.nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype)

    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.bfloat16)
    for extra in ({}, {"param_dtype": jnp.bfloat16}, {"use_scale": False, "use_bias": False},
                  {"dtype": jnp.bfloat16}):
        ours = njx.BatchNorm(6, use_running_average=False, promote_dtype=promote,
                             rngs=_rngs(), **extra)
        theirs = nnx.BatchNorm(6, use_running_average=False, rngs=_rngs(), **extra)
        y, expected = ours(x), theirs(x)
        assert y.dtype == expected.dtype, (extra, y.dtype, expected.dtype)
        chex.assert_trees_all_close(y.astype(jnp.float32), expected.astype(jnp.float32),
                                    atol=2e-2, rtol=2e-2)
    assert set(seen) == {5}


def test_group_norm_resolves_and_checks_its_groups_when_built_as_flax_nnx_does():
    for kw in ({"num_groups": 3}, {"num_groups": None, "group_size": 2}):
        ours, theirs = njx.GroupNorm(6, rngs=_rngs(), **kw), nnx.GroupNorm(6, rngs=_rngs(), **kw)
        assert (ours.num_groups, ours.group_size, ours.feature_axis) == (
            theirs.num_groups, theirs.group_size, theirs.feature_axis)
    for kw in ({"num_groups": 4}, {"num_groups": None}, {"num_groups": 3, "group_size": 2},
               {"num_groups": None, "group_size": 4}, {"num_groups": True}):
        with pytest.raises(ValueError, match="normjax.nnx.GroupNorm: .*(num_groups|group_size)"):
            njx.GroupNorm(6, rngs=_rngs(), **kw)


def test_flax_nnx_statistics_loaded_with_a_large_count_go_on_as_flax_would():
    # The README's recipe: nnx.update from a flax.nnx.BatchNorm's state (which
    # has no count), then count = 2**30; training then weighs each batch
    # 1 - momentum, as Flax does.
    x = jax.random.normal(KEY(5), (16, 6))
    # (Flax's stable variance: its default one-pass formula is off by 4e-5 on x + 10)
    theirs = nnx.BatchNorm(6, momentum=0.9, use_fast_variance=False, rngs=_rngs())
    for step in range(5):
        theirs(x + step)
    ours = njx.BatchNorm(6, momentum=0.9, rngs=_rngs())
    nnx.update(ours, nnx.split(theirs)[1])
    ours.count[...] = 2**30
    ours.eval(), theirs.eval()
    chex.assert_trees_all_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()
    chex.assert_trees_all_close(ours(x + 10), theirs(x + 10), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((ours.mean[...], ours.var[...]),
                                (theirs.mean[...], theirs.var[...]), atol=1e-5, rtol=1e-5)


def test_train_and_eval_switch_batch_norm_like_flax():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.bn = njx.BatchNorm(3, rngs=rngs)
            self.flax_bn = nnx.BatchNorm(3, rngs=rngs)

    block = Block(_rngs())
    x = 2.0 + jax.random.normal(KEY(1), (8, 3))
    block.eval()
    assert block.bn.use_running_average is True is block.flax_bn.use_running_average
    before = nnx.clone(nnx.state(block.bn, nnx.BatchStat))
    block.bn(x)
    chex.assert_trees_all_equal(nnx.state(block.bn, nnx.BatchStat), before)
    block.train()
    assert block.bn.use_running_average is False is block.flax_bn.use_running_average
    block.bn(x)
    assert int(block.bn.count[...]) == 1
    np.testing.assert_allclose(block.bn.mean[...], np.mean(np.asarray(x), 0), rtol=1e-5)
    assert nnx.view(block, use_running_average=True).bn.use_running_average is True


def test_split_merge_and_jit_match_the_stateful_call():
    model = njx.BatchNorm(4, momentum=0.5, rngs=_rngs())
    x = 1.0 + jax.random.normal(KEY(1), (6, 4))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def functional(params, stats, x):
        module = nnx.merge(graphdef, params, stats)
        y = module(x)
        return y, nnx.state(module, nnx.BatchStat)

    y_functional, new_stats = functional(params, stats, x)
    y_jit = nnx.jit(lambda m, x: m(x))(model, x)  # updates ``model`` in place
    chex.assert_trees_all_equal(y_functional, y_jit)
    chex.assert_trees_all_equal(new_stats, nnx.state(model, nnx.BatchStat))
    assert int(model.count[...]) == 1


def test_batch_norm_under_nnx_vmap_with_axis_name_matches_flax():
    x = 1.0 + jax.random.normal(KEY(0), (4, 6, 3))
    results = []
    for module in (
        njx.BatchNorm(3, axis_name="d", debias=False, rngs=_rngs()),
        nnx.BatchNorm(3, axis_name="d", rngs=_rngs()),
    ):
        y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="d")(module, x)
        results.append((y, _without_count(nnx.state(module, nnx.BatchStat))))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-6, rtol=1e-6)
    # Statistics over all four shards: those of the whole batch.
    np.testing.assert_allclose(
        results[0][1][("mean",)], 0.01 * np.asarray(x).reshape(-1, 3).mean(0), rtol=1e-5
    )


def test_flat_num_features_over_several_feature_axes_matches_flax_nnx():
    # Flax NNX keeps one flat (num_features,) vector even for several feature axes.
    x = 1.0 + jax.random.normal(KEY(0), (2, 3, 4))
    kwargs = dict(reduction_axes=(1, 2), feature_axes=(1, 2), rngs=_rngs())
    ours, theirs = njx.LayerNorm(12, **kwargs), nnx.LayerNorm(12, **kwargs)
    params = np.random.default_rng(0).uniform(0.5, 1.5, (2, 12)).astype(np.float32)
    for module in (ours, theirs):
        module.scale[...], module.bias[...] = params
    y1, y2 = nnx.jit(lambda a, b, x: (a(x), b(x)))(ours, theirs, x)
    chex.assert_trees_all_close(y1, y2, atol=1e-5, rtol=1e-5)
    chex.assert_shape(ours.scale[...], (12,))


# ----------------------------------------------------------------------------
# Flax NNX's GroupNorm off the default axes, against numpy float64.


def test_group_norm_with_an_unreduced_axis_matches_float64_where_flax_nnx_does_not():
    x = np.random.default_rng(0).normal(1.0, 2.0, (2, 3, 4, 6)).astype(np.float32)
    groups, eps = 3, 1e-6
    reduction_axes = (2, 3)  # axis 1 is left unreduced: statistics per (n, h, group)
    grouped = x.astype(np.float64).reshape(2, 3, 4, groups, 6 // groups)
    mean = grouped.mean((2, 4), keepdims=True)
    var = grouped.var((2, 4), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape)

    ours = njx.GroupNorm(6, num_groups=groups, reduction_axes=reduction_axes, rngs=_rngs())
    np.testing.assert_allclose(ours(x), expected, atol=1e-5, rtol=1e-5)
    # The reference is Flax linen's behaviour too.
    linen = flax.linen.GroupNorm(num_groups=groups, reduction_axes=reduction_axes)
    np.testing.assert_allclose(linen.apply(linen.init(KEY(0), x), x), expected, atol=1e-5)
    theirs = nnx.GroupNorm(6, num_groups=groups, reduction_axes=reduction_axes, rngs=_rngs())
    flax_error = float(np.max(np.abs(np.asarray(theirs(x)) - expected)))
    print(f"flax.nnx.GroupNorm with reduction_axes={reduction_axes}: max |error| {flax_error:.3f}")
    if flax.__version__.startswith("0.12."):
        assert flax_error > 0.1  # the case exercises Flax NNX's repeat along axis 1


# ----------------------------------------------------------------------------
# Bad input: clear errors naming the module and the argument.


def _modules(num_features: int) -> list[nnx.Module]:
    return [
        njx.BatchNorm(num_features, rngs=_rngs()),
        njx.BatchRenorm(num_features, rngs=_rngs()),
        njx.LayerNorm(num_features, rngs=_rngs()),
        njx.RMSNorm(num_features, rngs=_rngs()),
        njx.GroupNorm(num_features, num_groups=2, rngs=_rngs()),
        njx.InstanceNorm(num_features, rngs=_rngs()),
    ]


@pytest.mark.parametrize("index", range(6))
def test_feature_count_mismatch_is_a_clear_error(index):
    module = _modules(6)[index]
    pattern = (
        rf"normjax\.nnx\.{type(module).__name__}.*`x` has feature shape \(8,\).*num_features=6"
    )
    with pytest.raises(ValueError, match=pattern):
        jax.eval_shape(lambda x: module(x), jnp.ones((4, 3, 8)))


@pytest.mark.parametrize("cls", [njx.BatchNorm, njx.LayerNorm])
def test_a_feature_shape_given_must_match_not_only_its_size(cls):
    # (3, 4) parameters read as (4, 3) or (2, 6) would be the wrong features'.
    if cls is njx.BatchNorm:
        axes = {"axis": (1, 2), "use_running_average": False}
    else:
        axes = {"feature_axes": (1, 2), "reduction_axes": (1, 2)}
    module = cls((3, 4), rngs=_rngs(), **axes)
    for shape in [(8, 4, 3), (8, 2, 6)]:
        with pytest.raises(ValueError, match=rf"feature shape \({shape[1]}, {shape[2]}\)"):
            jax.eval_shape(module, jnp.ones(shape))
    # A flat count, as Flax stores it, takes any feature shape of that size.
    x = np.random.default_rng(31).normal(size=(8, 4, 3)) + 1
    y = np.asarray(cls(12, rngs=_rngs(), **axes)(jnp.asarray(x, jnp.float32)), np.float64)
    if cls is njx.BatchNorm:
        expected = ref.batch_norm_train(x, axis=(1, 2))
    else:
        expected = ref.layer_norm(x, reduction_axes=(1, 2), feature_axes=(1, 2))
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "num_features", [np.int64(8), np.int32(8), jnp.int32(8), (np.int64(2), 4)]
)
def test_num_features_may_be_a_numpy_or_jax_integer(num_features):
    # As Flax takes them; a numpy int was "'numpy.int64' object is not iterable".
    module = njx.LayerNorm(num_features, rngs=_rngs())
    expected = (8,) if np.ndim(num_features) == 0 else (2, 4)
    assert module.scale[...].shape == expected


@pytest.mark.parametrize("bad", [8.0, None, "16", True, -1, (2, 4.0)])
def test_num_features_of_another_type_is_a_clear_error(bad):
    # "16" had become the shape (1, 6), and (2, 4.0) the shape (2, 4).
    with pytest.raises(TypeError, match=r"normjax\.nnx\.LayerNorm: `num_features` must be"):
        njx.LayerNorm(bad, rngs=_rngs())


def test_a_float64_model_keeps_float64_running_statistics():
    with jax.enable_x64(True):
        x = np.random.default_rng(6).normal(size=(64, 4)) + 1e4 + 1 / 3
        bn = njx.BatchNorm(4, momentum=0.0, param_dtype=jnp.float64, rngs=_rngs())
        assert bn.mean[...].dtype == jnp.float64
        bn(jnp.asarray(x), use_running_average=False)
        np.testing.assert_allclose(bn.mean[...], x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(bn.var[...], x.var(0), rtol=1e-9)
    assert njx.BatchNorm(4, rngs=_rngs()).mean[...].dtype == jnp.float32


@pytest.mark.parametrize("index", range(6))
def test_mask_of_the_wrong_shape_is_a_clear_error(index):
    module = _modules(6)[index]
    x, mask = jnp.ones((4, 3, 6)), jnp.ones((4, 5), bool)
    pattern = rf"normjax\.nnx\.{type(module).__name__}.*`mask` of shape \(4, 5\)"
    with pytest.raises(ValueError, match=pattern):
        jax.eval_shape(lambda x: module(x, mask=mask), x)


@pytest.mark.parametrize("cls", [njx.GroupNorm, njx.InstanceNorm])
def test_per_sample_norm_axis_name_pools_the_split_axis(cls):
    # x[d] is device d's slice of the spatial axis (d, n, h, c): with axis_name the
    # statistics are those of each whole sample, against the float64 reference.
    x = 1.0 + jax.random.normal(KEY(0), (4, 2, 5, 6))
    kwargs = {"num_groups": 2} if cls is njx.GroupNorm else {}
    module = cls(6, axis_name="d", rngs=_rngs(), **kwargs)
    module.scale[...] = jnp.linspace(0.5, 1.5, 6)
    module.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="d")(module, x)
    whole = np.asarray(x, np.float64).transpose(1, 0, 2, 3).reshape(2, 20, 6)
    scale, bias = np.linspace(0.5, 1.5, 6), np.linspace(-1.0, 1.0, 6)
    if cls is njx.GroupNorm:
        expected = ref.group_norm(whole, scale, bias, num_groups=2, epsilon=1e-6)
    else:
        expected = ref.instance_norm(whole, scale, bias, epsilon=1e-6)
    expected = expected.reshape(2, 4, 5, 6).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [njx.BatchNorm, njx.BatchRenorm])
def test_use_running_average_unset_is_a_clear_error(cls):
    module = cls(3, use_running_average=None, rngs=_rngs())
    with pytest.raises(ValueError, match=rf"normjax\.nnx\.{cls.__name__}.*`use_running_average`"):
        jax.eval_shape(lambda x: module(x), jnp.ones((4, 3)))


# ----------------------------------------------------------------------------
# Drop-in proof: the same NNX CNN with Flax's norms and with normjax's.

NormFactory = Callable[..., nnx.Module]  # (num_features, *, rngs) -> norm


class CNN(nnx.Module):
    """conv -> norm -> relu per factory in ``norms``, then a linear classifier on 8x8 input."""

    def __init__(self, norms: Sequence[NormFactory], *, rngs: nnx.Rngs):
        convs, norm_layers = [], []
        channels = [1] + [8] * len(norms)
        # Built conv, norm, conv, norm, ... so both libraries draw keys in the same order.
        for c_in, c_out, make_norm in zip(channels[:-1], channels[1:], norms, strict=True):
            convs.append(nnx.Conv(c_in, c_out, (3, 3), rngs=rngs))
            norm_layers.append(make_norm(c_out, rngs=rngs))
        self.convs, self.norms = nnx.List(convs), nnx.List(norm_layers)
        self.head = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


def _loss(model: CNN, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _step(model: CNN, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


_train_step = nnx.jit(_step)


@nnx.jit
def _forward(model: CNN, x):
    return model(x)


def _predict(model: CNN, x):
    model.eval()
    logits = _forward(model, x)
    model.train()
    return logits


@nnx.jit
def _step_and_evaluate_all(models, optimizers, x, y, x_test):
    """One optimizer step of each model, then each in evaluation mode: one compile for all."""
    results = []
    for model, optimizer in zip(models, optimizers, strict=True):
        loss = _step(model, optimizer, x, y)
        evaluator = nnx.view(model, use_running_average=True, raise_if_not_found=False)
        results.append((loss, evaluator(x_test)))
    return results


def _assert_drop_in(ours: CNN, flax_models: dict[str, CNN], digits) -> dict[str, dict]:
    """One step and evaluation of ours and every Flax model; the largest differences."""
    images, labels = digits
    x, y, x_test = images[:32], labels[:32], images[100:164]
    models = [ours, *flax_models.values()]
    # Same Rngs, same draws: every conv and linear kernel identical.
    initial_params = _without_count(nnx.state(ours, nnx.Param))
    for model in flax_models.values():
        chex.assert_trees_all_equal(initial_params, _without_count(nnx.state(model, nnx.Param)))
    optimizers = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    # Full float32 convolutions: a GPU's default TensorFloat-32 rounds inputs to
    # 10 bits, turning the norms' last-bit differences into 1e-3 ones.
    with jax.default_matmul_precision("highest"):
        (loss1, eval1), *flax_results = _step_and_evaluate_all(models, optimizers, x, y, x_test)
    counts = [v[...] for p, v in nnx.to_flat_state(nnx.state(ours)) if p[-1] == "count"]
    assert all(int(c) == 1 for c in counts)
    state1 = _without_count(nnx.state(ours))
    diffs = {}
    for (name, model), (loss2, eval2) in zip(flax_models.items(), flax_results, strict=True):
        state2 = _without_count(nnx.state(model))
        chex.assert_trees_all_close(state1, state2, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(eval1, eval2, atol=1e-4, rtol=1e-4)
        diffs[name] = {
            "loss": _max_abs_diff(loss1, loss2),
            "params_and_batch_stats": _max_abs_diff(state1, state2),
            "eval_logits": _max_abs_diff(eval1, eval2),
        }
    return diffs


def test_batch_norm_cnn_is_a_drop_in_for_flax_nnx(digits):
    ours = CNN([functools.partial(njx.BatchNorm, momentum=0.9, debias=False)] * 3, rngs=_rngs())
    flax_models = {
        name: CNN([functools.partial(nnx.BatchNorm, momentum=0.9, **extra)] * 3, rngs=_rngs())
        for name, extra in FLAX_VARIANTS.items()
    }
    print("nnx BatchNorm CNN, max |diff|:", _assert_drop_in(ours, flax_models, digits))


def test_every_per_sample_norm_in_one_cnn_is_a_drop_in_for_flax_nnx(digits):
    def norms(lib, **extra):
        return [
            functools.partial(lib.LayerNorm, **extra),
            functools.partial(lib.GroupNorm, num_groups=4, **extra),
            functools.partial(lib.InstanceNorm, **extra),
            functools.partial(lib.RMSNorm, **extra),
        ]

    ours = CNN(norms(njx), rngs=_rngs())
    flax_models = {
        name: CNN(norms(nnx, **extra), rngs=_rngs()) for name, extra in FLAX_VARIANTS.items()
    }
    print("nnx LN+GN+IN+RMS CNN, max |diff|:", _assert_drop_in(ours, flax_models, digits))


def test_nnx_jit_training_on_digits_lowers_the_loss(digits):
    images, labels = digits
    model = CNN([njx.BatchNorm] * 3, rngs=_rngs())
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        batch = rng.choice(1500, 64, replace=False)
        losses.append(float(_train_step(model, optimizer, images[batch], labels[batch])))
    accuracy = float(jnp.mean(jnp.argmax(_predict(model, images[1500:]), -1) == labels[1500:]))
    print(f"nnx digits: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, acc {accuracy:.3f}")
    assert losses[0] > 2.0  # chance level is ln(10) = 2.30
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert accuracy > 0.7  # held-out, evaluation mode: the running statistics work
