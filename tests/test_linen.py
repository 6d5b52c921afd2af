"""normjax.linen against flax.linen (the reference) and numpy float64 closed forms.

The drop-in proof: a small CNN written once with ``flax.linen`` norms and once
with ``normjax.linen`` norms gives, from the same keys, the same parameters,
the same evaluation outputs and the same first SGD step (``debias=False``
for batch norm, float32 tolerance). Random keys use the ``rbg``
implementation only because its initializers compile in a fraction of the
time of threefry's; both models get the very same keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import flax
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from hypothesis import given, settings
from sklearn.datasets import load_digits

from normjax import linen as njl

KEY = functools.partial(jax.random.key, impl="rbg")

PAIRS = [
    (njl.BatchNorm, nn.BatchNorm),
    (njl.LayerNorm, nn.LayerNorm),
    (njl.RMSNorm, nn.RMSNorm),
    (njl.GroupNorm, nn.GroupNorm),
    (njl.InstanceNorm, nn.InstanceNorm),
]
NORMJAX_FIELDS = ("debias", "unbiased_running_var", "skip_nonfinite")


def _fields(cls: type) -> list[tuple[str, object]]:
    return [
        (f.name, f.default) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")
    ]


def _max_abs_diff(a, b) -> float:
    return max(
        (
            float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ),
        default=0.0,
    )


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    return images, data.target.astype(np.int32)


# ----------------------------------------------------------------------------
# Interface: fields, variables, modes.


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: getattr(c, "__name__", ""))
def test_fields_extend_flax_with_the_same_defaults_and_order(ours, theirs):
    flax_fields = _fields(theirs)
    assert _fields(ours)[: len(flax_fields)] == flax_fields


def test_batch_renorm_fields_are_batch_norm_plus_clips():
    assert _fields(njl.BatchRenorm) == _fields(njl.BatchNorm) + [("r_max", 3.0), ("d_max", 5.0)]
    assert [name for name, _ in _fields(njl.BatchNorm)][-3:] == list(NORMJAX_FIELDS)


@pytest.mark.parametrize("cls", [njl.BatchNorm, njl.BatchRenorm])
def test_batch_norm_variables_are_flax_names_plus_count(cls):
    x = jax.random.normal(KEY(0), (6, 3, 4))
    ours = cls(use_running_average=False).init(KEY(1), x)
    flax_vars = nn.BatchNorm(use_running_average=False).init(KEY(1), x)
    counts = ours["batch_stats"].pop("count")
    chex.assert_trees_all_equal(ours, flax_vars)  # values, shapes and dtypes
    chex.assert_shape(counts, ())
    assert counts.dtype == jnp.int32 and int(counts) == 0


def test_running_stats_change_only_when_mutable_and_not_during_init():
    x = 3.0 + 2.0 * jax.random.normal(KEY(0), (16, 4))
    bn = njl.BatchNorm()
    variables = bn.init(KEY(1), x, False)  # training mode, yet no update during init
    chex.assert_trees_all_equal(
        variables["batch_stats"],
        {"mean": jnp.zeros(4), "var": jnp.ones(4), "count": jnp.zeros((), jnp.int32)},
    )
    _, updated = bn.apply(variables, x, False, mutable=["batch_stats"])
    assert int(updated["batch_stats"]["count"]) == 1
    # debias=True: after one update the running mean is the batch mean.
    np.testing.assert_allclose(updated["batch_stats"]["mean"], np.mean(np.asarray(x), 0), 1e-5)
    # Evaluation leaves the statistics alone, even when they are mutable.
    _, same = bn.apply(variables, x, True, mutable=["batch_stats"])
    chex.assert_trees_all_equal(same["batch_stats"], variables["batch_stats"])
    # Training with immutable statistics is Flax's error, exactly as flax.linen.BatchNorm's.
    flax_bn = nn.BatchNorm(use_running_average=False)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        flax_bn.apply(flax_bn.init(KEY(1), x), x)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        bn.apply(variables, x, False)


def test_init_with_a_single_example_in_training_mode_works_as_in_flax():
    x = jnp.ones((1, 5))
    ours = njl.BatchNorm(use_running_average=False).init(KEY(0), x)
    theirs = nn.BatchNorm(use_running_average=False).init(KEY(0), x)
    ours["batch_stats"].pop("count")
    chex.assert_trees_all_equal(ours, theirs)


# ----------------------------------------------------------------------------
# Layer by layer against Flax, both of Flax's variance formulas. Every layer
# runs in one jit-compiled function per library, to compile once.

LAYER_CASES = [
    ("BatchNorm", dict(use_running_average=False, momentum=0.9), dict(debias=False)),
    ("BatchNorm", dict(use_running_average=False, axis=(1, 3)), dict(debias=False)),
    ("LayerNorm", dict(reduction_axes=(1, 2, 3), feature_axes=(2, 3)), {}),
    ("RMSNorm", dict(reduction_axes=(2, 3)), {}),
    ("GroupNorm", dict(num_groups=3), {}),
    ("GroupNorm", dict(num_groups=None, group_size=2, reduction_axes=(2, 3)), {}),
    ("InstanceNorm", dict(feature_axes=(1, 3)), {}),
]


def _initial_variables(module: nn.Module, x: jax.Array, seed: int, **call_kwargs):
    """Variables of ``module`` for ``x``: random params, Flax's initial statistics."""
    shapes = jax.eval_shape(functools.partial(module.init, **call_kwargs), KEY(0), x)
    rng = np.random.default_rng(seed)
    fill = {"mean": np.zeros, "var": np.ones, "count": lambda s, d: np.zeros(s, d)}

    def make(path, leaf):
        name = path[-1].key
        if path[0].key == "params":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(fill[name](leaf.shape, leaf.dtype))

    return jax.tree_util.tree_map_with_path(make, shapes)


def _layers_and_grads(modules, variables, x, mask=None):
    """Per layer: output, updated batch stats, and gradients wrt params and x; one jit."""

    @jax.jit
    def run(variables, x, mask):
        results = []
        for module, v in zip(modules, variables, strict=True):

            def loss(params, x, module=module, v=v):
                y, state = module.apply({**v, "params": params}, x, mask=mask, mutable=True)
                return jnp.sum(jnp.sin(y)), (y, state.get("batch_stats", {}))

            (_, out), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(v["params"], x)
            results.append((out, grads))
        return results

    return run(variables, x, mask)


def _strip_counts(results):
    """Drops normjax's extra ``count`` so the results compare with Flax's."""
    return [((y, {k: v for k, v in s.items() if k != "count"}), g) for (y, s), g in results]


def test_every_layer_matches_flax_outputs_stats_and_grads_with_both_variance_formulas():
    x = 0.5 + 2.0 * jax.random.normal(KEY(0), (4, 5, 3, 6))
    ours = [getattr(njl, name)(**kw, **extra) for name, kw, extra in LAYER_CASES]
    theirs = [
        getattr(nn, name)(**kw, use_fast_variance=fast)
        for fast in (True, False)
        for name, kw, _ in LAYER_CASES
    ]
    our_vars = [_initial_variables(m, x, seed) for seed, m in enumerate(ours)]
    flax_vars = [_initial_variables(m, x, seed % len(ours)) for seed, m in enumerate(theirs)]
    results = _strip_counts(_layers_and_grads(ours, our_vars, x))
    flax_results = _layers_and_grads(theirs, flax_vars, x)
    n = len(LAYER_CASES)
    for offset in (0, n):  # Flax's fast variance, then its exact one
        for i, (name, kw, _) in enumerate(LAYER_CASES):
            chex.assert_trees_all_close(
                results[i],
                flax_results[offset + i],
                atol=5e-5,
                rtol=5e-5,
                custom_message=f"{name} {kw} fast_variance={offset == 0}",
            )


def test_mask_restricts_the_statistics_like_flax():
    x = jax.random.normal(KEY(0), (6, 5, 4))
    mask = np.random.default_rng(0).random(x.shape) < 0.5
    # Keep at least two entries in every row, column and group, so that no
    # statistic is over an empty set (Flax gives NaN there).
    mask[:, :2, :] = True
    mask[:, :, :2] = True
    kinds = [("BatchNorm", dict(use_running_average=False), dict(debias=False))] + [
        (name, {"num_groups": 2} if name == "GroupNorm" else {}, {})
        for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
    ]
    ours = [getattr(njl, name)(**kw, **extra) for name, kw, extra in kinds]
    theirs = [getattr(nn, name)(**kw, use_fast_variance=False) for name, kw, _ in kinds]
    results = _layers_and_grads(ours, [_initial_variables(m, x, 0) for m in ours], x, mask)
    flax_results = _layers_and_grads(theirs, [_initial_variables(m, x, 0) for m in theirs], x, mask)
    chex.assert_trees_all_close(_strip_counts(results), flax_results, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask_dtype", [jnp.int32, jnp.float32])
def test_non_boolean_masks_count_their_nonzero_entries_like_flax(mask_dtype):
    # flax.linen takes any mask as booleans; so must a drop-in replacement.
    x = jax.random.normal(KEY(0), (6, 5, 4))
    mask = np.random.default_rng(1).random(x.shape) < 0.5
    mask[:, :2, :] = True
    mask[:, :, :2] = True
    for name, kw in [("LayerNorm", {}), ("RMSNorm", {}), ("GroupNorm", {"num_groups": 2}),
                     ("InstanceNorm", {})]:
        ours, theirs = getattr(njl, name)(**kw), getattr(nn, name)(**kw, use_fast_variance=False)
        variables = _initial_variables(ours, x, 0)
        chex.assert_trees_all_close(ours.apply(variables, x, mask=jnp.asarray(mask, mask_dtype)),
                                    theirs.apply(variables, x, mask=mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_integer_input_is_normalized_as_flax_does(param_dtype):
    # Flax's output dtype promotes the input as given with the parameters:
    # int32 with bfloat16 parameters gives bfloat16, not float32.
    x = jnp.arange(72, dtype=jnp.int32).reshape(4, 3, 6) ** 2
    for ours, theirs in PAIRS:
        kwargs = {"num_groups": 3} if ours is njl.GroupNorm else {}
        if ours is njl.BatchNorm:
            kwargs = {"use_running_average": True}
        kwargs["param_dtype"] = param_dtype
        # (Flax's own variables: a batch norm's have no count, which ours takes)
        variables = theirs(**kwargs).init(KEY(4), x.astype(jnp.float32))
        y = ours(**kwargs).apply(variables, x)
        expected = theirs(**kwargs, use_fast_variance=False).apply(variables, x)
        assert y.dtype == expected.dtype == param_dtype
        tol = 1e-5 if param_dtype == jnp.float32 else 1e-2
        chex.assert_trees_all_close(y, expected, atol=tol, rtol=tol)


def test_flax_batch_stats_without_a_count_go_on_as_flax_would():
    # A flax.linen.BatchNorm checkpoint has no batch_stats/count. Evaluation
    # reads its statistics; training goes on weighing each batch 1 - momentum,
    # as Flax does: a count of 0 would make the next batch replace them.
    x = jax.random.normal(KEY(2), (16, 6))
    flax_bn = nn.BatchNorm(momentum=0.9)
    variables = flax_bn.init(KEY(3), x, use_running_average=False)
    for step in range(5):
        _, stats = flax_bn.apply(variables, x + step, use_running_average=False,
                                 mutable=["batch_stats"])
        variables = {**variables, **stats}
    ours = njl.BatchNorm(momentum=0.9)
    chex.assert_trees_all_close(ours.apply(variables, x, use_running_average=True),
                                flax_bn.apply(variables, x, use_running_average=True),
                                atol=1e-5, rtol=1e-5)
    y, ours_stats = ours.apply(variables, x + 10, use_running_average=False,
                               mutable=["batch_stats"])
    expected, flax_stats = flax_bn.apply(variables, x + 10, use_running_average=False,
                                         mutable=["batch_stats"])
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)
    # ... with Flax's structure, no count added: a lax.scan carry keeps it
    chex.assert_trees_all_close(ours_stats, flax_stats, atol=1e-5, rtol=1e-5)

    def step(stats, x):
        _, new = ours.apply({**variables, **stats}, x, use_running_average=False,
                            mutable=["batch_stats"])
        return new, None

    def flax_step(stats, x):
        _, new = flax_bn.apply({**variables, **stats}, x, use_running_average=False,
                               mutable=["batch_stats"])
        return new, None

    xs = jnp.stack([x + 10, x - 3, 2 * x])
    start = {"batch_stats": variables["batch_stats"]}
    chex.assert_trees_all_close(jax.lax.scan(step, start, xs)[0],
                                jax.lax.scan(flax_step, start, xs)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cast", ["pmean", "bfloat16"])
def test_batch_stats_with_a_floating_count_train_and_evaluate(cast):
    # lax.pmean over batch_stats (Flax's ImageNet example syncs them so) makes
    # the count float32; casting the variables for inference, bfloat16. Both
    # were a TypeError ("`state.count` must be an integer scalar"), even in
    # evaluation. The same batch_stats with an int32 count, as reference.
    x = jax.random.normal(KEY(4), (16, 6))
    bn = njl.BatchNorm(momentum=0.9)
    variables = bn.init(KEY(5), x, use_running_average=False)
    _, stats = bn.apply(variables, x + 1, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **stats}
    if cast == "pmean":
        floating = jax.vmap(lambda v: jax.lax.pmean(v, "d"), axis_name="d", in_axes=None,
                            out_axes=None, axis_size=2)(variables)
        chex.assert_type(floating["batch_stats"]["count"], jnp.float32)
    else:
        floating = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
        variables = jax.tree.map(lambda v, f: f.astype(v.dtype), variables, floating)
    for training in (False, True):
        expected = bn.apply(variables, x - 2, use_running_average=not training,
                            mutable=["batch_stats"])
        actual = bn.apply(floating, x - 2, use_running_average=not training,
                          mutable=["batch_stats"])
        chex.assert_trees_all_close(jax.tree.map(lambda v: v.astype(jnp.float32), actual),
                                    jax.tree.map(lambda v: v.astype(jnp.float32), expected),
                                    atol=2e-2 if cast == "bfloat16" else 1e-6, rtol=1e-2)
    if cast == "pmean":
        # and against the float64 debiased average of the two batches' means
        means = [np.asarray(b, np.float64).mean(0) for b in (x + 1, x - 2)]
        np.testing.assert_allclose(actual[1]["batch_stats"]["mean"],
                                   ref.running_average(means, 0.9, debias=True, initial=0.0),
                                   rtol=1e-5, atol=1e-6)


def test_output_dtype_follows_flax():
    x = jax.ShapeDtypeStruct((4, 3, 6), jnp.bfloat16)
    for ours, theirs in PAIRS:
        kwargs = {"num_groups": 3} if ours is njl.GroupNorm else {}
        if ours is njl.BatchNorm:
            kwargs = {"use_running_average": False}
        for extra in ({}, {"dtype": jnp.bfloat16}, {"param_dtype": jnp.bfloat16}):
            dtypes = []
            for module in (ours(**kwargs, **extra), theirs(**kwargs, **extra)):
                variables = jax.eval_shape(module.init, KEY(1), x)
                y, _ = jax.eval_shape(functools.partial(module.apply, mutable=True), variables, x)
                dtypes.append(y.dtype)
            assert dtypes[0] == dtypes[1], (ours.__name__, extra, dtypes)


def test_batch_norm_axis_name_under_vmap_matches_flax():
    x = 1.0 + jax.random.normal(KEY(0), (4, 8, 3))
    outs = []
    for module in (
        njl.BatchNorm(False, axis_name="d", debias=False),
        nn.BatchNorm(False, axis_name="d"),
    ):
        variables = _initial_variables(module, x[0], 0)
        apply = functools.partial(module.apply, variables, mutable=["batch_stats"])
        y, state = jax.jit(jax.vmap(apply, axis_name="d"))(x)
        state["batch_stats"].pop("count", None)
        outs.append((y, jax.tree.map(lambda s: s[0], state)))
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------
# normjax's own options, against numpy float64 closed forms.


# (momentum, debias, axis); momentum None is the cumulative average.
EMA_CONFIGS = [
    (0.9, True, -1),
    (0.9, False, -1),
    (0.5, True, (1, 2)),
    (0.99, False, 1),
    (None, True, -1),
]


def test_batch_norm_running_stats_match_float64_ema():
    batches = np.random.default_rng(0).normal(2.0, 3.0, (3, 5, 4, 3)).astype(np.float32)
    modules = [njl.BatchNorm(axis=a, momentum=m, debias=d) for m, d, a in EMA_CONFIGS]
    initial = [
        _initial_variables(bn, batches[0], seed, use_running_average=False)
        for seed, bn in enumerate(modules)
    ]

    @jax.jit
    def run(initial, batches):
        traces = []
        for bn, variables in zip(modules, initial, strict=True):
            steps = []
            for t in range(len(batches)):
                y, state = bn.apply(variables, batches[t], False, mutable=["batch_stats"])
                variables = {**variables, **state}
                steps.append((y, state["batch_stats"]))
            traces.append((steps, bn.apply(variables, batches[0], True)))
        return traces

    for (momentum, debias, axis), variables, (steps, y_eval) in zip(
        EMA_CONFIGS, initial, run(initial, batches), strict=True
    ):
        axes = tuple(a % 3 for a in ((axis,) if isinstance(axis, int) else axis))
        reduced = tuple(a for a in range(3) if a not in axes)
        keep = functools.partial(np.expand_dims, axis=reduced)
        scale = keep(np.asarray(variables["params"]["scale"], np.float64))
        bias = keep(np.asarray(variables["params"]["bias"], np.float64))
        mean, var = 0.0, 1.0
        for t, (x, (y, stats)) in enumerate(zip(batches, steps, strict=True), start=1):
            x64 = x.astype(np.float64)
            mu, sigma2 = x64.mean(reduced), x64.var(reduced)
            expected = (x64 - keep(mu)) / np.sqrt(keep(sigma2) + 1e-5) * scale + bias
            np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
            if momentum is None:
                w = 1 / t
            else:
                w = (1 - momentum) / (1 - momentum**t) if debias else 1 - momentum
            mean, var = mean + w * (mu - mean), var + w * (sigma2 - var)
            np.testing.assert_allclose(stats["mean"], mean, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(stats["var"], var, atol=1e-5, rtol=1e-5)
            assert int(stats["count"]) == t
        expected = (batches[0] - keep(mean)) / np.sqrt(keep(var) + 1e-5) * scale + bias
        np.testing.assert_allclose(y_eval, expected, atol=1e-4, rtol=1e-4)


def test_a_float64_model_keeps_float64_running_statistics():
    # Stored in float32, the running mean of data near 1e4 was 4.7e-4 off the
    # float64 batch mean after one step (Flax's turn float64 at that step).
    with jax.enable_x64(True):
        x = np.random.default_rng(5).normal(size=(64, 4)) + 1e4 + 1 / 3
        bn = njl.BatchNorm(use_running_average=False, momentum=0.0, param_dtype=jnp.float64)
        variables = bn.init(KEY(0), jnp.asarray(x))
        assert variables["batch_stats"]["mean"].dtype == jnp.float64
        _, state = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        stats = state["batch_stats"]
        assert stats["mean"].dtype == stats["var"].dtype == jnp.float64
        np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-9)
    # A float32 model's stay float32, as Flax's.
    variables = njl.BatchNorm(use_running_average=False).init(KEY(0), jnp.ones((4, 3)))
    assert variables["batch_stats"]["mean"].dtype == jnp.float32


def test_batch_renorm_matches_paper_algorithm_in_float64():
    rng = np.random.default_rng(0)
    first = rng.normal(0.0, 1.0, (16, 3)).astype(np.float32)
    second = rng.normal(4.0, 6.0, (16, 3)).astype(np.float32)  # far off: r and d clip
    r_max, d_max, eps = 1.5, 0.5, 1e-5
    module = njl.BatchRenorm(use_running_average=False, r_max=r_max, d_max=d_max)
    variables = module.init(KEY(0), first)
    _, state = module.apply(variables, first, mutable=["batch_stats"])
    y, _ = module.apply({**variables, **state}, second, mutable=["batch_stats"])
    # Ioffe 2017, Algorithm 1, with the running statistics after the first batch
    # (debias=True makes them the first batch's own statistics).
    f64, s64 = first.astype(np.float64), second.astype(np.float64)
    mu, sigma = f64.mean(0), np.sqrt(f64.var(0) + eps)
    mu_b, sigma_b = s64.mean(0), np.sqrt(s64.var(0) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    assert np.all(r == r_max) and np.all(np.abs(d) == d_max)  # the clips are active
    np.testing.assert_allclose(y, (s64 - mu_b) / sigma_b * r + d, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Bad input: clear errors naming the module and the argument.

BAD_INPUT_MODULES = [
    njl.BatchNorm(use_running_average=False),
    njl.BatchRenorm(use_running_average=False),
    njl.LayerNorm(),
    njl.RMSNorm(),
    njl.GroupNorm(num_groups=2),
    njl.InstanceNorm(),
]


def _abstract_apply(module: nn.Module, x_init, x, **kwargs):
    """Traces init and apply without running them: the errors are raised at trace time."""
    variables = jax.eval_shape(module.init, KEY(0), x_init)
    return jax.eval_shape(functools.partial(module.apply, mutable=True, **kwargs), variables, x)


@pytest.mark.parametrize("module", BAD_INPUT_MODULES, ids=lambda m: type(m).__name__)
def test_feature_count_changed_since_init_is_a_clear_error(module):
    pattern = rf"normjax\.linen\.{type(module).__name__}.*`x` has feature shape \(8,\).*\(6,\)"
    with pytest.raises(ValueError, match=pattern):
        _abstract_apply(module, jnp.ones((4, 3, 6)), jnp.ones((4, 3, 8)))


@settings(max_examples=20, deadline=None)
@given(
    init_shape=st.tuples(st.integers(2, 4), st.integers(1, 4), st.integers(1, 4)),
    call_shape=st.tuples(st.integers(2, 4), st.integers(1, 4), st.integers(1, 4)),
    axis=st.sampled_from([-1, 1, (1, 2)]),
)
def test_batch_norm_accepts_exactly_the_feature_shape_it_was_built_for(
    init_shape, call_shape, axis
):
    module = njl.BatchNorm(use_running_average=False, axis=axis)
    axes = (axis % 3,) if isinstance(axis, int) else axis
    built_for = tuple(init_shape[a] for a in axes)
    given_shape = tuple(call_shape[a] for a in axes)
    x_init, x = jnp.ones(init_shape), jnp.ones(call_shape)
    if given_shape == built_for:
        assert _abstract_apply(module, x_init, x)[0].shape == call_shape
    else:
        with pytest.raises(ValueError, match=r"BatchNorm.*`x` has feature shape"):
            _abstract_apply(module, x_init, x)


@pytest.mark.parametrize("module", BAD_INPUT_MODULES, ids=lambda m: type(m).__name__)
def test_mask_of_the_wrong_shape_is_a_clear_error(module):
    x = jnp.ones((4, 3, 6))
    with pytest.raises(ValueError, match=rf"{type(module).__name__}.*`mask` of shape \(4, 5\)"):
        _abstract_apply(module, x, x, mask=jnp.ones((4, 5), bool))


@pytest.mark.parametrize("cls", [njl.BatchNorm, njl.BatchRenorm])
def test_use_running_average_unset_is_flax_error_naming_the_module(cls):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*\"use_running_average\" must be"):
        jax.eval_shape(cls().init, KEY(0), x)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*passed to the constructor and at"):
        jax.eval_shape(lambda key: cls(use_running_average=True).init(key, x, False), KEY(0))


@pytest.mark.parametrize("name", ["GroupNorm", "InstanceNorm"])
def test_per_sample_norm_axis_name_pools_the_split_axis(name):
    # x[d] is device d's slice of the spatial axis (d, n, h, c): with axis_name the
    # statistics are those of each whole sample, i.e. of the unsplit (n, d*h, c)
    # array normalized on one device, against the float64 reference.
    x = 1.0 + jax.random.normal(KEY(0), (4, 2, 5, 6))
    kwargs = {"num_groups": 2} if name == "GroupNorm" else {}
    module = getattr(njl, name)(axis_name="d", **kwargs)
    variables = module.clone(axis_name=None).init(KEY(1), x[0])
    variables = jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size).reshape(p.shape),
                             variables)
    y = jax.jit(jax.vmap(functools.partial(module.apply, variables), axis_name="d"))(x)
    whole = np.asarray(x, np.float64).transpose(1, 0, 2, 3).reshape(2, 20, 6)
    scale, bias = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
    if name == "GroupNorm":
        expected = ref.group_norm(whole, scale, bias, num_groups=2, epsilon=1e-6)
    else:
        expected = ref.instance_norm(whole, scale, bias, epsilon=1e-6)
    expected = expected.reshape(2, 4, 5, 6).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)


def test_group_norm_bad_group_count_names_the_module():
    with pytest.raises(ValueError, match=r"normjax\.linen\.GroupNorm.*`num_groups`=4"):
        jax.eval_shape(njl.GroupNorm(num_groups=4).init, KEY(0), jnp.ones((2, 6)))


# ----------------------------------------------------------------------------
# Drop-in proof: the same CNN with Flax's norms and with normjax's.


class CNN(nn.Module):
    """conv -> norm -> relu per entry of ``norms``, then a dense classifier."""

    norms: tuple[Callable[[bool], nn.Module], ...]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for make_norm in self.norms:
            x = nn.relu(make_norm(train)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _batch_norm(lib, **kwargs) -> Callable[[bool], nn.Module]:
    return lambda train: lib.BatchNorm(use_running_average=not train, momentum=0.9, **kwargs)


def _assert_drop_in(ours: CNN, flax_models: dict[str, CNN], digits) -> dict[str, dict]:
    """Initializes every model from one key, takes one SGD step, evaluates; compares.

    Returns the largest absolute differences from each Flax model.
    """
    images, labels = digits
    x, y, x_test = images[:32], labels[:32], images[100:164]
    tx = optax.sgd(0.1)
    models = [ours, *flax_models.values()]

    def step_and_eval(model, variables):
        def loss(params):
            logits, state = model.apply(
                {**variables, "params": params}, x, True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, _ = tx.update(grads, tx.init(variables["params"]))
        new = {**variables, **state, "params": optax.apply_updates(variables["params"], updates)}
        return new, value, model.apply(new, x_test, False)

    # All models in one compiled function for init and one for the step: fewer
    # compiles. Full float32 convolutions: a GPU's default TensorFloat-32 rounds
    # inputs to 10 bits, turning the norms' last-bit differences into 1e-3 ones.
    with jax.default_matmul_precision("highest"):
        initial = jax.jit(lambda key: [m.init(key, x, False) for m in models])(KEY(0))
        results = jax.jit(
            lambda vs: [step_and_eval(m, v) for m, v in zip(models, vs, strict=True)]
        )(initial)
    (new_ours, loss_ours, eval_ours), *flax_results = results
    ours_stats = {k: dict(v) for k, v in new_ours.get("batch_stats", {}).items()}
    for stats in ours_stats.values():
        assert int(stats.pop("count")) == 1
    diffs = {}
    for name, flax_vars, (new_flax, loss_flax, eval_flax) in zip(
        flax_models, initial[1:], flax_results, strict=True
    ):
        # Same keys, same parameter tree: every conv and dense kernel identical.
        chex.assert_trees_all_equal(initial[0]["params"], flax_vars["params"])
        flax_stats = new_flax.get("batch_stats", {})
        chex.assert_trees_all_close(new_ours["params"], new_flax["params"], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(ours_stats, flax_stats, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(eval_ours, eval_flax, atol=1e-4, rtol=1e-4)
        diffs[name] = {
            "loss": _max_abs_diff(loss_ours, loss_flax),
            "params": _max_abs_diff(new_ours["params"], new_flax["params"]),
            "batch_stats": _max_abs_diff(ours_stats, flax_stats),
            "eval_logits": _max_abs_diff(eval_ours, eval_flax),
        }
    return diffs


def test_batch_norm_cnn_is_a_drop_in_for_flax(digits):
    ours = CNN((_batch_norm(njl, debias=False),) * 3)
    flax_models = {
        "flax default": CNN((_batch_norm(nn),) * 3),
        "flax use_fast_variance=False": CNN((_batch_norm(nn, use_fast_variance=False),) * 3),
    }
    diffs = _assert_drop_in(ours, flax_models, digits)
    print("linen BatchNorm CNN, max |diff|:", diffs)


def test_every_per_sample_norm_in_one_cnn_is_a_drop_in_for_flax(digits):
    def norms(lib, **extra):
        return (
            lambda train: lib.LayerNorm(**extra),
            lambda train: lib.GroupNorm(num_groups=4, **extra),
            lambda train: lib.InstanceNorm(**extra),
            lambda train: lib.RMSNorm(**extra),
        )

    flax_models = {
        "flax default": CNN(norms(nn)),
        "flax use_fast_variance=False": CNN(norms(nn, use_fast_variance=False)),
    }
    diffs = _assert_drop_in(CNN(norms(njl)), flax_models, digits)
    print("linen LN+GN+IN+RMS CNN, max |diff|:", diffs)


def test_jit_training_on_digits_lowers_the_loss(digits):
    images, labels = digits
    model = CNN((_batch_norm(njl),) * 3)
    tx = optax.adam(1e-2)
    variables = jax.jit(model.init, static_argnums=2)(KEY(0), images[:64], False)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss(params):
            logits, state = model.apply(
                {**variables, "params": params}, x, True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, **state}, opt_state, value

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        batch = rng.choice(1500, 64, replace=False)
        variables, opt_state, value = step(variables, opt_state, images[batch], labels[batch])
        losses.append(float(value))
    logits = jax.jit(model.apply, static_argnums=2)(variables, images[1500:], False)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels[1500:]))
    print(f"linen digits: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, acc {accuracy:.3f}")
    assert losses[0] > 2.0  # chance level is ln(10) = 2.30
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert accuracy > 0.7  # held-out, evaluation mode: the running statistics work
