"""Numerics side by side: normjax against flax.linen on the cases where they differ.

Every number is measured against a numpy float64 reference computed from the
same float32 (or bfloat16) input. Run:

    python benchmarks/numerics.py

and paste the table into the README.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normjax as nj


def _ref_layer_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _max_err(y: jax.Array, ref: np.ndarray) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.max(np.abs(y - ref))) if np.all(np.isfinite(y)) else float("nan")


def _flax_layer_norm(x: jax.Array, **kwargs) -> jax.Array:
    module = nn.LayerNorm(use_scale=False, use_bias=False, **kwargs)
    return module.apply({}, x)


def main() -> None:
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, str, str]] = []

    x = jnp.asarray(1e4 + rng.standard_normal((256, 512)), jnp.float32)
    std = lambda y: f"{float(np.max(np.abs(np.std(np.asarray(y, np.float64), -1) - 1))):.2g}"
    rows.append((
        "max abs(output std - 1), x = 1e4 + N(0,1) float32",
        std(nj.layer_norm(x)), std(_flax_layer_norm(x)),
        std(_flax_layer_norm(x, use_fast_variance=False)),
    ))  # fmt: skip

    x = jnp.asarray(1e30 * rng.standard_normal((64, 128)), jnp.float32)
    ref = _ref_layer_norm(np.asarray(x))
    rows.append((
        "max abs error, |x| ~ 1e30 float32",
        f"{_max_err(nj.layer_norm(x), ref):.2g}", f"{_max_err(_flax_layer_norm(x), ref):.2g}",
        f"{_max_err(_flax_layer_norm(x, use_fast_variance=False), ref):.2g}",
    ))  # fmt: skip

    xb = jnp.asarray(10 + rng.standard_normal((64, 512)), jnp.bfloat16)
    ref = _ref_layer_norm(np.asarray(xb.astype(jnp.float32)))
    rows.append((
        "max abs error, bfloat16 x = 10 + N(0,1)",
        f"{_max_err(nj.layer_norm(xb), ref):.3g}", f"{_max_err(_flax_layer_norm(xb), ref):.3g}",
        f"{_max_err(_flax_layer_norm(xb, use_fast_variance=False), ref):.3g}",
    ))  # fmt: skip

    # Running statistics after one training step on data with mean 5, std 2.
    batch = jnp.asarray(5 + 2 * rng.standard_normal((128, 16)), jnp.float32)
    _, state = nj.batch_norm(batch, nj.batch_norm_state(16), training=True)
    flax_bn = nn.BatchNorm(use_running_average=False)
    variables = flax_bn.init(jax.random.key(0), batch)
    _, updated = flax_bn.apply(variables, batch, mutable=["batch_stats"])
    true_mean = float(np.mean(np.asarray(batch, np.float64)))
    rows.append((
        f"running mean after 1 step (batch mean {true_mean:.3f})",
        f"{float(jnp.mean(state.mean)):.3f}",
        f"{float(jnp.mean(updated['batch_stats']['mean'])):.3f}", "same as default",
    ))  # fmt: skip

    poisoned = batch.at[0, 0].set(jnp.nan)
    _, nan_state = nj.batch_norm(poisoned, state, training=True)
    _, flax_nan = flax_bn.apply({**variables, **updated}, poisoned, mutable=["batch_stats"])
    nan_count = lambda tree: int(sum(np.isnan(np.asarray(v)).sum() for v in jax.tree.leaves(tree)))
    rows.append((
        "NaN entries in the running state after one NaN batch",
        str(nan_count(nan_state[:2])), str(nan_count(flax_nan)), "same as default",
    ))  # fmt: skip

    try:
        nj.batch_norm(jnp.ones((1, 16)), nj.batch_norm_state(16), training=True)
        ours = "no error"
    except ValueError:
        ours = "ValueError"
    y, _ = nn.BatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), jnp.ones((1, 16)) * 3
    )
    rows.append(("batch of 1 in training", ours, f"silently returns {float(y[0, 0]):g}", ""))

    header = ("case", "normjax", "flax.linen default", "flax use_fast_variance=False")
    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
