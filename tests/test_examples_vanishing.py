"""Smoke test of examples/vanishing_gradients.py with tiny flags."""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vanishing_gradients():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        yield importlib.import_module("vanishing_gradients")


@pytest.fixture(scope="module")
def tiny_run(vanishing_gradients, tmp_path_factory):
    out = tmp_path_factory.mktemp("vanishing")
    summary = vanishing_gradients.main(
        [
            "--depth", "5",
            "--width", "16",
            "--steps", "4",
            "--eval-every", "2",
            "--batch-size", "32",
            "--out", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    return out, summary


def test_writes_every_output_and_a_row_per_config(vanishing_gradients, tiny_run):
    out, summary = tiny_run
    all_configs = list(vanishing_gradients.CONFIGS)
    assert list(summary["results"]) == all_configs

    for name in ("gradient_norms.png", "test_accuracy.png", "train_loss.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    written = json.loads((out / "results.json").read_text())
    assert list(written["results"]) == all_configs
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == [c.label for c in vanishing_gradients.CONFIGS.values()]
    assert list(rows[0]) == list(vanishing_gradients.TABLE_COLUMNS)

    for key, result in summary["results"].items():
        # Dense_0 .. Dense_5: five hidden layers and the output layer, in order.
        assert list(result["grad_norms_at_init"]) == [f"Dense_{i}" for i in range(6)], key
        assert result["accuracy_steps"] == [0, 2, 4], key
        assert 0.0 <= result["test_accuracy"] <= 1.0, key
        assert result["ms_per_step"] > 0.0, key


def test_sigmoid_with_naive_init_vanishes_and_relu_with_he_does_not(tiny_run):
    """Deterministic: gradients at initialization (the first, seeded mini-batch) only.

    With sigmoid and N(0, 0.01^2) weights each layer multiplies the backward
    signal by about sigmoid'(0) * 0.01 * sqrt(width) = 0.25 * 0.01 * 4 = 0.01
    (width 16), so across 5 hidden layers the first layer's gradient is many
    orders of magnitude below the output layer's. He's initialization keeps
    the backward variance constant (He et al. 2015, eq. 14).
    """
    _, summary = tiny_run
    naive = summary["results"]["sigmoid_naive"]
    he = summary["results"]["relu_he"]
    assert naive["ratio_first_last"] < 1e-3
    assert 0.1 < he["ratio_first_last"] < 10.0
    # Every hidden layer after the first sees the same input (sigmoid(~0) = 0.5), so
    # its kernel gradient tracks the backward signal, which grows toward the output.
    norms = np.array(list(naive["grad_norms_at_init"].values()))
    assert np.all(np.diff(np.log(norms[1:])) > 0)
    assert all(math.isfinite(r["ratio_first_last"]) for r in summary["results"].values())


def test_rejects_an_unknown_config(vanishing_gradients, tmp_path):
    with pytest.raises(SystemExit):
        vanishing_gradients.main(["--configs", "relu_he,nope", "--out", str(tmp_path)])
