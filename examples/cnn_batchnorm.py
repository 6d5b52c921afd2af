"""A batch-normalized CNN on digits: training, checkpoints, and batch norm folded away.

A small convolutional network (three 3x3 convolutions, each followed by
``normjax.linen.BatchNorm`` and ReLU, then global average pooling and a linear
classifier) is trained with optax on scikit-learn's bundled 8x8 digits (a
stratified split fixed by ``--seed``; nothing is downloaded). Training mode
normalizes with each batch's statistics and updates the running ones;
evaluation mode (``use_running_average=True``) normalizes with the running ones.

After every epoch the training state (parameters, batch statistics, optimizer
state) and the metrics so far are saved with orbax-checkpoint;
``--resume`` restores the latest checkpoint and continues with the next epoch
(the batches are drawn from a seeded stream, so a resumed run sees the batches
the uninterrupted run would have).

At the end, each BatchNorm is folded into the convolution before it
(``normjax.fold_batch_norm``): in evaluation mode batch norm is an affine map
per channel, so the folded network has convolutions with a bias and no batch
norm. The script measures the largest absolute difference between the folded
and unfolded logits on the test set, and the inference time of both
(jit-compiled, the median of repeated calls timed with ``block_until_ready``,
alternating the two in rounds so that a change of machine load hits both).
Expect little speedup from a jit-compiled network on CPU: XLA already fuses
evaluation-mode batch norm into the convolutions' fused kernels (its per-channel
factors are computed once per call from the statistics), so folding removes only
that small per-channel work; folding pays more where batch norm runs as
separate kernels (eager execution, some accelerators) and is a prerequisite for
integer-only inference (Jacob et al. 2018).

Outputs in ``--out`` (default ``out/cnn_batchnorm``): ``checkpoints/``,
``results.json``, ``history.csv``, ``training.png`` (train loss and test
accuracy per epoch) and ``inference.csv``.

Run ``python examples/cnn_batchnorm.py`` (under a minute on 2 CPU cores), then
e.g. ``python examples/cnn_batchnorm.py --epochs 15 --resume`` to continue.

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift", ICML 2015.
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018 (batch norm folding, sec. 3.2).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import normjax as nj
from normjax import initializers as ni
from normjax import linen as njnn

BN_EPSILON = 1e-5
# An epoch is only ~22 steps: a 10-step memory (PyTorch's default, momentum 0.1 there) lets
# the running statistics follow the weights, which Flax's 0.99 (100 steps) would lag behind.
BN_MOMENTUM = 0.9


class DigitsCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU blocks, global average pooling, a linear classifier.

    With ``folded=True`` the same network after batch norm folding: each
    convolution has a bias and there is no BatchNorm. Layers are named
    ``conv{i}`` and ``bn{i}`` so the two variants' parameters correspond by name.
    """

    channels: Sequence[int]
    num_classes: int
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for i, features in enumerate(self.channels):
            x = nn.Conv(
                features,
                (3, 3),
                # A bias before batch norm is cancelled by its mean subtraction;
                # the folded convolution takes over batch norm's shift as its bias.
                use_bias=self.folded,
                kernel_init=ni.he_normal(),
                name=f"conv{i}",
            )(x)
            if not self.folded:
                x = njnn.BatchNorm(
                    use_running_average=not train,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    name=f"bn{i}",
                )(x)
            x = jax.nn.relu(x)
            if i == 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def fold_params(params: Any, batch_stats: Any, num_blocks: int) -> dict[str, Any]:
    """The parameters of the folded network: each ``bn{i}`` merged into ``conv{i}``.

    Args:
      params: the trained network's ``params`` collection.
      batch_stats: its ``batch_stats`` collection (running mean, var, count).
      num_blocks: the number of conv/batch-norm blocks.

    Returns:
      A ``params`` collection for ``DigitsCNN(folded=True)``.
    """
    folded: dict[str, Any] = {"head": params["head"]}
    for i in range(num_blocks):
        bn_params, stats = params[f"bn{i}"], batch_stats[f"bn{i}"]
        kernel, bias = nj.fold_batch_norm(
            params[f"conv{i}"]["kernel"],
            None,
            nj.BatchNormState(stats["mean"], stats["var"], stats["count"]),
            bn_params["scale"],
            bn_params["bias"],
            epsilon=BN_EPSILON,
        )
        folded[f"conv{i}"] = {"kernel": kernel, "bias": bias}
    return folded


def alternating_median_ms(
    calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]], *, rounds: int, repeats: int
) -> dict[str, float]:
    """Median milliseconds per call of each function, measured in alternating rounds.

    Each round times every ``fn(*args)`` ``repeats`` times with
    `_common.median_step_ms` (``block_until_ready``); the result is the median
    over the rounds. Alternating spreads a change of load on a shared machine
    over all the functions instead of one.

    Args:
      calls: name to ``(fn, args)``.
      rounds: how many times to go through all the functions.
      repeats: timed calls per function and round.

    Returns:
      Name to median milliseconds per call.
    """
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, fn_args) in calls.items():
            per_round[name].append(_common.median_step_ms(fn, *fn_args, repeats=repeats))
    return {name: float(np.median(times)) for name, times in per_round.items()}


def make_checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """An orbax manager keeping the last two epochs' checkpoints, saved synchronously."""
    return ocp.CheckpointManager(
        directory.resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10, help="total epochs (with --resume too)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 64], help="conv widths, one per block"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--bench-batch", type=int, default=1024, help="images per inference call when timing"
    )
    parser.add_argument("--timing-rounds", type=int, default=5, help="timing rounds (median)")
    parser.add_argument("--timing-repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--seed", type=int, default=0, help="data split and init seed")
    parser.add_argument(
        "--out", type=Path, default=Path("out/cnn_batchnorm"), help="output directory"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "bench_batch", "timing_rounds", "timing_repeats"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains, checkpoints, folds and times; returns the results written to results.json."""
    args = parse_args(argv)
    out = _common.make_output_dir(args.out)
    data = _common.load_digits_split(seed=args.seed, image_shape=True)
    model = DigitsCNN(tuple(args.channels), _common.NUM_DIGIT_CLASSES)
    # Compiled: Flax's eager init would compile each small operation on its own.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(args.seed), data.x_train[:2])
    optimizer = optax.adam(args.learning_rate)
    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": optimizer.init(variables["params"]),
    }

    checkpoint_dir = out / "checkpoints"
    if not args.resume and checkpoint_dir.exists():
        # A fresh run replaces the old checkpoints rather than mixing epochs of two runs.
        shutil.rmtree(checkpoint_dir)
    manager = make_checkpoint_manager(checkpoint_dir)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if args.resume:
        latest = manager.latest_step()
        if latest is None:
            print(f"--resume: no checkpoint in {checkpoint_dir}; starting from scratch")
        else:
            try:
                restored = manager.restore(
                    latest,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(state), history=ocp.args.JsonRestore()
                    ),
                )
            except ValueError as error:  # orbax's shape/structure mismatch
                raise SystemExit(
                    f"--resume: the checkpoint in {checkpoint_dir} does not fit this model "
                    f"(--channels {' '.join(map(str, args.channels))}); resume with the "
                    f"flags it was trained with, or drop --resume to start afresh.\n{error}"
                ) from error
            state, history, start_epoch = restored.state, list(restored.history), latest
            print(f"--resume: restored epoch {latest} from {checkpoint_dir}")
            if latest >= args.epochs:
                print(f"--resume: epoch {latest} >= --epochs {args.epochs}: nothing to train")

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    @jax.jit
    def train_step(state: dict[str, Any], x: jax.Array, y: jax.Array) -> Any:
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y
        )
        param_updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], param_updates),
            "batch_stats": updates["batch_stats"],
            "opt_state": opt_state,
        }
        return new_state, loss

    @jax.jit
    def eval_logits(params: Any, batch_stats: Any, x: jax.Array) -> jax.Array:
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    steps_per_epoch = len(data.x_train) // args.batch_size
    batches = _common.iterate_batches(
        data.x_train, data.y_train, args.batch_size, seed=args.seed
    )
    # Skip the batches of the restored epochs so a resumed run continues the same stream.
    batches = itertools.islice(batches, start_epoch * steps_per_epoch, None)
    if start_epoch < args.epochs:
        print(
            f"{len(data.x_train)} training / {len(data.x_test)} test images, batch "
            f"{args.batch_size}, epochs {start_epoch + 1}..{args.epochs}"
        )
    for epoch in tqdm(range(start_epoch + 1, args.epochs + 1), desc="epochs"):
        losses = []
        for x, y in itertools.islice(batches, steps_per_epoch):
            state, loss = train_step(state, x, y)
            losses.append(loss)
        logits = eval_logits(state["params"], state["batch_stats"], data.x_test)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(jax.device_get(losses))),
                "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == data.y_test)),
            }
        )
        manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
            ),
        )
    manager.wait_until_finished()
    manager.close()
    if history:
        print()
        _common.print_table(history, float_format=".4f")

    # Batch norm folding: the folded network in evaluation mode vs the original.
    num_blocks = len(args.channels)
    folded_model = DigitsCNN(tuple(args.channels), _common.NUM_DIGIT_CLASSES, folded=True)
    folded_params = fold_params(state["params"], state["batch_stats"], num_blocks)

    @jax.jit
    def folded_logits(params: Any, x: jax.Array) -> jax.Array:
        return folded_model.apply({"params": params}, x)

    unfolded_test = eval_logits(state["params"], state["batch_stats"], data.x_test)
    folded_test = folded_logits(folded_params, data.x_test)
    max_abs_diff = float(jnp.max(jnp.abs(folded_test - unfolded_test)))
    same_predictions = float(
        jnp.mean(jnp.argmax(folded_test, -1) == jnp.argmax(unfolded_test, -1))
    )
    tiles = -(-args.bench_batch // len(data.x_test))
    bench_x = jnp.asarray(np.tile(data.x_test, (tiles, 1, 1, 1))[: args.bench_batch])
    times = alternating_median_ms(
        {
            "unfolded": (eval_logits, (state["params"], state["batch_stats"], bench_x)),
            "folded": (folded_logits, (folded_params, bench_x)),
        },
        rounds=args.timing_rounds,
        repeats=args.timing_repeats,
    )
    inference = [
        {
            "network": "conv + BatchNorm (eval mode)",
            "ms_per_call": times["unfolded"],
            "images_per_s": args.bench_batch / times["unfolded"] * 1e3,
        },
        {
            "network": "folded: conv with bias",
            "ms_per_call": times["folded"],
            "images_per_s": args.bench_batch / times["folded"] * 1e3,
        },
    ]
    speedup = times["unfolded"] / times["folded"]
    print(f"\nbatch norm folding, {args.bench_batch} images per call ({jax.devices()[0]}):")
    _common.print_table(inference, float_format=".4g")
    print(
        f"max |logits folded - unfolded| on the test set: {max_abs_diff:.3g} "
        f"(largest |logit| {float(jnp.max(jnp.abs(unfolded_test))):.3g}); "
        f"same predictions: {same_predictions:.1%}; speedup x{speedup:.2f}"
    )

    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": str(jax.devices()[0]),
        "history": history,
        "fold": {
            "max_abs_logit_difference": max_abs_diff,
            "max_abs_logit": float(jnp.max(jnp.abs(unfolded_test))),
            "same_predictions": same_predictions,
            "unfolded_ms": times["unfolded"],
            "folded_ms": times["folded"],
            "speedup": speedup,
        },
    }
    _common.write_json(out / "results.json", results)
    _common.write_csv(out / "history.csv", history)
    _common.write_csv(out / "inference.csv", inference)
    if history:
        _plot_history(history, out / "training.png")
    print(f"outputs in {out}")
    return results


def _plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Train loss (left axis, log) and test accuracy (right axis) per epoch, in one PNG."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    loss_ax = fig.subplots()
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss (training mode)", color="tab:blue")
    accuracy_ax = loss_ax.twinx()
    accuracy_ax.plot(epochs, [h["test_accuracy"] for h in history], "s-", color="tab:orange")
    accuracy_ax.set_ylabel("test accuracy (evaluation mode)", color="tab:orange")
    loss_ax.set_title("DigitsCNN with normjax.linen.BatchNorm")
    loss_ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
