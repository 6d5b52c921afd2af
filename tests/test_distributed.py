"""Cross-device batch norm on 8 virtual CPU devices (tests/conftest.py sets XLA_FLAGS).

Under shard_map, pmap and vmap with `axis_name`, and under plain jit with a sharded
batch, the statistics must be those of the whole batch: exact over the union of every
device's unmasked entries, even when the masks differ per device.
"""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax as nj

DEVICES = 8
ROWS_PER_DEVICE = 4
FEATURES = 3

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 (virtual) devices; see tests/conftest.py"
)


def _close(actual, expected, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


def _batch(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # devices see different distributions: a mean of per-device means would be wrong
    shift = np.repeat(np.arange(DEVICES, dtype=np.float64), ROWS_PER_DEVICE)[:, None]
    x = rng.normal(size=(DEVICES * ROWS_PER_DEVICE, FEATURES)) * (1.0 + shift / 4) + shift
    return x.astype(np.float32)


def _unequal_row_mask() -> np.ndarray:
    """Row mask with device 0 fully masked, device 1 mostly masked, others mixed."""
    per_device = np.array(
        [
            [False, False, False, False],
            [False, True, False, False],
            [True, True, True, True],
            [True, False, True, True],
            [True, True, False, False],
            [True, True, True, False],
            [False, True, True, True],
            [True, True, True, True],
        ]
    )
    return per_device.reshape(-1, 1)


def _params():
    rng = np.random.default_rng(1)
    return (
        rng.normal(size=FEATURES).astype(np.float32),
        rng.normal(size=FEATURES).astype(np.float32),
    )


def _expected_state(x, mask, unbiased=False):
    # one debiased update from the initial state holds exactly the batch statistics
    mean, var, count = ref.batch_stats(x, mask=mask)
    if unbiased:
        var = var * count / (count - 1)
    return mean, var


def _shard_map_bn(mesh, fn=nj.batch_norm, **kwargs):
    def local(x, mask, state, scale, bias):
        return fn(x, state, scale, bias, training=True, axis_name="data", mask=mask, **kwargs)

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P("data"), P(), P(), P()),
            out_specs=(P("data"), P()),
        )
    )


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_equals_whole_batch(mesh, masked):
    x = _batch()
    mask = _unequal_row_mask() if masked else np.ones((x.shape[0], 1), bool)
    filled = np.where(mask, x, np.nan).astype(np.float32)  # masked values must not matter
    scale, bias = _params()
    state = nj.batch_norm_state(FEATURES)

    y, new_state = _shard_map_bn(mesh, momentum=0.9, unbiased_running_var=True)(
        filled, mask, state, scale, bias
    )
    rows = mask[:, 0]
    expected_y = ref.batch_norm_train(x, scale, bias, mask=mask)
    _close(np.asarray(y)[rows], expected_y[rows])
    mean, var = _expected_state(x, mask, unbiased=True)
    _close(new_state.mean, mean)
    _close(new_state.var, var)
    assert int(new_state.count) == 1

    # the same as batch_norm over the whole batch on one device
    y_one, state_one = nj.batch_norm(filled, state, scale, bias, training=True, mask=mask,
                                     momentum=0.9, unbiased_running_var=True)
    _close(np.asarray(y)[rows], np.asarray(y_one, np.float64)[rows], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(new_state, state_one, rtol=1e-5, atol=1e-6)


def test_shard_map_batch_renorm_equals_whole_batch(mesh):
    x = _batch(2)
    mask = _unequal_row_mask()
    scale, bias = _params()
    state = nj.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 0.5, 9.0]),
                              jnp.asarray(3, jnp.int32))
    y, new_state = _shard_map_bn(mesh, fn=nj.batch_renorm, momentum=0.9)(
        x, mask, state, scale, bias
    )
    rows = mask[:, 0]
    expected = ref.batch_renorm_train(x, state.mean, state.var, scale, bias, r_max=3.0,
                                      d_max=5.0, mask=mask)
    _close(np.asarray(y)[rows], expected[rows], rtol=1e-5, atol=1e-4)
    mean, _, _ = ref.batch_stats(x, mask=mask)
    w = (1 - 0.9) / (1 - 0.9**4)
    _close(new_state.mean, np.asarray(state.mean) * (1 - w) + w * mean)


def test_shard_map_grad_equals_whole_batch_grad(mesh):
    x = _batch(3)
    cot = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    state = nj.batch_norm_state(FEATURES)
    mask = np.ones((x.shape[0], 1), bool)
    bn = _shard_map_bn(mesh)

    def loss(x):
        y, _ = bn(x, mask, state, None, None)
        return jnp.sum(y * cot)

    gx = jax.grad(loss)(x)
    _close(gx, ref.normalize_grad(x, cot, 0, 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_pmap_equals_whole_batch(masked):
    x = _batch(5)
    mask = _unequal_row_mask() if masked else np.ones((x.shape[0], 1), bool)
    scale, bias = _params()
    state = nj.batch_norm_state(FEATURES)

    def local(x, mask):
        return nj.batch_norm(x, state, scale, bias, training=True, axis_name="data", mask=mask,
                             momentum=0.9)

    y, states = jax.pmap(local, axis_name="data")(
        x.reshape(DEVICES, ROWS_PER_DEVICE, FEATURES), mask.reshape(DEVICES, ROWS_PER_DEVICE, 1)
    )
    rows = mask[:, 0]
    _close(np.asarray(y).reshape(x.shape)[rows], ref.batch_norm_train(x, scale, bias,
                                                                      mask=mask)[rows])
    mean, var = _expected_state(x, mask)
    for d in range(DEVICES):
        _close(states.mean[d], mean)
        _close(states.var[d], var)
    np.testing.assert_array_equal(states.count, np.ones(DEVICES))


def test_pmap_axis_index_groups():
    x = _batch(6)
    state = nj.batch_norm_state(FEATURES)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def local(x):
        return nj.batch_norm(x, state, training=True, axis_name="data", axis_index_groups=groups)

    y, states = jax.pmap(local, axis_name="data")(x.reshape(DEVICES, ROWS_PER_DEVICE, FEATURES))
    y = np.asarray(y).reshape(x.shape)
    half = x.shape[0] // 2
    for g, rows in enumerate([slice(0, half), slice(half, None)]):
        _close(y[rows], ref.batch_norm_train(x[rows]))
        mean, var, _ = ref.batch_stats(x[rows])
        _close(states.mean[4 * g], mean)
        _close(states.var[4 * g + 3], var)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("groups", [None, [[0, 1, 2, 3], [4, 5, 6, 7]]])
def test_sums_of_deviations_of_all_devices_stay_in_range(masked, groups):
    # Entries near float32's largest: 3e38 and about 1.0-1.15e38, std 4.7e37.
    # The exact passes scaled the deviations for one device's sum only, and
    # the devices' sums added past float32's range: every statistic and output
    # NaN, where one device holding the whole batch was right. The float64
    # closed form, as reference.
    x = np.full((DEVICES * 2, 1), 1e38, np.float32)
    x += np.arange(x.size, dtype=np.float32).reshape(x.shape) * np.float32(1e36)
    x[0] = x[8] = 3e38
    mask = jnp.ones(x.shape, bool) if masked else None

    def local(x, mask):
        return nj.batch_norm(x, nj.batch_norm_state(1), training=True, axis_name="data",
                             axis_index_groups=groups, mask=mask)[0]

    y = jax.pmap(local, axis_name="data", in_axes=(0, None if mask is None else 0))(
        x.reshape(DEVICES, 2, 1), None if mask is None else mask.reshape(DEVICES, 2, 1))
    y = np.asarray(y, np.float64).reshape(x.shape)
    halves = [slice(0, 8), slice(8, 16)] if groups else [slice(0, 16)]
    for rows in halves:
        _close(y[rows], ref.batch_norm_train(x[rows]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_jit_with_sharded_batch_needs_no_axis_name(mesh, masked):
    x = _batch(7)
    mask = _unequal_row_mask() if masked else np.ones((x.shape[0], 1), bool)
    scale, bias = _params()
    sharding = NamedSharding(mesh, P("data"))
    x_sharded = jax.device_put(x, sharding)
    mask_sharded = jax.device_put(mask, sharding)
    assert len(x_sharded.sharding.device_set) == DEVICES

    step = jax.jit(functools.partial(nj.batch_norm, training=True, momentum=0.9))
    y, new_state = step(x_sharded, nj.batch_norm_state(FEATURES), scale, bias, mask=mask_sharded)
    rows = mask[:, 0]
    _close(np.asarray(y)[rows], ref.batch_norm_train(x, scale, bias, mask=mask)[rows])
    mean, var = _expected_state(x, mask)
    _close(new_state.mean, mean)
    _close(new_state.var, var)


def test_vmap_axis_name_equals_whole_batch():
    x = _batch(8)
    state = nj.batch_norm_state(FEATURES)
    per_device = x.reshape(DEVICES, ROWS_PER_DEVICE, FEATURES)
    y, states = jax.jit(
        jax.vmap(lambda xi: nj.batch_norm(xi, state, training=True, axis_name="b"), axis_name="b")
    )(per_device)
    _close(np.asarray(y).reshape(x.shape), ref.batch_norm_train(x))
    mean, var, _ = ref.batch_stats(x)
    for i in range(DEVICES):
        _close(states.mean[i], mean)
        _close(states.var[i], var)


def test_vmap_axis_name_over_single_examples():
    """Flax's idiom: vmap over examples, each of shape (features,); the batch is the axis."""
    x = _batch(9)
    state = nj.batch_norm_state(FEATURES)
    y, states = jax.jit(
        jax.vmap(lambda xi: nj.batch_norm(xi, state, training=True, axis_name="b"), axis_name="b")
    )(x)
    _close(y, ref.batch_norm_train(x))
    _close(states.mean[0], ref.batch_stats(x)[0])


@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_per_sample_norm_over_a_split_spatial_axis(mesh, op, masked):
    # Each sample's spatial axis is split across the 8 devices (sequence or spatial
    # parallelism): with axis_name the statistics are those of the whole sample, exact
    # with unequal masks per device, hidden entries filled with NaN.
    rng = np.random.default_rng(3)
    samples, channels = 2, 4
    x = (rng.normal(size=(samples, DEVICES * ROWS_PER_DEVICE, channels))
         * np.repeat(1.0 + np.arange(DEVICES), ROWS_PER_DEVICE)[None, :, None]).astype(np.float32)
    mask = np.ones(x.shape, bool)
    if masked:
        mask = np.broadcast_to(_unequal_row_mask()[None, :, :], x.shape)
    filled = np.where(mask, x, np.nan).astype(np.float32)
    scale = rng.normal(size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    kwargs = {"num_groups": 2} if op == "group_norm" else {}
    fn = functools.partial(getattr(nj, op), **kwargs)

    def local(x, mask, scale, bias):
        return fn(x, scale, bias, mask=mask, axis_name="data")

    y = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(None, "data"), P(None, "data"), P(), P()),
                      out_specs=P(None, "data"))
    )(filled, mask, scale, bias)
    reference = getattr(ref, op)(x, scale, bias, mask=mask, **kwargs)
    _close(np.asarray(y)[mask], reference[mask])
    y_one = fn(filled, scale, bias, mask=mask)
    _close(np.asarray(y)[mask], np.asarray(y_one, np.float64)[mask], rtol=1e-5, atol=1e-5)


# ------------------------------------------------ jit on a mesh of Explicit axes


@pytest.fixture(scope="module")
def explicit_mesh():
    # jax.make_mesh's default axis types are Explicit: every array's sharding is
    # part of its type, and an operation with no sharding rule is an error.
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,) * 2
    return mesh


def _explicit_cases():
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(8, 4, 4, 8)) * 2 + 3).astype(np.float32)
    scale = rng.normal(size=8).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    running = (rng.normal(size=8).astype(np.float32), rng.uniform(1, 2, 8).astype(np.float32))
    state = nj.BatchNormState(*running, jnp.asarray(3, jnp.int32))
    # Each case: the op of (x, scale, bias), and its float64 output.
    return x, scale, bias, {
        "batch_norm": (
            lambda x, s, b: nj.batch_norm(x, nj.batch_norm_state(8), s, b, training=True)[0],
            ref.batch_norm_train(x, scale, bias),
        ),
        "batch_norm_eval": (
            lambda x, s, b: nj.batch_norm(x, state, s, b, training=False)[0],
            ref.batch_norm_eval(x, *running, scale, bias),
        ),
        "batch_renorm": (
            lambda x, s, b: nj.batch_renorm(x, state, s, b, training=True, r_max=1.2, d_max=0.5)[0],
            ref.batch_renorm_train(x, *running, scale, bias, r_max=1.2, d_max=0.5),
        ),
        "layer_norm": (
            lambda x, s, b: nj.layer_norm(x, s, b), ref.layer_norm(x, scale, bias),
        ),
        "rms_norm": (lambda x, s, b: nj.rms_norm(x, s), ref.rms_norm(x, scale)),
        "group_norm": (
            lambda x, s, b: nj.group_norm(x, s, b, num_groups=2),
            ref.group_norm(x, scale, bias, num_groups=2),
        ),
        "instance_norm": (
            lambda x, s, b: nj.instance_norm(x, s, b), ref.instance_norm(x, scale, bias),
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "set_mesh"),
    [
        (P("data", None, None, None), True),
        (P("data", None, None, None), False),
        (P(None, None, None, "model"), False),
        (P("data", None, None, "model"), True),
    ],
    ids=["batch-set_mesh", "batch-sharded_input_only", "features", "both"],
)
def test_jit_on_an_explicit_mesh_equals_float64(explicit_mesh, spec, set_mesh):
    # A one-entry slice of a sharded axis and a select between differently
    # sharded operands have no sharding rule there: each op raised a
    # ShardingTypeError (or a mismatch of its paths' types) before.
    x, scale, bias, cases = _explicit_cases()
    xs = jax.device_put(x, NamedSharding(explicit_mesh, spec))
    for name, (op, expected) in cases.items():
        with jax.set_mesh(explicit_mesh) if set_mesh else contextlib.nullcontext():
            y = jax.jit(op)(xs, scale, bias)
        assert y.sharding.spec == spec, name
        _close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec", [P("data", None, None, None), P(None, None, None, "model")], ids=["batch", "features"]
)
def test_grad_and_state_on_an_explicit_mesh(explicit_mesh, spec):
    x, scale, bias, _ = _explicit_cases()
    g = np.random.default_rng(22).normal(size=x.shape).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(explicit_mesh, spec))

    def loss(x, norm):
        if norm == "batch":
            y, state = nj.batch_norm(x, nj.batch_norm_state(8), training=True)
            return jnp.sum(y * g), state
        return jnp.sum(nj.layer_norm(x) * g), None

    for norm, axes, epsilon in (("batch", (0, 1, 2), 1e-5), ("layer", (3,), 1e-6)):
        with jax.set_mesh(explicit_mesh):
            dx, state = jax.jit(jax.grad(functools.partial(loss, norm=norm), has_aux=True))(xs)
        assert dx.sharding.spec == spec
        _close(dx, ref.normalize_grad(x, g, axes, epsilon), rtol=1e-4, atol=1e-4)
        if state is not None:
            mean, var, _ = ref.batch_stats(x)
            _close(state.mean, mean)
            _close(state.var, var)


@pytest.mark.parametrize("op", [nj.batch_norm, nj.batch_renorm])
def test_axis_name_may_be_a_list_as_in_psum(op):
    # lax.psum takes a list; the list was "unhashable type: 'list'". (From a
    # fresh state, renorm's r and d are 1 and 0: batch norm.)
    x = _batch(9)
    per_example = x.reshape(4, 2, 4, FEATURES)

    def local(x):
        return op(x, nj.batch_norm_state(FEATURES), training=True, axis_name=["outer", "inner"])[0]

    y = jax.vmap(jax.vmap(local, axis_name="inner"), axis_name="outer")(per_example)
    _close(np.asarray(y).reshape(x.shape), ref.batch_norm_train(x))


def test_gradients_inside_a_shard_map_over_some_explicit_axes(explicit_mesh):
    # Per-device arrays there need no auto_axes, which cannot run under Manual
    # axes: wrapping every op in it broke their gradients (a mesh mismatch).
    x, _, _, _ = _explicit_cases()
    g = np.random.default_rng(23).normal(size=x.shape).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(explicit_mesh, P("data")))

    def local(x):
        return nj.batch_norm(x, nj.batch_norm_state(8), training=True, axis_name="data")[0]

    per_device = jax.shard_map(
        local, mesh=explicit_mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}
    )
    with jax.set_mesh(explicit_mesh):
        dx = jax.jit(jax.grad(lambda x: jnp.sum(per_device(x) * g)))(xs)
    _close(dx, ref.normalize_grad(x, g, (0, 1, 2), 1e-5), rtol=1e-4, atol=1e-4)


def test_arrays_on_two_meshes_are_an_error_naming_them(explicit_mesh):
    other = jax.make_mesh((2, 4), ("p", "q"))
    x, scale, bias, _ = _explicit_cases()
    xs = jax.device_put(x, NamedSharding(explicit_mesh, P("data")))
    scale_elsewhere = jax.device_put(scale, NamedSharding(other, P("q")))
    with pytest.raises(ValueError, match=r"must lie on one mesh.*'data': 4.*'p': 2"):
        jax.jit(nj.layer_norm)(xs, scale_elsewhere)


def test_arrays_on_two_auto_meshes_are_placed_by_xla(mesh):
    # As in JAX itself, where plain x * scale works: only Explicit meshes must agree.
    other = Mesh(np.array(jax.devices()[:DEVICES]).reshape(2, 4), ("p", "q"))
    x, (scale, bias) = _batch(10), _params()
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    scale_elsewhere = jax.device_put(scale, NamedSharding(other, P()))
    y = jax.jit(nj.layer_norm)(xs, scale_elsewhere, bias)
    _close(y, ref.layer_norm(x, scale, bias))
