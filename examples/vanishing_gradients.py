"""Vanishing gradients in a deep MLP on digits, and what ReLU, He init and normalization do.

A deep multilayer perceptron (default 15 hidden layers of 64 units) is trained on
scikit-learn's bundled 8x8 digits under each configuration below, with plain
mini-batch SGD (no momentum, no Adam: Adam divides every gradient by its own
running scale and so hides exactly the per-layer gradient scale this example
measures). For each configuration it reports

- the L2 norm of each layer's kernel gradient at initialization (the first
  mini-batch's gradient, fixed by the seed) and the ratio first layer / output layer;
- the fraction of saturated (sigmoid, tanh) or dead (ReLU) units at initialization
  (whole training set);
- the test accuracy after a fixed budget of steps, its curve over training and
  the first evaluated step at which it reaches 90%;
- the median milliseconds per jit-compiled training step.

Configurations (``--configs`` takes a comma-separated subset of the keys):

====================  ========================================================
sigmoid_naive         sigmoid, N(0, 0.01^2) weights (the pre-2010 default)
sigmoid_xavier        sigmoid, Xavier/Glorot normal
tanh_xavier           tanh, Xavier/Glorot normal
relu_xavier           ReLU, Xavier/Glorot normal
relu_he               ReLU, He/Kaiming normal
leaky_relu_he         leaky ReLU (slope 0.1), He normal with the same slope
elu_he                ELU, He normal
selu_lecun            SELU, LeCun normal (self-normalizing networks)
gelu_he               GELU, He normal
sigmoid_naive_bn      sigmoid, N(0, 0.01^2), batch norm before each activation
sigmoid_xavier_bn     sigmoid, Xavier/Glorot normal, batch norm before each activation
relu_he_bn            ReLU, He normal, batch norm before each activation
relu_he_ln            ReLU, He normal, layer norm before each activation
====================  ========================================================

Outputs in ``--out`` (default ``out/vanishing_gradients``): ``results.json``,
``results.csv``, ``gradient_norms.png`` (per-layer kernel gradient norms at
initialization, log scale), ``test_accuracy.png`` and ``train_loss.png``.

Run ``python examples/vanishing_gradients.py`` (about a minute on 2 CPU cores).

``--preset depth30`` is the experiment of He et al. (2015, Figure 3) on digits: a
30-layer ReLU network with Xavier's and with He's initialization (plus He with
batch norm and with layer norm), 3000 steps at learning rate 0.02, written to
``out/vanishing_gradients_depth30``. A preset only changes defaults: explicit
flags still win (e.g. ``--preset depth30 --learning-rate 0.05``). At the default learning
rate 0.05 the 30-layer ReLU + He network learns but is unstable.

References:
  Glorot & Bengio, "Understanding the difficulty of training deep feedforward
  neural networks", AISTATS 2010.
  He, Zhang, Ren & Sun, "Delving Deep into Rectifiers", ICCV 2015 (Figure 3).
  Ioffe & Szegedy, "Batch Normalization", ICML 2015.
  Ba, Kiros & Hinton, "Layer Normalization", 2016.
  Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from normjax import diagnostics
from normjax import initializers as ni
from normjax import linen as njnn

LEAKY_RELU_SLOPE = 0.1
# Activations with a saturation rule in normjax.diagnostics.activation_stats.
SATURATING_ACTIVATIONS = ("sigmoid", "tanh", "relu")
NAIVE_STDDEV = 0.01

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jax.nn.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=LEAKY_RELU_SLOPE),
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": jax.nn.gelu,
}

INITIALIZERS: dict[str, Callable[[], jax.nn.initializers.Initializer]] = {
    "naive": lambda: jax.nn.initializers.normal(stddev=NAIVE_STDDEV),
    # Glorot & Bengio's scheme with gain 1, as in their paper.
    "xavier": lambda: ni.xavier_normal(),
    "he": lambda: ni.he_normal(nonlinearity="relu"),
    "he_leaky": lambda: ni.he_normal(nonlinearity="leaky_relu", negative_slope=LEAKY_RELU_SLOPE),
    "lecun": lambda: ni.lecun_normal(),
}


class Config(NamedTuple):
    """One row of the study: an activation, an initializer and an optional norm layer."""

    label: str
    activation: str
    init: str
    norm: str | None = None  # None, "batch" or "layer"


CONFIGS: dict[str, Config] = {
    "sigmoid_naive": Config("sigmoid + N(0,0.01²)", "sigmoid", "naive"),
    "sigmoid_xavier": Config("sigmoid + Xavier", "sigmoid", "xavier"),
    "tanh_xavier": Config("tanh + Xavier", "tanh", "xavier"),
    "relu_xavier": Config("ReLU + Xavier", "relu", "xavier"),
    "relu_he": Config("ReLU + He", "relu", "he"),
    "leaky_relu_he": Config(f"leaky ReLU({LEAKY_RELU_SLOPE}) + He", "leaky_relu", "he_leaky"),
    "elu_he": Config("ELU + He", "elu", "he"),
    "selu_lecun": Config("SELU + LeCun", "selu", "lecun"),
    "gelu_he": Config("GELU + He", "gelu", "he"),
    "sigmoid_naive_bn": Config("sigmoid + N(0,0.01²) + BN", "sigmoid", "naive", "batch"),
    "sigmoid_xavier_bn": Config("sigmoid + Xavier + BN", "sigmoid", "xavier", "batch"),
    "relu_he_bn": Config("ReLU + He + BN", "relu", "he", "batch"),
    "relu_he_ln": Config("ReLU + He + LN", "relu", "he", "layer"),
}

# Named sets of defaults; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "depth30": {
        "depth": 30,
        "lr": 0.02,
        "steps": 3000,
        "eval_every": 100,
        "configs": "relu_xavier,relu_he,relu_he_bn,relu_he_ln",
        "out": Path("out/vanishing_gradients_depth30"),
    },
}

TABLE_COLUMNS = (
    "config",
    "grad_first",
    "grad_last",
    "ratio_first_last",
    "saturated_at_init",
    "final_train_loss",
    "test_accuracy",
    "steps_to_90pct",
    "ms_per_step",
)


class MLP(nn.Module):
    """``depth`` hidden blocks Dense -> [norm] -> activation, then a linear output layer.

    The Dense layers get Flax's default names ``Dense_0 ... Dense_{depth}`` (the
    last one is the output layer), so `diagnostics.gradient_norms` lists them in order.
    """

    depth: int
    width: int
    num_classes: int
    activation: str
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    norm: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for _ in range(self.depth):
            # A bias before batch norm is cancelled by its mean subtraction.
            x = nn.Dense(self.width, kernel_init=self.kernel_init, use_bias=self.norm != "batch")(x)
            if self.norm == "batch":
                x = njnn.BatchNorm(use_running_average=not train)(x)
            elif self.norm == "layer":
                x = njnn.LayerNorm()(x)
            x = act(x)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


def build_model(config: Config, *, depth: int, width: int) -> MLP:
    """The MLP of one configuration, with its initializer."""
    return MLP(
        depth=depth,
        width=width,
        num_classes=_common.NUM_DIGIT_CLASSES,
        activation=config.activation,
        kernel_init=INITIALIZERS[config.init](),
        norm=config.norm,
    )


class TrainingFunctions(NamedTuple):
    """The jit-compiled functions of one architecture."""

    # (params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss, grads)
    train_step: Callable[..., Any]
    accuracy: Callable[..., jax.Array]  # (params, batch_stats, x, y) -> accuracy


@functools.cache
def training_functions(
    activation: str, norm: str | None, depth: int, width: int, learning_rate: float
) -> TrainingFunctions:
    """Builds (once per architecture) the jit-compiled training step and accuracy.

    Applying a model never calls its ``kernel_init``, so configurations that differ
    only in initialization (sigmoid_naive and sigmoid_xavier, relu_xavier and
    relu_he, ...) share these functions and XLA compiles each just once: on a
    CPU, compilation rather than training dominates this example's run time.
    """
    model = MLP(depth, width, _common.NUM_DIGIT_CLASSES, activation, norm=norm)
    optimizer = optax.sgd(learning_rate)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", batch_stats)

    def train_step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # The gradients come back too: those of the first step are the ones at init.
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

    def accuracy(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    return TrainingFunctions(jax.jit(train_step), jax.jit(accuracy))


def _hidden_preactivation_filter(depth: int, norm: str | None) -> Callable[[nn.Module, str], bool]:
    """Selects the layers whose outputs the activation is applied to."""
    norm_type = {"batch": njnn.BatchNorm, "layer": njnn.LayerNorm}.get(norm or "")

    def select(module: nn.Module, method_name: str) -> bool:
        if method_name != "__call__":
            return False
        if norm_type is not None:
            return isinstance(module, norm_type)
        return isinstance(module, nn.Dense) and module.name != f"Dense_{depth}"

    return select


def run_config(
    config: Config,
    data: _common.DigitsSplit,
    *,
    depth: int,
    width: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    eval_every: int,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Measures one configuration: gradients at init, then trains and evaluates it.

    Returns:
      A dict with the per-layer kernel gradient norms at initialization, the
      ratio first/last, the saturated fraction at init, the test-accuracy and
      train-loss curves, the final test accuracy, the first step reaching 90%
      test accuracy and the median ms per step.
    """
    model = build_model(config, depth=depth, width=width)
    fns = training_functions(config.activation, config.norm, depth, width, learning_rate)
    x_train = jnp.asarray(data.x_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    # lazy_init computes only the variables, not the forward pass: on a CPU that is
    # cheaper than both an eager init and compiling an init program per configuration.
    input_shape = jax.ShapeDtypeStruct((1, *x_train.shape[1:]), x_train.dtype)
    variables = model.lazy_init(jax.random.key(seed), input_shape, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    saturated_at_init = math.nan
    if config.activation in SATURATING_ACTIVATIONS:
        stats = diagnostics.activation_stats(
            model,
            {"params": params, "batch_stats": batch_stats},
            x_train,
            activation=config.activation,
            layers=_hidden_preactivation_filter(depth, config.norm),
            train=True,
            mutable=["batch_stats"],
        )
        saturated_at_init = float(np.mean([s.saturated_fraction for s in stats.values()]))

    opt_state = optax.sgd(learning_rate).init(params)
    train_step = fns.train_step

    def test_accuracy(params: Any, batch_stats: Any) -> float:
        return float(fns.accuracy(params, batch_stats, x_test, y_test))

    batches = _common.iterate_batches(data.x_train, data.y_train, batch_size, seed=seed)
    eval_steps, accuracies = [0], [test_accuracy(params, batch_stats)]
    loss_steps, losses = [], []
    running_loss: list[jax.Array] = []
    kernel_norms: dict[str, float] = {}
    # A manual bar: iterating tqdm over the steps would show a stale count whenever
    # set_postfix redraws it between tqdm's own (rate-limited) refreshes.
    bar = tqdm(total=steps, desc=config.label, leave=False, disable=not progress)
    for step in range(1, steps + 1):
        x, y = next(batches)
        params, batch_stats, opt_state, loss, grads = train_step(
            params, batch_stats, opt_state, x, y
        )
        if step == 1:
            # The first step's gradients are taken at the initial parameters.
            kernel_norms = {
                name.removesuffix("/kernel"): norm
                for name, norm in diagnostics.gradient_norms(grads).items()
                if name.endswith("/kernel")
            }
        running_loss.append(loss)
        if step % eval_every == 0 or step == steps:
            # Read losses only here: each float() waits for the device.
            loss_steps.append(step)
            losses.append(float(np.mean(jax.device_get(running_loss))))
            running_loss = []
            eval_steps.append(step)
            accuracies.append(test_accuracy(params, batch_stats))
            bar.set_postfix(
                loss=f"{losses[-1]:.3f}", test_acc=f"{accuracies[-1]:.3f}", refresh=False
            )
        bar.update()
    bar.close()

    # The first evaluation at or above 90% test accuracy: how fast it learns.
    steps_to_90pct = next(
        (s for s, a in zip(eval_steps, accuracies, strict=True) if a >= 0.9), None
    )
    first, last = kernel_norms["Dense_0"], kernel_norms[f"Dense_{depth}"]
    x, y = next(batches)
    ms_per_step = _common.median_step_ms(
        train_step, params, batch_stats, opt_state, x, y, repeats=30, warmup=2
    )
    return {
        "label": config.label,
        "grad_norms_at_init": kernel_norms,
        "grad_first": first,
        "grad_last": last,
        "ratio_first_last": first / last if last > 0 else math.nan,
        "saturated_at_init": saturated_at_init,
        "accuracy_steps": eval_steps,
        "test_accuracy_curve": accuracies,
        "loss_steps": loss_steps,
        "train_loss_curve": losses,
        "final_train_loss": losses[-1] if losses else math.nan,
        "test_accuracy": accuracies[-1],
        "steps_to_90pct": steps_to_90pct,
        "ms_per_step": ms_per_step,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--depth", type=int, default=15, help="number of hidden layers")
    parser.add_argument("--width", type=int, default=64, help="units per hidden layer")
    parser.add_argument("--steps", type=int, default=1500, help="SGD steps per configuration")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per SGD step")
    parser.add_argument(
        "--learning-rate",
        "--lr",
        dest="lr",
        type=float,
        default=0.05,
        help="plain SGD learning rate",
    )
    parser.add_argument("--eval-every", type=int, default=50, help="steps between test evals")
    parser.add_argument("--seed", type=int, default=0, help="data split, init and batch order")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of: " + ", ".join(CONFIGS),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/vanishing_gradients"), help="output folder"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named set of defaults (depth30: He et al. 2015's 30-layer ReLU experiment)",
    )
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    for flag in ("depth", "width", "steps", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the study and writes its outputs.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      ``{"settings": {...}, "results": {config key: run_config(...) result}}``,
      as written to ``results.json``.
    """
    args = parse_args(argv)
    out = _common.make_output_dir(args.out)
    data = _common.load_digits_split(seed=args.seed)
    settings = {
        "depth": args.depth,
        "width": args.width,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "optimizer": "plain SGD",
        "preset": args.preset,
        "seed": args.seed,
        "train_examples": len(data.x_train),
        "test_examples": len(data.x_test),
        "backend": jax.default_backend(),
    }
    print(
        f"{args.depth} hidden layers x {args.width} units, plain SGD lr={args.lr}, "
        f"{args.steps} steps of {args.batch_size} on digits "
        f"({len(data.x_train)} train / {len(data.x_test)} test), {jax.default_backend()}"
    )
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for key in tqdm(args.configs, desc="configs", disable=args.no_progress):
        results[key] = run_config(
            CONFIGS[key],
            data,
            depth=args.depth,
            width=args.width,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            eval_every=args.eval_every,
            seed=args.seed,
            progress=not args.no_progress,
        )
    settings["wall_seconds"] = time.perf_counter() - start

    rows = [
        {"config": r["label"], **{c: r[c] for c in TABLE_COLUMNS[1:]}} for r in results.values()
    ]
    for row in rows:
        if row["steps_to_90pct"] is None:
            row["steps_to_90pct"] = "never"
    print()
    _common.print_table(rows, TABLE_COLUMNS, float_format=".3g")
    print(f"\n(total {settings['wall_seconds']:.0f} s; outputs in {out})")

    summary = {"settings": settings, "results": results}
    _common.write_json(out / "results.json", summary)
    _common.write_csv(out / "results.csv", rows)
    diagnostics.plot_gradient_norms(
        {r["label"]: r["grad_norms_at_init"] for r in results.values()},
        out / "gradient_norms.png",
        title=f"Kernel gradient norms at initialization, {args.depth} hidden layers",
    )
    _common.plot_curves(
        {r["label"]: (r["accuracy_steps"], r["test_accuracy_curve"]) for r in results.values()},
        out / "test_accuracy.png",
        xlabel="SGD step",
        ylabel="test accuracy",
        title=f"Digits, {args.depth} hidden layers x {args.width}",
    )
    _common.plot_curves(
        {r["label"]: (r["loss_steps"], r["train_loss_curve"]) for r in results.values()},
        out / "train_loss.png",
        xlabel="SGD step",
        ylabel="training loss (mean over the last steps)",
        title=f"Digits, {args.depth} hidden layers x {args.width}",
        log_y=True,
    )
    return summary


if __name__ == "__main__":
    main()
