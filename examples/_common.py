"""Shared utilities for the normjax examples: data, batching, output files, tables, timing.

Every example script imports this module as ``import _common`` (Python puts the
script's own folder on ``sys.path`` when it runs ``python examples/<name>.py``).
A test that imports an example puts ``examples/`` on ``sys.path`` first, e.g.
``monkeypatch.syspath_prepend(EXAMPLES_DIR)``, then ``importlib.import_module(name)``.

The functions here are a stable interface for every example; keep them small.

- `load_digits_split`: scikit-learn's bundled 8x8 digits (nothing downloads), a
  stratified train/test split fixed by a seed, standardized with train statistics.
- `standardize`: per-feature standardization fitted on the training set only.
- `iterate_batches`: an endless iterator of shuffled mini-batches, epoch by epoch.
- `make_output_dir`, `write_json`, `write_csv`: the output folder and its files.
- `format_table`, `print_table`: a plain-text table of result rows.
- `plot_curves`: one PNG with a line per run (matplotlib, no global backend change).
- `median_step_ms`: the median wall time of repeated calls of a jit-compiled step.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = [
    "DigitsSplit",
    "format_table",
    "iterate_batches",
    "load_digits_split",
    "make_output_dir",
    "median_step_ms",
    "plot_curves",
    "print_table",
    "standardize",
    "write_csv",
    "write_json",
]

NUM_DIGIT_CLASSES = 10


class DigitsSplit(NamedTuple):
    """A train/test split of the digits data.

    Images are float32, either flat ``(n, 64)`` or ``(n, 8, 8, 1)`` (channels
    last, as Flax's ``Conv`` expects); labels are int32 in ``0..9``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardizes each feature with the training set's mean and standard deviation.

    Features constant on the training set (the digits' border pixels are always
    0) keep a divisor of 1 rather than 0, so they stay 0 instead of becoming NaN.

    Args:
      x_train: training features, ``(n_train, ...)``.
      x_test: test features with the same trailing shape.

    Returns:
      ``(x_train, x_test)`` standardized, as float32.
    """
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
    )


def load_digits_split(
    *, test_size: float = 0.2, seed: int = 0, image_shape: bool = False
) -> DigitsSplit:
    """Loads scikit-learn's bundled digits with a seeded, stratified train/test split.

    Args:
      test_size: fraction of the 1797 images held out for testing.
      seed: the split's random state; the same seed gives the same split.
      image_shape: if True the images come as ``(n, 8, 8, 1)``, else flat ``(n, 64)``.

    Returns:
      A `DigitsSplit`, standardized with the training set's statistics.

    Raises:
      ValueError: if ``test_size`` is not strictly between 0 and 1.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be strictly between 0 and 1, got {test_size!r}")
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=test_size,
        random_state=seed,
        stratify=digits.target,
    )
    x_train, x_test = standardize(x_train, x_test)
    if image_shape:
        x_train = x_train.reshape(-1, 8, 8, 1)
        x_test = x_test.reshape(-1, 8, 8, 1)
    return DigitsSplit(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32))


def iterate_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields shuffled ``(x, y)`` mini-batches forever, reshuffling every epoch.

    Each epoch is a fresh permutation; the last incomplete batch of an epoch is
    dropped so every batch has the same shape and the jit-compiled step compiles once.

    Args:
      x: features, ``(n, ...)``.
      y: labels, ``(n,)``.
      batch_size: examples per batch, at most ``n``.
      seed: seed of the shuffling; the same seed gives the same batches.

    Yields:
      ``(x_batch, y_batch)`` with leading dimension ``batch_size``.

    Raises:
      ValueError: if ``batch_size`` is not in ``1..n`` or x and y differ in length.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the data size), got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


def make_output_dir(path: str | Path) -> Path:
    """Creates the output folder (and its parents) if needed and returns it as a Path."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _to_builtin(value: Any) -> Any:
    """Turns numpy/jax scalars and arrays into JSON-serializable Python objects."""
    if isinstance(value, Mapping):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_builtin(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _to_builtin(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/Infinity; null keeps the file readable by every parser.
        return None
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON (numpy/jax values converted; NaN/inf -> null)."""
    path = Path(path)
    path.write_text(json.dumps(_to_builtin(obj), indent=2) + "\n")
    return path


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes result rows as CSV; the header is the union of keys in first-seen order."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _to_builtin(v) for k, v in row.items()})
    return path


def _format_cell(value: Any, float_format: str) -> str:
    if isinstance(value, float | np.floating):
        return format(float(value), float_format)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_format: str = ".4g",
) -> str:
    """Formats result rows as a plain-text (Markdown-compatible) table.

    Args:
      rows: one mapping per row, column name to value.
      columns: the columns to show, in order; default all keys in first-seen order.
      float_format: the format spec applied to float cells.

    Returns:
      The table as a string, a header line, a separator line, then one line per row.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[_format_cell(row.get(c, ""), float_format) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_format: str = ".4g",
) -> None:
    """Prints `format_table` of the rows."""
    print(format_table(rows, columns, float_format=float_format))


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Plots one line per run into a PNG file.

    matplotlib is imported here and drawn through ``matplotlib.figure.Figure``
    (the Agg renderer), so no global pyplot backend is changed.

    Args:
      curves: run name to ``(xs, ys)``.
      path: the PNG file to write.
      xlabel: the x axis label.
      ylabel: the y axis label.
      title: an optional title.
      log_y: a logarithmic y axis.

    Returns:
      ``path`` as a Path.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        # Ten colors, then the same colors dashed, so more than ten runs stay distinct.
        color, style = f"C{i % 10}", ("-", "--", ":")[(i // 10) % 3]
        ax.plot(xs, ys, color=color, linestyle=style, label=name, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def median_step_ms(
    step: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2
) -> float:
    """Measures the median wall time of ``step(*args)`` in milliseconds.

    The step is called ``warmup`` times first (compilation, caches), then
    ``repeats`` times, each timed until its outputs are ready
    (``jax.block_until_ready``), so the time covers the computation and not just
    the asynchronous dispatch. The median resists the outliers a shared machine causes.

    Args:
      step: a (jit-compiled) function; its result is discarded.
      *args: its arguments, reused on every call.
      repeats: number of timed calls, at least 1.
      warmup: number of untimed calls before timing.

    Returns:
      The median time of one call, in milliseconds.

    Raises:
      ValueError: if ``repeats`` is less than 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
