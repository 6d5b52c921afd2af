"""Data-parallel training with synchronized batch norm, checked against one device.

A batch-normalized MLP is trained on scikit-learn's bundled digits from the
same initialization and on the same batches (three times, counting the contrast
below):

- data-parallel: a ``jax.sharding.Mesh`` over the devices with one axis,
  ``"data"``; ``jax.shard_map`` gives each device its slice of the global batch;
  ``normjax.linen.BatchNorm(axis_name="data")`` combines the batch statistics of
  all devices (collective sums over the axis: counts, sums, squared deviations),
  and the loss is ``pmean``-ed, so the gradient ``jax.grad`` takes through the
  ``shard_map`` is the gradient of the whole batch's loss;
- single device: the same model without ``axis_name``, the whole batch on one
  device.

After every step it measures the maximum absolute difference between the two
runs' parameters and running statistics (``batch_stats``: mean, var, count).
They agree up to float32 rounding, because synchronized batch norm computes
exactly the whole batch's statistics. As a contrast, a third run leaves out
``axis_name`` inside the ``shard_map``: each device normalizes with its own
slice's statistics and keeps device 0's running statistics (what PyTorch's
DistributedDataParallel does without SyncBatchNorm); that run drifts away.

On a CPU-only machine the 8 devices are virtual: the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts, unless
the flag is already set. The flag only affects the host (CPU) platform.

Running on several GPUs or a TPU: nothing changes. The mesh is built from
``jax.devices()``, which lists the accelerators when there are any (jax picks
the GPU or TPU backend by default), so ``python examples/data_parallel.py`` on
an 8-GPU machine or a TPU v4-8 shards the batch over the real chips, and the
psum of the statistics becomes an all-reduce over NVLink or the TPU
interconnect. ``--devices N`` uses the first N devices; the global batch size
must be a multiple of N. On several hosts, call ``jax.distributed.initialize()``
first and build the mesh from ``jax.devices()`` (all hosts' devices) in the
same way; each host then feeds its own part of the global batch (see
``jax.make_array_from_process_local_data``).

Outputs in ``--out`` (default ``out/data_parallel``): ``results.json``,
``results.csv`` and ``max_abs_difference.png`` (difference to the single-device
run over the steps, log scale).

Run ``python examples/data_parallel.py`` (well under a minute on 2 CPU cores).

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015.
  Peng et al., "MegDet: A Large Mini-Batch Object Detector", CVPR 2018
  (cross-GPU batch normalization).
"""

from __future__ import annotations

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA reads the flag once, when jax initializes its backends, so it is set before
# `import jax`; a flag the user already set wins.
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_COUNT_FLAG}=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import _common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from normjax import initializers as ni  # noqa: E402
from normjax import linen as njnn  # noqa: E402

DATA_AXIS = "data"

TABLE_COLUMNS = (
    "run",
    "max_abs_diff_params",
    "max_abs_diff_batch_mean",
    "max_abs_diff_batch_var",
    "count",
    "final_train_loss",
    "test_accuracy",
)


class BatchNormMLP(nn.Module):
    """Dense -> BatchNorm -> ReLU blocks and a linear output layer.

    ``axis_name`` is passed to every BatchNorm: None normalizes with the
    statistics of the batch the module sees; a mesh axis name combines the
    statistics across the devices of that axis.
    """

    hidden: Sequence[int]
    num_classes: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for width in self.hidden:
            # A bias before batch norm is cancelled by its mean subtraction.
            x = nn.Dense(width, use_bias=False, kernel_init=ni.he_normal())(x)
            x = njnn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
            x = jax.nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class TrainState(NamedTuple):
    """Everything a training step reads and returns."""

    params: Any
    batch_stats: Any
    opt_state: Any


StepFn = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_single_device_step(model: BatchNormMLP, optimizer: optax.GradientTransformation) -> StepFn:
    """A jit-compiled step on the whole batch (the reference)."""

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return _cross_entropy(logits, y), updates["batch_stats"]

    @jax.jit
    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    return step


def make_data_parallel_step(
    model: BatchNormMLP, optimizer: optax.GradientTransformation, mesh: Mesh, *, synced: bool
) -> StepFn:
    """A jit-compiled step whose forward pass runs under ``jax.shard_map`` on ``mesh``.

    Args:
      model: the model; with ``synced`` its ``axis_name`` must be the mesh axis.
      optimizer: the optax optimizer, applied outside the shard_map to the
        replicated parameters.
      mesh: a one-axis mesh named ``DATA_AXIS``.
      synced: True: the statistics are combined across devices (the model has
        ``axis_name``), the new running statistics are the same on every device.
        False: each device keeps its own, and device 0's are kept.

    Returns:
      ``step(state, x, y) -> (state, loss)``; x and y are the global batch.
    """

    def local_loss(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        # x and y are this device's slice; the parameters are replicated.
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        # The mean of equal-sized slices' mean losses is the whole batch's mean loss.
        loss = jax.lax.pmean(_cross_entropy(logits, y), DATA_AXIS)
        new_stats = updates["batch_stats"]
        if not synced:
            # Per-device statistics differ; stack them (one row per device) to keep device 0's.
            new_stats = jax.tree.map(lambda a: a[None], new_stats)
        return loss, new_stats

    sharded_loss = jax.shard_map(
        local_loss,
        mesh=mesh,
        in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(), P() if synced else P(DATA_AXIS)),
    )
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

    @jax.jit
    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        y = jax.lax.with_sharding_constraint(y, batch_sharding)
        # Differentiating through shard_map sums the replicated parameters'
        # gradient contributions over the devices (the transpose of replication).
        (loss, batch_stats), grads = jax.value_and_grad(sharded_loss, has_aux=True)(
            state.params, state.batch_stats, x, y
        )
        if not synced:
            batch_stats = jax.tree.map(lambda a: a[0], batch_stats)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    return step


@jax.jit
def _max_abs_difference(a: Any, b: Any) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


def max_abs_difference(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two pytrees of the same structure."""
    return float(_max_abs_difference(a, b))


def _stats_field(batch_stats: Any, field: str) -> dict[str, jax.Array]:
    """One statistic (``mean``/``var``/``count``) of every BatchNorm layer, keyed by layer."""
    return {layer: stats[field] for layer, stats in batch_stats.items()}


def make_accuracy(model: BatchNormMLP) -> Callable[[TrainState, np.ndarray, np.ndarray], float]:
    """A function giving the test accuracy in evaluation mode (running statistics)."""
    apply = jax.jit(functools.partial(model.apply, train=False))

    def accuracy(state: TrainState, x: np.ndarray, y: np.ndarray) -> float:
        logits = apply({"params": state.params, "batch_stats": state.batch_stats}, x)
        return float(jnp.mean(jnp.argmax(logits, -1) == y))

    return accuracy


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=None, help="devices to use (default all)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="layer widths")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=0, help="data split and init seed")
    parser.add_argument(
        "--out", type=Path, default=Path("out/data_parallel"), help="output directory"
    )
    args = parser.parse_args(argv)
    available = len(jax.devices())
    if args.devices is None:
        args.devices = available
    if not 1 <= args.devices <= available:
        parser.error(f"--devices must be in 1..{available}, got {args.devices}")
    if args.batch_size < 1 or args.batch_size % args.devices:
        parser.error(
            f"--batch-size must be a positive multiple of the device count {args.devices}, "
            f"got {args.batch_size}"
        )
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the comparison and returns the table rows."""
    args = parse_args(argv)
    available = jax.devices()
    num_devices = args.devices
    mesh = Mesh(np.array(available[:num_devices]), (DATA_AXIS,))
    out = _common.make_output_dir(args.out)
    data = _common.load_digits_split(seed=args.seed)
    print(
        f"{num_devices} {available[0].platform} devices, global batch {args.batch_size} "
        f"({args.batch_size // num_devices} per device), {args.steps} steps"
    )

    hidden = tuple(args.hidden)
    num_classes = _common.NUM_DIGIT_CLASSES
    reference_model = BatchNormMLP(hidden, num_classes)
    synced_model = BatchNormMLP(hidden, num_classes, axis_name=DATA_AXIS)
    optimizer = optax.sgd(args.learning_rate, momentum=args.momentum)
    # Compiled: Flax's eager init would compile each small operation on its own.
    init = jax.jit(functools.partial(reference_model.init, train=False))
    variables = init(jax.random.key(args.seed), jnp.zeros((2, data.x_train.shape[1])))
    initial = TrainState(
        variables["params"], variables["batch_stats"], optimizer.init(variables["params"])
    )
    steps: dict[str, StepFn] = {
        "single device, whole batch": make_single_device_step(reference_model, optimizer),
        f"{num_devices} devices, synced BN": make_data_parallel_step(
            synced_model, optimizer, mesh, synced=True
        ),
        f"{num_devices} devices, per-device BN": make_data_parallel_step(
            reference_model, optimizer, mesh, synced=False
        ),
    }
    reference_name, *parallel_names = steps
    states = dict.fromkeys(steps, initial)
    losses: dict[str, list[jax.Array]] = {name: [] for name in steps}
    diffs: dict[str, list[float]] = {name: [] for name in parallel_names}

    batches = _common.iterate_batches(
        data.x_train, data.y_train, args.batch_size, seed=args.seed
    )
    start = time.perf_counter()
    for x, y in tqdm(itertools.islice(batches, args.steps), total=args.steps, desc="steps"):
        for name, step in steps.items():
            states[name], loss = step(states[name], x, y)
            losses[name].append(loss)
        for name in parallel_names:
            diffs[name].append(
                # params and batch_stats together (count is an integer: its difference is exact)
                max_abs_difference(states[name][:2], states[reference_name][:2])
            )
    elapsed = time.perf_counter() - start

    reference = states[reference_name]
    accuracy = make_accuracy(reference_model)
    rows = []
    for name, state in states.items():
        counts = {int(c) for c in jax.tree.leaves(_stats_field(state.batch_stats, "count"))}
        rows.append(
            {
                "run": name,
                "max_abs_diff_params": max_abs_difference(state.params, reference.params),
                "max_abs_diff_batch_mean": max_abs_difference(
                    _stats_field(state.batch_stats, "mean"),
                    _stats_field(reference.batch_stats, "mean"),
                ),
                "max_abs_diff_batch_var": max_abs_difference(
                    _stats_field(state.batch_stats, "var"),
                    _stats_field(reference.batch_stats, "var"),
                ),
                "count": ",".join(str(c) for c in sorted(counts)),
                "final_train_loss": float(losses[name][-1]),
                "test_accuracy": accuracy(state, data.x_test, data.y_test),
            }
        )
    print()
    _common.print_table(rows, TABLE_COLUMNS, float_format=".3g")
    largest_param = max(float(jnp.max(jnp.abs(p))) for p in jax.tree.leaves(reference.params))
    print(
        f"\n(largest |parameter| of the single-device run: {largest_param:.3g}; "
        f"{elapsed:.1f} s for the three runs)"
    )

    _common.write_csv(out / "results.csv", rows)
    _common.write_json(
        out / "results.json",
        {
            "devices": [str(d) for d in available[:num_devices]],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
            "max_abs_difference_per_step": diffs,
            "train_loss_per_step": {n: jax.device_get(v) for n, v in losses.items()},
        },
    )
    step_numbers = np.arange(1, args.steps + 1)
    _common.plot_curves(
        # Exact zeros cannot be drawn on a log axis; the float32 spacing at 1 stands in.
        {n: (step_numbers, np.maximum(d, np.finfo(np.float32).eps)) for n, d in diffs.items()},
        out / "max_abs_difference.png",
        xlabel="training step",
        ylabel="max |difference| to single device (params, batch_stats)",
        title="Data-parallel vs single-device training",
        log_y=True,
    )
    return rows


if __name__ == "__main__":
    main()
