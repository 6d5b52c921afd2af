"""Training-step speed of models with normjax.linen norms against the same models with flax.linen's.

Two models in the style of the examples (8x8 digits, 10 classes):

* ``mlp-batch`` / ``mlp-layer``: a deep MLP, ``depth`` blocks of Dense -> norm -> ReLU
  on flat 64-pixel inputs;
* ``cnn-batch``: a small CNN, two 3x3 convolutions with batch norm and ReLU on
  8x8x1 images, then average pooling and a Dense classifier.

Each model is built twice, identical but for the module that normalizes
(``normjax.linen.X`` or ``flax.linen.X`` with its defaults). One training step is
the jit-compiled forward, backward (softmax cross-entropy) and an optax Adam
update, with the batch statistics updated. Reported: the median step time of
interleaved repetitions (one step of each model in turn, in one process), the jit
compile time (``lower(...).compile()``, median of a few fresh compilations), and
the normjax/Flax ratios. Targets (the issue's): step-time ratio <= 1.0,
compile-time ratio <= 1.1.

Usage::

    python benchmarks/train_step.py                # every model, 30 repetitions
    python benchmarks/train_step.py --reps 50 --models mlp-batch,cnn-batch
    python benchmarks/train_step.py --out benchmarks/results_train_step.md
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import norms  # benchmarks/norms.py, beside this script
import optax

from normjax import linen as njl

NUM_CLASSES = 10
TARGET_STEP = 1.0
TARGET_COMPILE = 1.1


class MLP(nn.Module):
    """``depth`` blocks of Dense -> norm -> ReLU, then a linear classifier."""

    depth: int
    width: int
    norm: Callable[..., nn.Module]
    batch_norm: bool

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for _ in range(self.depth):
            # A bias before batch norm is cancelled by its mean subtraction.
            x = nn.Dense(self.width, use_bias=not self.batch_norm)(x)
            x = self.norm(use_running_average=not train)(x) if self.batch_norm else self.norm()(x)
            x = nn.relu(x)
        return nn.Dense(NUM_CLASSES)(x)


class CNN(nn.Module):
    """Two 3x3 conv -> batch norm -> ReLU blocks, global average pooling, Dense."""

    features: Sequence[int]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for f in self.features:
            x = nn.Conv(f, (3, 3), padding="SAME", use_bias=False)(x)
            x = self.norm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


def build_models(
    name: str, depth: int, width: int, batch: int
) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """The normjax and the Flax version of model ``name``, and its input shape."""
    if name == "mlp-batch":
        pair = [MLP(depth, width, lib.BatchNorm, True) for lib in (njl, nn)]
        return pair[0], pair[1], (batch, 64)
    if name == "mlp-layer":
        pair = [MLP(depth, width, lib.LayerNorm, False) for lib in (njl, nn)]
        return pair[0], pair[1], (batch, 64)
    if name == "cnn-batch":
        pair = [CNN((32, 64), lib.BatchNorm) for lib in (njl, nn)]
        return pair[0], pair[1], (batch, 8, 8, 1)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


MODELS = ("mlp-batch", "mlp-layer", "cnn-batch")


def make_step(model: nn.Module, x: jax.Array, y: jax.Array) -> tuple[Callable[..., Any], tuple]:
    """A jit-able training step of ``model`` and its initial arguments."""
    variables = model.init(jax.random.key(0), x, train=False)
    params = variables["params"]
    stats = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updated = model.apply(
                {"params": params, **stats}, x, train=True, mutable=list(stats)
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updated

        (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), updated, opt_state, loss

    return step, (params, stats, opt_state, x, y)


def compile_seconds(step: Callable[..., Any], args: tuple, times: int) -> float:
    """Median wall time of ``times`` fresh trace+lower+compile runs."""
    samples = []
    for _ in range(times):
        fresh = jax.jit(lambda *a: step(*a))  # a new function object: no cache hit
        start = time.perf_counter()
        fresh.lower(*args).compile()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_steps(compiled: dict[str, Any], args: dict[str, tuple], reps: int) -> dict[str, float]:
    """Median ms per step of each compiled step, repetitions interleaved."""
    state = dict(args)
    for name, fn in compiled.items():  # warm-up
        state[name] = _advance(fn, state[name])
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            state[name] = _advance(compiled[name], state[name])
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in samples.items()}


def _advance(fn: Any, args: tuple) -> tuple:
    params, stats, opt_state, loss = fn(*args)
    jax.block_until_ready(loss)
    return (params, stats, opt_state, *args[3:])


def run(
    models: Sequence[str],
    reps: int,
    depth: int,
    width: int,
    batch: int,
    compiles: int,
    device_time: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        nj_model, flax_model, shape = build_models(name, depth, width, batch)
        kx, ky = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, shape, jnp.float32)
        y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
        steps, args, compiled, compile_s = {}, {}, {}, {}
        for impl, model in (("normjax", nj_model), ("flax", flax_model)):
            steps[impl], args[impl] = make_step(model, x, y)
        for _ in range(compiles):  # interleave the compilations too
            for impl in steps:
                compile_s.setdefault(impl, []).append(compile_seconds(steps[impl], args[impl], 1))
        for impl in steps:
            compiled[impl] = jax.jit(steps[impl]).lower(*args[impl]).compile()
        ms = time_steps(compiled, args, reps)
        row = {
            "model": name,
            "normjax ms": ms["normjax"],
            "flax ms": ms["flax"],
            "step ratio": ms["normjax"] / ms["flax"],
            "normjax compile s": statistics.median(compile_s["normjax"]),
            "flax compile s": statistics.median(compile_s["flax"]),
        }
        row["compile ratio"] = row["normjax compile s"] / row["flax compile s"]
        if device_time:
            # Kernel time per step (see norms.device_ms): on a GPU these steps
            # take less time on the device than dispatching them does.
            device = norms.device_ms(
                {impl: functools.partial(compiled[impl], *args[impl]) for impl in compiled}, reps
            )
            row["normjax device ms"] = device["normjax"]
            row["flax device ms"] = device["flax"]
            row["device ratio"] = device["normjax"] / device["flax"]
        rows.append(row)
        print(
            f"{name}: step ratio {row['step ratio']:.3f}, compile ratio {row['compile ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def report(rows: list[dict[str, Any]], reps: int, depth: int, width: int, batch: int) -> str:
    cols = list(rows[0])
    lines = [
        f"Median of {reps} interleaved training steps (forward, backward, Adam update, batch "
        f"statistics), batch {batch}; MLP depth {depth}, width {width}; CNN 32-64 channels "
        "on 8x8x1.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] * len(cols)) + "|",
    ]
    for row in rows:
        cells = [v if isinstance(v, str) else f"{v:.3f}" for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    worst_step = max(r["step ratio"] for r in rows)
    worst_compile = max(r["compile ratio"] for r in rows)
    lines += [
        "",
        f"- worst step-time ratio: {worst_step:.3f} (target <= {TARGET_STEP}) "
        f"{'PASS' if worst_step <= TARGET_STEP else 'FAIL'}",
        f"- worst compile-time ratio: {worst_compile:.3f} (target <= {TARGET_COMPILE}) "
        f"{'PASS' if worst_compile <= TARGET_COMPILE else 'FAIL'}",
    ]
    if "device ratio" in rows[0]:
        lines.append(f"- worst device-time ratio: {max(r['device ratio'] for r in rows):.3f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30, help="interleaved steps timed (default 30)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
    p.add_argument("--depth", type=int, default=10, help="MLP blocks (default 10)")
    p.add_argument("--width", type=int, default=256, help="MLP width (default 256)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--compiles", type=int, default=3, help="compilations timed per model")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument(
        "--device-time",
        action="store_true",
        help="on an accelerator, also the kernel time per step from a profiler trace",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            print(f"unknown model {m!r}; expected one of {MODELS}", file=sys.stderr)
            return 2
    rows = run(
        models, args.reps, args.depth, args.width, args.batch, args.compiles, args.device_time
    )
    text = report(rows, args.reps, args.depth, args.width, args.batch)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
