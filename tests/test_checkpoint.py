"""normjax modules' variables through orbax-checkpoint: bitwise round trips and resumption.

A checkpoint must hold everything a run needs: ``params``, ``batch_stats``
(with normjax's int32 ``count``, which drives the debiased running averages)
and the optimizer state. The proof is that a run stopped, checkpointed,
restored into fresh objects and continued ends bitwise equal to one that ran
straight through.
"""

from __future__ import annotations

import functools
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from normjax import linen as njl
from normjax import nnx as njx

KEY = functools.partial(jax.random.key, impl="rbg")
STEPS, STOP_AT = 4, 2


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def _batches(digits, steps: int, size: int = 64):
    images, labels = digits
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(labels), size, replace=False)
        yield images[batch], labels[batch]


def _save_and_restore(path: Path, tree, target):
    """Saves ``tree`` with orbax, waits for the write to finish, restores it into ``target``."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    return restored


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# ----------------------------------------------------------------------------
# Linen: params, batch_stats and optax state.


class MLP(nn.Module):
    """dense -> BatchNorm -> relu -> dense -> LayerNorm -> relu -> dense."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(njl.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(32)(x)))
        x = nn.relu(njl.LayerNorm()(nn.Dense(32)(x)))
        return nn.Dense(10)(x)


LINEN_TX = optax.adam(1e-2)


@jax.jit
def _linen_step(variables, opt_state, x, y):
    def loss(params):
        logits, state = MLP().apply(
            {**variables, "params": params}, x, True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    (_, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = LINEN_TX.update(grads, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates), **state}, opt_state


def _linen_start(digits):
    variables = MLP().init(KEY(0), digits[0][:8], False)
    return variables, LINEN_TX.init(variables["params"])


def test_linen_checkpoint_round_trips_bitwise_and_resumes_bitwise(tmp_path, digits):
    batches = list(_batches(digits, STEPS))
    straight = _linen_start(digits)
    for x, y in batches:
        straight = _linen_step(*straight, x, y)

    stopped = _linen_start(digits)
    for x, y in batches[:STOP_AT]:
        stopped = _linen_step(*stopped, x, y)
    assert int(stopped[0]["batch_stats"]["BatchNorm_0"]["count"]) == STOP_AT
    fresh = _linen_start(digits)  # the process restarted: new objects, restored values
    resumed = _save_and_restore(tmp_path / "linen", stopped, _abstract(fresh))
    # params, batch_stats (int32 count included) and the adam state, bit for bit.
    chex.assert_trees_all_equal(resumed, stopped)
    chex.assert_trees_all_equal_dtypes(resumed, stopped)
    for x, y in batches[STOP_AT:]:
        resumed = _linen_step(*resumed, x, y)

    chex.assert_trees_all_equal(resumed, straight)
    assert int(resumed[0]["batch_stats"]["BatchNorm_0"]["count"]) == STEPS


# ----------------------------------------------------------------------------
# NNX: the model state and the optimizer state.


class NNXMLP(nnx.Module):
    """linear -> BatchNorm -> relu -> linear -> GroupNorm -> relu -> linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(64, 32, rngs=rngs)
        self.bn = njx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(32, 32, rngs=rngs)
        self.gn = njx.GroupNorm(32, num_groups=4, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.dense1(x)))
        x = nnx.relu(self.gn(self.dense2(x)))
        return self.head(x)


@nnx.jit
def _nnx_step(model: NNXMLP, optimizer: nnx.Optimizer, x, y):
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss)(model))


def _nnx_start(seed: int = 0) -> tuple[NNXMLP, nnx.Optimizer]:
    model = NNXMLP(nnx.Rngs(KEY(seed)))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def _nnx_state(model: NNXMLP, optimizer: nnx.Optimizer) -> dict:
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def test_nnx_checkpoint_round_trips_bitwise_and_resumes_bitwise(tmp_path, digits):
    batches = list(_batches(digits, STEPS))
    straight = _nnx_start()
    for x, y in batches:
        _nnx_step(*straight, x, y)

    stopped = _nnx_start()
    for x, y in batches[:STOP_AT]:
        _nnx_step(*stopped, x, y)
    resumed = _nnx_start(seed=1)  # a fresh process: new objects, other initial values
    restored = _save_and_restore(tmp_path / "nnx", _nnx_state(*stopped), _nnx_state(*resumed))
    nnx.update(resumed[0], restored["model"])
    nnx.update(resumed[1], restored["optimizer"])
    chex.assert_trees_all_equal(_nnx_state(*resumed), _nnx_state(*stopped))
    assert resumed[0].bn.count[...].dtype == jnp.int32
    assert int(resumed[0].bn.count[...]) == STOP_AT
    for x, y in batches[STOP_AT:]:
        _nnx_step(*resumed, x, y)

    chex.assert_trees_all_equal(_nnx_state(*resumed), _nnx_state(*straight))
    assert int(resumed[0].bn.count[...]) == STEPS
