"""normjax: keep deep JAX networks trainable.

Variance-preserving initializers (`normjax.initializers`) and numerically
stable normalization written as pure functions over an explicit state pytree,
with Flax modules over them (`normjax.linen`, `normjax.nnx`).
"""

from normjax import initializers
from normjax.batch_norm import BatchNormState, batch_norm, batch_norm_state, batch_renorm
from normjax.fold import fold_batch_norm
from normjax.layer_norm import group_norm, instance_norm, layer_norm, rms_norm

__version__ = "0.1.0"

# The Flax modules and diagnostics import the core above, so they come last.
from normjax import diagnostics, linen, nnx  # noqa: E402

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_state",
    "batch_renorm",
    "diagnostics",
    "fold_batch_norm",
    "group_norm",
    "initializers",
    "instance_norm",
    "layer_norm",
    "linen",
    "nnx",
    "rms_norm",
]
