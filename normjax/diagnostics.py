"""Diagnostics for vanishing and exploding gradients: per-layer norms, activation statistics.

- `gradient_norms`: the L2 norm of every leaf of a gradient pytree, keyed by its
  path (``"Dense_0/kernel"``), in layer order.
- `activation_stats`: per-layer mean, standard deviation and fraction of saturated
  (sigmoid, tanh) or zero (ReLU) outputs of a Flax linen model, over every
  example and unit, via Flax's ``capture_intermediates``.
- `plot_gradient_norms`: per-layer gradient norms of several runs in one PNG
  (log scale); needs matplotlib, from the ``examples`` extra.

References:
  Glorot & Bengio, "Understanding the difficulty of training deep feedforward
  neural networks", AISTATS 2010 (per-layer activation and gradient statistics).
  He et al., "Delving Deep into Rectifiers", ICCV 2015.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from normjax import _stats

__all__ = [
    "DEFAULT_SATURATION_THRESHOLD",
    "ActivationStats",
    "activation_stats",
    "gradient_norms",
    "plot_gradient_norms",
]

# A sigmoid output within 0.01 of 0 or 1 has a derivative below 0.0099, about 4%
# of its maximum 0.25: its unit passes almost no gradient back.
DEFAULT_SATURATION_THRESHOLD = 0.01

_EXAMPLES_EXTRA_HINT = 'pip install "normjax[examples]"'

# Flax's collection names: a leading one is not part of a layer's name.
_COLLECTION_NAMES = frozenset({"params", "batch_stats", "intermediates"})


def _key_name(key: Any) -> str:
    """The name of one path entry of `jax.tree_util.tree_flatten_with_path`."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_names(path: tuple[Any, ...]) -> list[str]:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        # A flax.nnx Variable flattens to its `.value`; the variable's own path names it.
        path = path[:-1]
    return [_key_name(k) for k in path]


def _without_collection(names: list[str]) -> list[str]:
    return names[1:] if names and names[0] in _COLLECTION_NAMES else names


def _natural_key(names: list[str]) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    """Sorts path components with embedded numbers numerically (Dense_9 < Dense_10)."""
    key = []
    for name in names:
        parts = re.split(r"(\d+)", name)
        # (0, number) sorts before (1, text) so the tuple never compares int with str.
        key.append(tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p))
    return tuple(key)


def gradient_norms(grads: Any) -> dict[str, float]:
    """Computes the L2 (Frobenius) norm of every array in a gradient pytree.

    Keys are the leaves' paths joined by ``/``, without a leading Flax collection
    name (unless two leaves would then share a key, which keep theirs):
    ``{"params": {"Dense_0": {"kernel": g}}}`` gives ``"Dense_0/kernel"``; a
    ``flax.nnx`` gradient State gives ``"layers/0/kernel"`` (no trailing ``value``).
    Entries come in layer order: path components are compared with their numbers
    read as numbers, so ``Dense_10`` follows ``Dense_9``. (``jax.grad`` returns dicts
    with sorted keys, so a model's call order across *different* layer types, e.g.
    ``Dense_1`` then ``BatchNorm_1``, cannot be recovered from the gradients; layers
    of one type, or layers named ``block_<i>``, come out in call order.)

    Norms are accumulated in float64 on the host (complex128 for complex
    leaves, whose norm counts the imaginary parts), so gradients as small as
    1e-30 (deep sigmoid networks reach that) do not underflow to 0 as float32
    squares would.
    Leaves of dtype ``float0``, the gradients of integer leaves under
    ``jax.grad(..., allow_int=True)`` (normjax's ``batch_stats/count``), are left out.

    Args:
      grads: a pytree of arrays, e.g. the output of ``jax.grad`` for Flax params.

    Returns:
      A dict from path to norm (a Python float), in layer order.

    Raises:
      TypeError: if a leaf of ``grads`` is not numeric (a PRNG key included).
      ValueError: if two leaves' paths join to the same key (``{"a/b": g,
        "a": {"b": h}}``).

    References:
      Glorot & Bengio, AISTATS 2010, Section 4.2 (back-propagated gradients per layer).
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    entries = []
    for path, leaf in leaves_with_paths:
        names = _path_names(path)
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            # numpy cannot convert a typed key; its own error named no path.
            raise TypeError(
                f"gradient_norms: every leaf of `grads` must be a numeric array; the leaf at "
                f"{'/'.join(names)!r} is a PRNG key ({leaf.dtype}). Pass the gradients, or "
                f"nnx.state(model, nnx.Param), not a state holding Rngs."
            )
        value = np.asarray(leaf)
        if value.dtype == jax.dtypes.float0:
            # The gradient of an integer leaf (allow_int=True), such as
            # normjax's batch_stats/count: it has no gradient to measure.
            continue
        # jnp.issubdtype knows bfloat16 and the other ml_dtypes as floating;
        # numpy's own issubdtype does not.
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == np.bool_):
            raise TypeError(
                f"gradient_norms: every leaf of `grads` must be a numeric array; the leaf at "
                f"{'/'.join(names)!r} has dtype {value.dtype} ({type(leaf).__name__})"
            )
        wide = np.complex128 if jnp.issubdtype(value.dtype, jnp.complexfloating) else np.float64
        norm = float(np.linalg.norm(value.astype(wide).ravel()))
        entries.append((names, norm))
    # The collection name is dropped only where no two leaves would then share
    # a key (a "kernel" under both "params" and another collection keeps it).
    short = [tuple(_without_collection(names)) for names, _ in entries]
    clash = {key for key in short if short.count(key) > 1}
    entries = [(list(key) if key not in clash else names, norm)
               for key, (names, norm) in zip(short, entries, strict=True)]  # fmt: skip
    keys = ["/".join(names) for names, _ in entries]
    shared = sorted({key for key in keys if keys.count(key) > 1})
    if shared:
        # {"a/b": g, "a": {"b": h}}: a dict could keep only one of them.
        raise ValueError(
            f"gradient_norms: leaves at different paths of `grads` join to the same key "
            f"{shared[0]!r}; rename the keys that contain '/'."
        )
    entries.sort(key=lambda entry: _natural_key(entry[0]))
    return {"/".join(names): norm for names, norm in entries}


class ActivationStats(NamedTuple):
    """Statistics of one layer's activations over a batch.

    Attributes:
      mean: the mean over every element (all examples and units).
      std: the standard deviation over every element.
      saturated_fraction: the fraction of elements (example and unit pairs) that
        are saturated (sigmoid, tanh) or zero, passing no gradient (ReLU: about
        0.5 in a healthy layer, more where units are dead); NaN when no rule is
        known for the activation.
    """

    mean: float
    std: float
    saturated_fraction: float


def _sigmoid_saturated(y: jax.Array, threshold: float) -> jax.Array:
    return (y <= threshold) | (y >= 1.0 - threshold)


def _tanh_saturated(y: jax.Array, threshold: float) -> jax.Array:
    return jnp.abs(y) >= 1.0 - threshold


def _relu_dead(y: jax.Array, threshold: float) -> jax.Array:
    del threshold  # A dead ReLU unit outputs exactly 0 and passes no gradient.
    return y == 0


_SATURATION_RULES: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    "sigmoid": _sigmoid_saturated,
    "tanh": _tanh_saturated,
    "relu": _relu_dead,
}


def _resolve_activation(
    activation: str | Callable[[jax.Array], jax.Array],
) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array, float], jax.Array] | None]:
    if callable(activation):
        rule = next(
            (r for n, r in _SATURATION_RULES.items() if getattr(jax.nn, n) is activation), None
        )
        return activation, rule
    if isinstance(activation, str):
        function = getattr(jax.nn, activation, None)
        if function is None or not callable(function):
            raise ValueError(
                f"activation_stats: `activation` must be the name of a jax.nn activation "
                f"(e.g. 'sigmoid', 'tanh', 'relu', 'gelu') or a callable, got {activation!r}"
            )
        return function, _SATURATION_RULES.get(activation)
    raise TypeError(
        f"activation_stats: `activation` must be a str or a callable, "
        f"got {type(activation).__name__}"
    )


def _capture_filter(
    layers: type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module, str], bool],
) -> Callable[[nn.Module, str], bool]:
    if isinstance(layers, type) or (
        isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)
    ):
        return lambda module, method_name: isinstance(module, layers) and method_name == "__call__"
    if callable(layers):
        return layers
    raise TypeError(
        f"activation_stats: `layers` must be a Module class, a tuple of Module classes or a "
        f"callable (module, method_name) -> bool, got {layers!r}"
    )


def activation_stats(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: Any,
    *,
    activation: str | Callable[[jax.Array], jax.Array],
    layers: type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Callable[[nn.Module, str], bool] = nn.Dense,
    saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
    **apply_kwargs: Any,
) -> dict[str, ActivationStats]:
    """Computes per-layer activation statistics of a Flax linen model on a batch.

    Activations such as ``nn.relu(x)`` called inside ``__call__`` are plain functions,
    which Flax's ``capture_intermediates`` cannot see. So this captures the output of
    each *pre-activation layer* (by default every ``nn.Dense``; pass e.g.
    ``layers=normjax.linen.BatchNorm`` for Dense -> BatchNorm -> activation blocks)
    and applies ``activation`` to it in that output's dtype, as the model does.
    (The captured output is rounded to its dtype where XLA may have fused the
    layer and the activation: a bfloat16 model's statistics agree with its own
    output's to bfloat16's resolution.) Layers whose output is a tuple raise a
    ValueError.
    Leave the output layer out of ``layers`` (e.g. with a callable filter on
    ``module.name``), or ignore its entry: its output is not activated.

    Saturation rules (``t = saturation_threshold``): sigmoid ``y <= t`` or
    ``y >= 1 - t``; tanh ``|y| >= 1 - t``; relu ``y == 0`` exactly (dead). For
    other activations ``saturated_fraction`` is NaN.

    Args:
      module: the Flax linen model.
      variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}``.
      x: the input batch, passed to ``module.apply``.
      activation: the activation the model applies after each captured layer: a
        ``jax.nn`` name (``"sigmoid"``, ``"tanh"``, ``"relu"``, ...) or a callable.
      layers: which layers' outputs to capture: a Module class, a tuple of them, or
        a ``(module, method_name) -> bool`` filter as Flax's ``capture_intermediates``.
      saturation_threshold: the ``t`` of the saturation rules above, in ``(0, 0.5)``.
      **apply_kwargs: passed to ``module.apply`` (e.g. ``train=False``,
        ``mutable=["batch_stats"]``).

    Returns:
      A dict from layer path (``"Dense_0"``, ``"Block_1/Dense_0"``) to
      `ActivationStats`, in layer order (numbers compared as numbers). A layer
      called several times is reported once, over all its calls.

    Raises:
      ValueError: if ``activation`` names no ``jax.nn`` function, the threshold is
        out of range, or no layer was captured.
      TypeError: if ``activation`` or ``layers`` has the wrong type.

    References:
      Glorot & Bengio, AISTATS 2010, Section 3 (saturation of sigmoid and tanh units).
      Glorot, Bordes & Bengio, "Deep Sparse Rectifier Neural Networks", AISTATS 2011.
    """
    function, rule = _resolve_activation(activation)
    if not 0.0 < saturation_threshold < 0.5:
        raise ValueError(
            f"activation_stats: `saturation_threshold` must be in (0, 0.5), "
            f"got {saturation_threshold!r}"
        )
    mutable = apply_kwargs.pop("mutable", False)
    if mutable is not True:
        if isinstance(mutable, str):
            mutable = [mutable]
        mutable = [*(mutable or []), "intermediates"]
    wanted = _capture_filter(layers)
    # The (module path, method) of every call captured, so that what the model
    # sows into "intermediates" itself is not taken for a layer's output.
    captured_calls: set[tuple[str, ...]] = set()

    def capture(mdl: nn.Module, method_name: str) -> bool:
        if not wanted(mdl, method_name):
            return False
        captured_calls.add((*(str(name) for name in mdl.scope.path), method_name))
        return True

    # One compiled program for the forward pass and every statistic: applying a
    # deep model op by op (eagerly) costs far more in dispatch than it computes.
    @jax.jit
    def compute(variables: Any, x: Any) -> dict[tuple[str, ...], jax.Array]:
        _, state = module.apply(
            variables, x, capture_intermediates=capture, mutable=mutable, **apply_kwargs
        )
        captured: dict[tuple[str, ...], list[jax.Array]] = {}
        intermediates = state.get("intermediates", {})
        for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
            # Flax stores each call's output under <module path>/<method>/<call index>.
            names = tuple(_without_collection(_path_names(path)))
            if names[:-1] in captured_calls:
                captured.setdefault(names[:-2], []).append(jnp.ravel(leaf))
            elif any(names[: len(call)] == call for call in captured_calls):
                raise ValueError(
                    f"activation_stats: the layer at {'/'.join(names[:-3]) or '(top)'!r} returns "
                    f"a tuple or pytree, not one array; `layers` must select the layers whose "
                    f"output is the pre-activation"
                )
        stats = {}
        for layer, outputs in captured.items():
            # The activation in the layer's own dtype, as the model applies it;
            # the statistics in float32.
            y = function(jnp.concatenate(outputs)).astype(jnp.float32)
            saturated = (
                jnp.mean(rule(y, saturation_threshold)) if rule else jnp.array(jnp.nan, y.dtype)
            )
            # normjax's one statistics core: stable mean and variance.
            moments = _stats.moments(y, (0,), epsilon=1e-12)
            mean, var = moments.mean[0], moments.var[0]
            stats[layer] = jnp.stack([mean, jnp.sqrt(var), saturated])
        return stats

    stats = jax.device_get(compute(variables, x))
    if not stats:
        raise ValueError(
            f"activation_stats: `layers`={layers!r} matched no layer of {type(module).__name__}"
        )
    result = {}
    for layer in sorted(stats, key=lambda names: _natural_key(list(names))):
        name = "/".join(layer) or type(module).__name__
        result[name] = ActivationStats(*(float(v) for v in stats[layer]))
    return result


def plot_gradient_norms(
    runs: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Plots per-layer gradient norms of several runs as one PNG, log y axis.

    Layers go along the x axis in the order they first appear in the runs (pass
    `gradient_norms` outputs, which are in layer order); each run is one line.
    Norms that are 0 or not finite cannot be drawn on a log axis and leave a gap.
    matplotlib is drawn through ``matplotlib.figure.Figure`` (the Agg renderer),
    so no global pyplot backend is changed.

    Args:
      runs: run name to a mapping from layer name to gradient norm.
      path: the PNG file to write.
      title: an optional title.

    Returns:
      ``path`` as a Path.

    Raises:
      ImportError: if matplotlib is not installed (it comes with the
        ``examples`` extra: ``pip install "normjax[examples]"``).
      ValueError: if ``runs`` is empty.

    References:
      Glorot & Bengio, AISTATS 2010, Figure 7 (gradient norms across layers).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"plot_gradient_norms needs matplotlib, which comes with normjax's `examples` "
            f"extra: {_EXAMPLES_EXTRA_HINT}"
        ) from error
    if not runs:
        raise ValueError("plot_gradient_norms: `runs` must hold at least one run, got none")
    layer_names: list[str] = []
    for norms in runs.values():
        layer_names.extend(name for name in norms if name not in layer_names)
    positions = {name: i for i, name in enumerate(layer_names)}

    fig = Figure(figsize=(max(6.0, 0.45 * len(layer_names) + 3.0), 5.5), layout="constrained")
    ax = fig.subplots()
    for i, (run_name, norms) in enumerate(runs.items()):
        # Left to right, so that a run whose layers differ from the others' is
        # not drawn back across the axis.
        points = sorted((positions[name], value) for name, value in norms.items())
        xs = [x for x, _ in points]
        ys = [v if np.isfinite(v) and v > 0 else np.nan for _, v in points]
        # Ten colors, then the same colors dashed, so more than ten runs stay distinct.
        color, style = f"C{i % 10}", ("-", "--", ":")[(i // 10) % 3]
        ax.plot(xs, ys, color=color, linestyle=style, marker="o", markersize=3, label=run_name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layer_names)), layer_names, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient L2 norm")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
