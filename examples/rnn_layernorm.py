"""Exploding gradients in a recurrent network, and what layer norm and clipping do.

The adding problem (Hochreiter & Schmidhuber 1997, in its common modern form):
each sequence has ``T`` steps
of two channels, a value drawn uniformly from [0, 1] and a marker that is 1 at
exactly two steps (one in each half of the sequence) and 0 elsewhere; the target
is the sum of the two marked values. Predicting the constant 1 gives a mean
squared error of 1/6 (about 0.167), so a network that beats 0.167 has learned to
carry information across up to ``T`` steps. A prediction counts as correct when
its absolute error is below 0.04 (Hochreiter & Schmidhuber's criterion). The data is generated
inside the jit-compiled step; nothing is downloaded.

Two recurrent networks, a vanilla tanh RNN and an LSTM, written with
``flax.linen`` and unrolled with ``nn.scan`` (``jax.lax.scan``), are each
trained under four configurations: with and without layer normalization inside
the cell (``normjax.linen.LayerNorm``, placed as in Ba et al.'s LSTM (2016): on
the input and recurrent projections separately and, for the LSTM, on the cell
state before the output tanh) and with and without ``optax.clip_by_global_norm``. Plain SGD
with momentum is the default optimizer because it applies the gradient as it
is, so an exploding gradient becomes an exploding update; Adam (``--optimizer
adam``) divides by a running scale and hides part of the effect.

The vanilla RNN shows the explosions (Pascanu et al. 2013); the LSTM, which
can solve the task, shows what layer norm and clipping do to learning. For each
cell and configuration it reports the global gradient norm over training (before
clipping: its median, 99th percentile and maximum, and the number of steps
where it exceeded the clipping threshold), the final training and test loss,
the test accuracy and the median milliseconds per step.

Training a recurrent network near the edge of explosion is chaotic: a
different seed, or a change in rounding, can turn one run's result around. So
every configuration trains from ``--num-seeds`` seeds (default 3: ``--seed``,
``--seed + 1``, ...; each seed sets the initialization, the training batches and
the test set, and every configuration sees the same ones), and the table shows
the median over the seeds of each statistic, with the range ``[min-max]`` over
the seeds of the largest gradient norm and of the test MSE. One compilation per
configuration serves all its seeds.

Outputs in ``--out`` (default ``out/rnn_layernorm``): ``results.json`` (the
median rows, every seed's row and every seed's curves), ``results.csv`` (the
median rows), ``results_per_seed.csv`` and ``rnn_layernorm.png`` (per cell: the
gradient norm at every step, log scale, of the seed with the median test MSE,
and the test loss over training of every seed, the median seed's bold; one
color per configuration).

Run ``python examples/rnn_layernorm.py`` (a few minutes on 2 CPU cores; ``--cells rnn``
for the explosions alone, about a minute; ``--num-seeds 1`` for a single run per
configuration).

References:
  Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997
  (the adding problem, experiment 4).
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
  networks", ICML 2013 (exploding gradients, gradient-norm clipping).
  Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016 (layer
  normalization inside recurrent cells).
"""

from __future__ import annotations

import argparse
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

#: Hochreiter & Schmidhuber count a prediction correct below this absolute error.
CORRECT_ABS_ERROR = 0.04
#: The test MSE of always predicting the mean target 1 (the variance of U(0,1) + U(0,1)).
CONSTANT_PREDICTOR_MSE = 1.0 / 6.0


class Config(NamedTuple):
    """One configuration: layer norm inside the cell or not, clipping or not."""

    label: str
    layer_norm: bool
    clip: bool


CONFIGS: dict[str, Config] = {
    "plain": Config("no LN, no clip", layer_norm=False, clip=False),
    "clip": Config("no LN, clip", layer_norm=False, clip=True),
    "ln": Config("LN, no clip", layer_norm=True, clip=False),
    "ln_clip": Config("LN, clip", layer_norm=True, clip=True),
}

#: The printed table's columns; ``[min-max]``: the median and the range over the seeds.
TABLE_COLUMNS = (
    "cell",
    "config",
    "grad_norm_median",
    "grad_norm_p99",
    "grad_norm_max [min-max]",
    "steps_above_clip",
    "final_train_loss",
    "test_mse [min-max]",
    "test_accuracy",
    "ms_per_step",
)
#: The per-run statistics whose median over the seeds forms a configuration's row.
RUN_STATISTICS = (
    "grad_norm_median",
    "grad_norm_p99",
    "grad_norm_max",
    "steps_above_clip",
    "nonfinite_steps",
    "final_train_loss",
    "test_mse",
    "test_accuracy",
    "ms_per_step",
)


def adding_problem(key: jax.Array, num_sequences: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """Generates a batch of the adding problem.

    Args:
      key: a PRNG key.
      num_sequences: the batch size.
      seq_len: ``T``, the number of time steps (at least 2).

    Returns:
      ``(x, y)``: inputs ``(num_sequences, seq_len, 2)`` (value, marker) and
      targets ``(num_sequences,)``, the sum of the two marked values.

    Raises:
      ValueError: if ``seq_len`` is less than 2.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one marker per half), got {seq_len}")
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (num_sequences, seq_len))
    half = seq_len // 2
    first = jax.random.randint(first_key, (num_sequences,), 0, half)
    second = jax.random.randint(second_key, (num_sequences,), half, seq_len)
    markers = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=-1)


class LSTMCell(nn.Module):
    """An LSTM cell, optionally with layer normalization as in Ba et al.'s (2016) LSTM.

    With ``layer_norm``: gates = LN(W_x x) + LN(W_h h) + b, and the output is
    ``o * tanh(LN(c))``. The forget gate's bias starts at 1 (Gers et al. 2000)
    so the cell remembers by default.
    """

    hidden: int
    layer_norm: bool

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        cell, hidden = carry
        from_input = nn.Dense(4 * self.hidden, use_bias=False, kernel_init=ni.xavier_uniform())(x)
        from_hidden = nn.Dense(4 * self.hidden, use_bias=False, kernel_init=ni.orthogonal())(hidden)
        if self.layer_norm:
            # The gate bias below replaces the LN biases, which would be redundant.
            from_input = njnn.LayerNorm(use_bias=False, name="ln_input")(from_input)
            from_hidden = njnn.LayerNorm(use_bias=False, name="ln_hidden")(from_hidden)
        bias = self.param("bias", _lstm_bias_init, (4 * self.hidden,))
        gates = from_input + from_hidden + bias
        in_gate, forget_gate, candidate, out_gate = jnp.split(gates, 4, axis=-1)
        cell = jax.nn.sigmoid(forget_gate) * cell + jax.nn.sigmoid(in_gate) * jnp.tanh(candidate)
        shown = njnn.LayerNorm(name="ln_cell")(cell) if self.layer_norm else cell
        hidden = jax.nn.sigmoid(out_gate) * jnp.tanh(shown)
        return (cell, hidden), None


def _lstm_bias_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Zero biases except the forget gate's (the second quarter), which start at 1."""
    del key
    quarter = shape[0] // 4
    return jnp.zeros(shape, dtype).at[quarter : 2 * quarter].set(1.0)


class TanhRNNCell(nn.Module):
    """A vanilla (Elman) cell ``h = tanh(W_x x + W_h h + b)``.

    With ``layer_norm``: ``h = tanh(LN(W_x x) + LN(W_h h) + b)``, each projection
    normalized separately as in Ba et al.'s (2016) LSTM.
    """

    hidden: int
    layer_norm: bool

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        _, hidden = carry
        from_input = nn.Dense(self.hidden, use_bias=False, kernel_init=ni.xavier_uniform())(x)
        from_hidden = nn.Dense(self.hidden, use_bias=False, kernel_init=ni.orthogonal())(hidden)
        if self.layer_norm:
            from_input = njnn.LayerNorm(use_bias=False, name="ln_input")(from_input)
            from_hidden = njnn.LayerNorm(use_bias=False, name="ln_hidden")(from_hidden)
        bias = self.param("bias", nn.initializers.zeros, (self.hidden,))
        hidden = jnp.tanh(from_input + from_hidden + bias)
        return (hidden, hidden), None


CELLS: dict[str, type[nn.Module]] = {"lstm": LSTMCell, "rnn": TanhRNNCell}


class Regressor(nn.Module):
    """Runs the cell over the sequence with ``nn.scan`` and reads the sum off the last state."""

    cell: str
    hidden: int
    layer_norm: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scan = nn.scan(
            CELLS[self.cell],
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        (_, hidden), _ = scan(self.hidden, self.layer_norm, name="cell")((zeros, zeros), x)
        return nn.Dense(1, name="readout")(hidden)[:, 0]


class RunResult(NamedTuple):
    """The measurements of one configuration trained from one seed."""

    seed: int
    row: dict[str, Any]
    grad_norms: np.ndarray
    train_losses: np.ndarray
    eval_steps: list[int]
    test_losses: list[float]


def make_optimizer(name: str, learning_rate: float, clip_norm: float | None) -> Any:
    """The optimizer, with ``optax.clip_by_global_norm`` first when ``clip_norm`` is set."""
    if name == "sgd":
        base = optax.sgd(learning_rate, momentum=0.9)
    elif name == "adam":
        base = optax.adam(learning_rate)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
    if clip_norm is None:
        return base
    return optax.chain(optax.clip_by_global_norm(clip_norm), base)


def run_config(
    cell: str, config: Config, args: argparse.Namespace, seeds: Sequence[int], *, position: int = 0
) -> list[RunResult]:
    """Trains one cell under one configuration from each seed: gradient norms, losses, speed.

    The keys and the test set are arguments of the jit-compiled functions, so
    all the seeds share one compilation.
    """
    model = Regressor(cell=cell, hidden=args.hidden, layer_norm=config.layer_norm)
    optimizer = make_optimizer(
        args.optimizer, args.learning_rate, args.clip_norm if config.clip else None
    )
    # Compiled: Flax's eager init would compile each small operation on its own.
    init = jax.jit(model.init)
    make_test_set = jax.jit(adding_problem, static_argnums=(1, 2))

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    @jax.jit
    def train_step(
        params: Any, opt_state: Any, data_key: jax.Array, step: jax.Array
    ) -> tuple[Any, Any, jax.Array, jax.Array]:
        # Every configuration sees the same batches: the key depends on the seed and step only.
        x, y = adding_problem(jax.random.fold_in(data_key, step), args.batch_size, args.seq_len)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    @jax.jit
    def evaluate(params: Any, x_test: jax.Array, y_test: jax.Array) -> tuple[jax.Array, jax.Array]:
        error = model.apply({"params": params}, x_test) - y_test
        return jnp.mean(error**2), jnp.mean(jnp.abs(error) < CORRECT_ABS_ERROR)

    results = []
    for seed in seeds:
        init_key, data_key, test_key = jax.random.split(jax.random.key(seed), 3)
        params = init(init_key, jnp.zeros((1, args.seq_len, 2)))["params"]
        opt_state = optimizer.init(params)
        x_test, y_test = make_test_set(test_key, args.test_size, args.seq_len)
        losses, norms = [], []
        eval_steps, test_losses = [], []
        for step in tqdm(
            range(args.steps), desc=f"{cell}, {config.label}, seed {seed}", leave=False,
            position=position, mininterval=1.0,
        ):  # fmt: skip
            params, opt_state, loss, norm = train_step(params, opt_state, data_key, jnp.int32(step))
            losses.append(loss)
            norms.append(norm)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                eval_steps.append(step + 1)
                test_losses.append(float(evaluate(params, x_test, y_test)[0]))
        test_mse, test_accuracy = (float(v) for v in evaluate(params, x_test, y_test))
        ms_per_step = _common.median_step_ms(
            train_step, params, opt_state, data_key, jnp.int32(0), repeats=args.timing_repeats
        )
        norms_np = np.asarray(jax.device_get(norms), dtype=np.float64)
        losses_np = np.asarray(jax.device_get(losses), dtype=np.float64)
        tail = max(1, len(losses_np) // 10)
        finite = norms_np[np.isfinite(norms_np)]
        if finite.size == 0:
            finite = np.array([np.nan])
        row = {
            "cell": cell,
            "config": config.label,
            "seed": seed,
            "grad_norm_median": float(np.median(finite)),
            "grad_norm_p99": float(np.percentile(finite, 99)),
            "grad_norm_max": float(np.max(finite)),
            "steps_above_clip": int(np.sum(norms_np > args.clip_norm)),
            "nonfinite_steps": int(np.sum(~np.isfinite(norms_np))),
            # The mean of the last tenth of the steps: a single batch is noisy.
            "final_train_loss": float(np.mean(losses_np[-tail:])),
            "test_mse": test_mse,
            "test_accuracy": test_accuracy,
            "ms_per_step": ms_per_step,
        }
        results.append(RunResult(seed, row, norms_np, losses_np, eval_steps, test_losses))
    return results


def _worst_last(values: Sequence[float]) -> np.ndarray:
    """The values as float64, NaN (a diverged run) replaced by +inf so that it ranks the worst."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), np.inf, values)


def median_index(results: Sequence[RunResult]) -> int:
    """The index of the run with the median test MSE (for an even count, the upper of the two)."""
    order = np.argsort(_worst_last([r.row["test_mse"] for r in results]), kind="stable")
    return int(order[len(order) // 2])


def summarize(results: Sequence[RunResult]) -> dict[str, Any]:
    """One configuration's row: the median over the seeds of each run statistic, and two ranges.

    A NaN statistic (a diverged run) counts as the largest value, so a single
    diverged seed out of three does not turn the median into NaN.
    """
    first = results[0].row
    row: dict[str, Any] = {"cell": first["cell"], "config": first["config"]}
    for name in RUN_STATISTICS:
        median = float(np.median(_worst_last([r.row[name] for r in results])))
        row[name] = int(median) if isinstance(first[name], int) and median.is_integer() else median
    for name in ("grad_norm_max", "test_mse"):
        values = _worst_last([r.row[name] for r in results])
        row[f"{name}_min"], row[f"{name}_max"] = float(values.min()), float(values.max())
    row["seeds"] = [r.seed for r in results]
    row["median_seed"] = results[median_index(results)].seed
    return row


def _display_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as printed: the largest gradient norm and the test MSE as ``median [min-max]``."""
    shown = dict(row)
    for name in ("grad_norm_max", "test_mse"):
        text = f"{row[name]:.3g}"
        if len(row["seeds"]) > 1:
            text += f" [{row[f'{name}_min']:.3g}-{row[f'{name}_max']:.3g}]"
        shown[f"{name} [min-max]"] = text
    return shown


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--cells", default="rnn,lstm", help=f"comma-separated subset of {', '.join(CELLS)}"
    )
    parser.add_argument("--seq-len", type=int, default=100, help="T, the sequence length")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument("--steps", type=int, default=800, help="training steps per run")
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd: with momentum 0.9"
    )
    parser.add_argument("--learning-rate", type=float, default=0.05, help="learning rate")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="global-norm threshold")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)}",
    )
    parser.add_argument("--test-size", type=int, default=1000, help="test sequences")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between test evals")
    parser.add_argument(
        "--timing-repeats", type=int, default=10, help="timed steps per config and seed"
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument(
        "--num-seeds",
        "--seeds",
        dest="seeds",
        type=int,
        default=3,
        help="seeds per configuration: --seed, --seed + 1, ...",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/rnn_layernorm"), help="output directory"
    )
    args = parser.parse_args(argv)
    for flag, known in (("configs", CONFIGS), ("cells", CELLS)):
        unknown = [c for c in getattr(args, flag).split(",") if c not in known]
        if unknown:
            parser.error(f"--{flag}: unknown {unknown}; choose from {list(known)}")
    for name in ("seq_len", "hidden", "batch_size", "steps", "test_size", "eval_every", "seeds"):
        least = 2 if name == "seq_len" else 1
        if getattr(args, name) < least:
            flag = "num-seeds" if name == "seeds" else name.replace("_", "-")
            parser.error(f"--{flag} must be at least {least}, got {getattr(args, name)}")
    return args


def plot_runs(
    results: dict[tuple[str, str], list[RunResult]],
    path: Path,
    *,
    seq_len: int,
    clip_norm: float,
) -> None:
    """One row per cell: the median seed's gradient norm per step (log), every seed's test MSE.

    Each configuration has one color; its seed with the median test MSE is drawn
    in full (the gradient norm, and the test MSE as a bold line), the other
    seeds' test MSE as thin lines.
    """
    from matplotlib.figure import Figure

    cells = list(dict.fromkeys(cell for cell, _ in results))
    fig = Figure(figsize=(12, 4 * len(cells)), layout="constrained")
    axes = fig.subplots(len(cells), 2, squeeze=False)
    for row, cell in enumerate(cells):
        norm_ax, loss_ax = axes[row]
        names = [name for run_cell, name in results if run_cell == cell]
        for color, name in enumerate(names):
            runs = results[cell, name]
            median = median_index(runs)
            label = f"{CONFIGS[name].label} (seed {runs[median].seed})"
            steps = np.arange(1, len(runs[median].grad_norms) + 1)
            norm_ax.plot(steps, runs[median].grad_norms, color=f"C{color}", linewidth=0.7,
                         label=label)  # fmt: skip
            for i, run in enumerate(runs):
                loss_ax.plot(
                    run.eval_steps,
                    run.test_losses,
                    "o-" if i == median else "-",
                    color=f"C{color}",
                    markersize=3,
                    linewidth=1.5 if i == median else 0.6,
                    alpha=1.0 if i == median else 0.5,
                    label=label if i == median else None,
                )
        norm_ax.axhline(clip_norm, color="gray", linestyle=":", label="clip threshold")
        loss_ax.axhline(
            CONSTANT_PREDICTOR_MSE, color="gray", linestyle=":", label="constant predictor"
        )
        seeds = len(results[cell, names[0]])
        norm_ax.set_title(f"{cell}: global gradient norm (before clipping), median seed")
        loss_ax.set_title(f"{cell}: test MSE, {seeds} seed{'s' if seeds > 1 else ''} "
                          "(median seed bold)")  # fmt: skip
        for ax in (norm_ax, loss_ax):
            ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(f"Adding problem, T={seq_len}")
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the study and returns the table rows: per cell and configuration, medians over seeds."""
    args = parse_args(argv)
    out = _common.make_output_dir(args.out)
    runs = list(itertools.product(args.cells.split(","), args.configs.split(",")))
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(
        f"adding problem, T={args.seq_len}, {args.hidden} hidden units, "
        f"{args.optimizer} lr={args.learning_rate}, batch {args.batch_size}, "
        f"{args.steps} steps; clip threshold {args.clip_norm}; seeds {seeds}; "
        f"constant predictor MSE {CONSTANT_PREDICTOR_MSE:.4f}"
    )
    start = time.perf_counter()
    results: dict[tuple[str, str], list[RunResult]] = {}
    for cell, name in tqdm(runs, desc="configs"):
        results[cell, name] = run_config(cell, CONFIGS[name], args, seeds, position=1)
    rows = [summarize(r) for r in results.values()]
    seed_rows = [run.row for r in results.values() for run in r]
    print()
    if len(seeds) > 1:
        print(f"median over seeds {seeds}; [min-max]: the range over the seeds")
    _common.print_table([_display_row(row) for row in rows], TABLE_COLUMNS)
    print(f"\ntotal {time.perf_counter() - start:.1f} s; outputs in {out}")

    _common.write_csv(out / "results.csv", rows)
    _common.write_csv(out / "results_per_seed.csv", seed_rows)
    _common.write_json(
        out / "results.json",
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "constant_predictor_mse": CONSTANT_PREDICTOR_MSE,
            "rows": rows,
            "seed_rows": seed_rows,
            # Per cell/configuration, one entry per seed, in seed order.
            "runs": {
                f"{cell}/{name}": [
                    {
                        "seed": run.seed,
                        "grad_norms": run.grad_norms,
                        "train_losses": run.train_losses,
                        "eval_steps": run.eval_steps,
                        "test_losses": run.test_losses,
                    }
                    for run in r
                ]
                for (cell, name), r in results.items()
            },
        },
    )
    plot_runs(results, out / "rnn_layernorm.png", seq_len=args.seq_len, clip_norm=args.clip_norm)
    return rows


if __name__ == "__main__":
    main()
