"""Batch norm's first limit, small mini-batches: batch norm vs renorm, group norm and layer norm.

A small CNN (two 3x3 convolutions and a dense hidden layer, each followed by a
normalization layer and ReLU, then a linear classifier) is trained on
scikit-learn's bundled 8x8 digits (a stratified split fixed by the first
``--seeds`` value; nothing is downloaded) with each normalization layer of
``normjax.linen``:

============  ==============================================================
batch         BatchNorm: the mini-batch's mean and variance per channel
renorm        BatchRenorm: batch statistics corrected toward the running ones
              (normjax's fixed r_max=3, d_max=5; Ioffe relaxes them gradually)
group         GroupNorm: per sample, over groups of channels (and space)
layer         LayerNorm: per sample, over all channels (and space)
============  ==============================================================

at mini-batch sizes 2, 4, 8 and 64, for the same number of epochs each, from
three seeds (initialization and batch order; they train side by side under
``jax.vmap``, one compilation for all). The
learning rate follows the linear scaling rule (``lr = base_lr * batch / 64``,
as in Wu & He's experiments), so SGD sees the same data and takes comparable
steps at every batch size, and the comparison isolates the normalization. Test
accuracy is measured in evaluation mode (batch norm and renorm use their
running statistics); the table shows its mean and standard deviation over the
seeds.

The table is in the spirit of Wu & He (2018), Figure 1 and their table of
errors by batch size: batch norm's accuracy falls as the batch shrinks (its
statistics come from fewer values, and the noisy statistics of training no
longer match the running ones used in evaluation); group norm and layer norm,
which never look across the batch, do not depend on it; batch renorm, which
trains with statistics pulled toward the running ones, narrows the gap but
still depends on the batch. Finally a training step of batch norm on a batch
of 1: the dense layer then has one value per feature and no variance, and
normjax raises a clear ValueError (printed). Group and layer norm train at a
batch of 1 too (``--norms group layer --batch-sizes 1 2 4``).

Outputs in ``--out`` (default ``out/small_batch``): ``results.json``,
``results.csv`` (one row per normalization and batch size) and
``accuracy_vs_batch.png``.

Run ``python examples/small_batch.py`` (a couple of minutes on 2 CPU cores).

References:
  Wu & He, "Group Normalization", ECCV 2018.
  Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
  Batch-Normalized Models", NeurIPS 2017.
  Ioffe & Szegedy, "Batch Normalization", ICML 2015.
  Ba, Kiros & Hinton, "Layer Normalization", 2016.
  Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
  2017 (the linear scaling rule).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from normjax import initializers as ni
from normjax import linen as njnn

NORMS: dict[str, str] = {
    "batch": "BatchNorm",
    "renorm": "BatchRenorm",
    "group": "GroupNorm",
    "layer": "LayerNorm",
}
#: The batch size that ``--base-lr`` is the learning rate of (linear scaling rule).
REFERENCE_BATCH = 64


def make_norm(kind: str, *, train: bool, ndim: int, num_groups: int, name: str) -> nn.Module:
    """The normalization layer ``kind`` for an input of ``ndim`` dimensions (channels last).

    Args:
      kind: a key of `NORMS`.
      train: training mode (batch statistics) for batch norm and renorm.
      ndim: the input's rank: 4 for ``(N, H, W, C)``, 2 for ``(N, C)``.
      num_groups: group norm's number of channel groups.
      name: the module name.

    Returns:
      The module.
    """
    if kind == "batch":
        return njnn.BatchNorm(use_running_average=not train, name=name)
    if kind == "renorm":
        return njnn.BatchRenorm(use_running_average=not train, name=name)
    if kind == "group":
        return njnn.GroupNorm(num_groups=num_groups, name=name)
    if kind == "layer":
        # Per sample over (H, W, C) for a feature map, as in Wu & He's comparison.
        return njnn.LayerNorm(reduction_axes=tuple(range(1, ndim)), feature_axes=-1, name=name)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")


class SmallCNN(nn.Module):
    """Two conv blocks and a dense block, each ``layer -> norm -> ReLU``, and a linear classifier.

    conv3x3 -> norm -> ReLU -> 2x2 average pool -> conv3x3 -> norm -> ReLU ->
    flatten -> dense -> norm -> ReLU -> dense. The dense block's norm makes a
    batch of one image fail for batch norm (one value per feature).
    """

    norm: str
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    num_groups: int = 4
    num_classes: int = _common.NUM_DIGIT_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(y: jax.Array, name: str) -> jax.Array:
            layer = make_norm(
                self.norm, train=train, ndim=y.ndim, num_groups=self.num_groups, name=name
            )
            return layer(y)

        # Biases before a normalization layer are cancelled by its mean subtraction.
        x = nn.Conv(self.channels[0], (3, 3), use_bias=False, kernel_init=ni.he_normal())(x)
        x = nn.avg_pool(jax.nn.relu(norm(x, "norm0")), (2, 2), strides=(2, 2))
        x = nn.Conv(self.channels[1], (3, 3), use_bias=False, kernel_init=ni.he_normal())(x)
        x = jax.nn.relu(norm(x, "norm1")).reshape(x.shape[0], -1)
        x = nn.Dense(self.hidden, use_bias=False, kernel_init=ni.he_normal())(x)
        x = jax.nn.relu(norm(x, "norm2"))
        return nn.Dense(self.num_classes)(x)


class RunResult(NamedTuple):
    """One normalization at one batch size, one entry per seed."""

    test_accuracy: list[float]
    final_train_loss: list[float]
    steps: int
    seconds: float


def train_and_evaluate(
    norm: str,
    batch_size: int,
    data: _common.DigitsSplit,
    args: argparse.Namespace,
    seeds: Sequence[int],
) -> RunResult:
    """Trains ``SmallCNN(norm)`` for ``args.epochs`` epochs at ``batch_size``, once per seed.

    The seeds (initialization and batch order) train side by side under
    ``jax.vmap``: one compilation for all of them, and at tiny batch sizes
    the extra seeds cost little more time than one.
    """
    start = time.perf_counter()
    model = SmallCNN(norm)
    init = jax.jit(jax.vmap(functools.partial(model.init, train=False), in_axes=(0, None)))
    variables = init(jax.vmap(jax.random.key)(jnp.asarray(seeds)), data.x_train[:2])
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    optimizer = optax.sgd(args.base_lr * batch_size / REFERENCE_BATCH, momentum=args.momentum)
    opt_state = jax.vmap(optimizer.init)(params)

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", batch_stats)

    def train_step(carry: tuple[Any, Any, Any], batch: tuple[jax.Array, jax.Array]) -> Any:
        params, batch_stats, opt_state = carry
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, *batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def train_epoch(carry: tuple[Any, Any, Any], xs: jax.Array, ys: jax.Array) -> Any:
        # One compiled loop per epoch: at batch size 2 an epoch has ~700 steps,
        # and a Python loop would spend more time dispatching than computing.
        return jax.lax.scan(train_step, carry, (xs, ys))

    # vmap over seeds: batch norm inside sees each seed's own (batch_size, ...) batch.
    train_epochs = jax.jit(jax.vmap(train_epoch))
    steps_per_epoch = len(data.x_train) // batch_size
    streams = [
        _common.iterate_batches(data.x_train, data.y_train, batch_size, seed=seed)
        for seed in seeds
    ]
    carry = (params, batch_stats, opt_state)
    losses = np.zeros((len(seeds), 0))
    for _ in range(args.epochs):
        epoch = [list(zip(*itertools.islice(s, steps_per_epoch), strict=True)) for s in streams]
        xs = np.stack([np.stack(x) for x, _ in epoch])  # (seeds, steps, batch, 8, 8, 1)
        ys = np.stack([np.stack(y) for _, y in epoch])
        carry, losses = train_epochs(carry, xs, ys)
    params, batch_stats, _ = carry
    evaluate = jax.jit(
        jax.vmap(functools.partial(model.apply, train=False), in_axes=(0, None))
    )
    logits = evaluate({"params": params, "batch_stats": batch_stats}, data.x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == data.y_test, axis=-1)
    # The mean loss of the last epoch (training mode: batch statistics for BN).
    final_loss = np.mean(np.asarray(losses), axis=-1)
    seconds = time.perf_counter() - start
    return RunResult(
        [float(a) for a in accuracy],
        [float(v) for v in final_loss],
        steps_per_epoch * args.epochs,
        seconds,
    )


def batch_of_one_error(data: _common.DigitsSplit, seed: int) -> str:
    """The error normjax raises for a training step of batch norm on a batch of one image."""
    model = SmallCNN("batch")
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(seed), data.x_train[:2]
    )
    train_mode = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    try:
        # The error is raised while tracing, before anything runs.
        train_mode(variables, data.x_train[:1])
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error (unexpected: batch norm trained on a batch of one)"


def plot_accuracy(
    table: dict[str, dict[int, float]], spreads: dict[str, dict[int, float]], path: Path
) -> None:
    """Mean test accuracy against batch size (log2 axis), one line per normalization.

    Error bars show ``spreads`` (the standard deviation over the seeds).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for norm, by_batch in table.items():
        sizes = sorted(by_batch)
        ax.errorbar(
            sizes,
            [100 * by_batch[b] for b in sizes],
            yerr=[100 * spreads[norm][b] for b in sizes],
            fmt="o-",
            capsize=3,
            label=NORMS[norm],
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({b for by_batch in table.values() for b in by_batch}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.set_xlabel("mini-batch size (images per batch)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits CNN: same epochs at every batch size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 64], help="batch sizes to compare"
    )
    parser.add_argument(
        "--norms", nargs="+", choices=list(NORMS), default=list(NORMS), help="normalizations"
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs at every batch size")
    parser.add_argument(
        "--base-lr", type=float, default=0.1, help=f"SGD learning rate at batch {REFERENCE_BATCH}"
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed (vmapped)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/small_batch"), help="output directory"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    by_batch = [n for n in args.norms if n in ("batch", "renorm")]
    if min(args.batch_sizes) < 2 and by_batch:
        parser.error(
            f"--batch-sizes must be at least 2 for --norms {' '.join(by_batch)} (batch "
            f"statistics need two values per feature; the batch of 1 is shown separately), "
            f"got {args.batch_sizes}; group and layer norm take a batch of 1"
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every normalization at every batch size; returns the result rows."""
    args = parse_args(argv)
    out = _common.make_output_dir(args.out)
    data = _common.load_digits_split(seed=args.seeds[0], image_shape=True)
    print(
        f"{len(data.x_train)} training / {len(data.x_test)} test images, {args.epochs} epochs, "
        f"SGD lr = {args.base_lr} * batch / {REFERENCE_BATCH}, momentum {args.momentum}, "
        f"seeds {args.seeds}"
    )
    rows: list[dict[str, Any]] = []
    # Wu & He's layout: one row per normalization, one column per batch size.
    table: dict[str, dict[int, float]] = {norm: {} for norm in args.norms}
    spreads: dict[str, dict[int, float]] = {norm: {} for norm in args.norms}
    summary: dict[str, dict[str, Any]] = {norm: {"norm": NORMS[norm]} for norm in args.norms}
    runs = list(itertools.product(args.norms, args.batch_sizes))
    for norm, batch_size in tqdm(runs, desc="runs"):
        result = train_and_evaluate(norm, batch_size, data, args, args.seeds)
        for seed, accuracy, loss in zip(
            args.seeds, result.test_accuracy, result.final_train_loss, strict=True
        ):
            rows.append(
                {
                    "norm": NORMS[norm],
                    "batch_size": batch_size,
                    "seed": seed,
                    "test_accuracy": accuracy,
                    "final_train_loss": loss,
                    "steps": result.steps,
                    "seconds_all_seeds": result.seconds,
                }
            )
        accuracies = np.asarray(result.test_accuracy)
        table[norm][batch_size] = float(accuracies.mean())
        # The sample standard deviation; 0 for a single seed.
        spreads[norm][batch_size] = float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0
        cell = f"{100 * table[norm][batch_size]:.1f}"
        if len(accuracies) > 1:
            cell += f" ± {100 * spreads[norm][batch_size]:.1f}"
        summary[norm][f"batch {batch_size}"] = cell

    spread = " ± sample standard deviation" if len(args.seeds) > 1 else ""
    print(f"\ntest accuracy (%), mean{spread} over seeds {args.seeds}:")
    _common.print_table(list(summary.values()))

    print("\na training step of batch norm on a batch of 1:")
    message = batch_of_one_error(data, args.seeds[0])
    print(f"  {message}")

    _common.write_csv(out / "results.csv", rows)
    _common.write_json(
        out / "results.json",
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
            # The mean over the seeds, as a fraction (the rows hold each seed's).
            "test_accuracy": {NORMS[n]: by_batch for n, by_batch in table.items()},
            "batch_of_one": message,
        },
    )
    plot_accuracy(table, spreads, out / "accuracy_vs_batch.png")
    print(f"outputs in {out}")
    return rows


if __name__ == "__main__":
    main()
