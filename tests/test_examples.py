"""Smoke tests of the examples cnn_batchnorm, small_batch, rnn_layernorm and data_parallel.

Each example's ``main`` runs with tiny flags into a temporary folder; the tests
check the files it writes and the claims it measures against independent
references (numpy for the generated data, single-device training for the
data-parallel run, the unfolded network for batch norm folding).
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _import_example(name: str) -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        return importlib.import_module(name)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_cnn_batchnorm_checkpoints_resumes_and_folds(tmp_path):
    cnn = _import_example("cnn_batchnorm")
    tiny = [
        "--channels", "4", "4", "4",
        "--batch-size", "256",
        "--bench-batch", "8",
        "--timing-rounds", "1",
        "--timing-repeats", "1",
    ]  # fmt: skip
    first = cnn.main(["--epochs", "1", "--out", str(tmp_path), *tiny])
    assert [h["epoch"] for h in first["history"]] == [1]
    assert (tmp_path / "checkpoints" / "1").is_dir()

    resumed = cnn.main(["--epochs", "2", "--resume", "--out", str(tmp_path), *tiny])
    # Epoch 1 comes from the checkpoint, epoch 2 is new.
    assert resumed["history"][0] == first["history"][0]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert (tmp_path / "checkpoints" / "2").is_dir()

    fold = resumed["fold"]
    # Folding is exact algebra; only float32 rounding separates the two networks.
    assert fold["max_abs_logit_difference"] < 1e-4 * max(1.0, fold["max_abs_logit"])
    assert fold["same_predictions"] == 1.0
    assert fold["unfolded_ms"] > 0 and fold["folded_ms"] > 0
    assert _is_png(tmp_path / "training.png")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["history"] == resumed["history"]


def test_small_batch_table_and_batch_of_one_error(tmp_path):
    small_batch = _import_example("small_batch")
    rows = small_batch.main(
        ["--norms", "layer", "--batch-sizes", "16", "--epochs", "1", "--seeds", "0", "1",
         "--out", str(tmp_path)]  # fmt: skip
    )
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in rows] == [
        ("LayerNorm", 16, 0),
        ("LayerNorm", 16, 1),
    ]
    # The two seeds train side by side under vmap but from different initializations.
    assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]
    for row in rows:
        # One epoch of SGD on digits: far above chance (10%).
        assert row["test_accuracy"] > 0.5, row
        # 1797 digits, 360 held out: 1437 training images, the last incomplete batch dropped.
        assert row["steps"] == 1437 // row["batch_size"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["batch_of_one"].startswith("ValueError")
    assert "one value per feature" in written["batch_of_one"]
    expected_mean = np.mean([r["test_accuracy"] for r in rows])
    assert written["test_accuracy"]["LayerNorm"]["16"] == pytest.approx(expected_mean)
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert _is_png(tmp_path / "accuracy_vs_batch.png")


def test_small_batch_rejects_batch_of_one_on_the_command_line(tmp_path, capsys):
    small_batch = _import_example("small_batch")
    with pytest.raises(SystemExit):
        small_batch.main(["--batch-sizes", "1", "--out", str(tmp_path)])
    assert "at least 2 for --norms batch renorm" in capsys.readouterr().err
    # Group and layer norm do not depend on the batch: a batch of 1 is theirs to show.
    args = small_batch.parse_args(["--norms", "group", "layer", "--batch-sizes", "1", "8"])
    assert args.batch_sizes == [1, 8]


def test_adding_problem_matches_its_definition():
    rnn = _import_example("rnn_layernorm")
    seq_len = 12
    x, y = rnn.adding_problem(jax.random.key(3), 50, seq_len)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == (50, seq_len, 2) and y.shape == (50,)
    values, markers = x[..., 0], x[..., 1]
    assert np.all((values >= 0) & (values < 1))
    # Exactly one marker in each half of every sequence.
    np.testing.assert_array_equal(markers[:, : seq_len // 2].sum(1), 1)
    np.testing.assert_array_equal(markers[:, seq_len // 2 :].sum(1), 1)
    assert set(np.unique(markers)) == {0.0, 1.0}
    np.testing.assert_allclose(y, (values * markers).sum(1), rtol=1e-6)


def test_rnn_layernorm_runs_every_cell(tmp_path):
    rnn = _import_example("rnn_layernorm")
    rows = rnn.main(
        [
            "--cells", "rnn,lstm",
            "--configs", "ln_clip",
            "--seq-len", "8",
            "--hidden", "8",
            "--steps", "6",
            "--eval-every", "3",
            "--test-size", "16",
            "--timing-repeats", "1",
            "--seed", "4",
            "--num-seeds", "3",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert [(r["cell"], r["config"]) for r in rows] == [("rnn", "LN, clip"), ("lstm", "LN, clip")]
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written["seed_rows"]) == 6
    for row in rows:
        assert row["seeds"] == [4, 5, 6]
        runs = written["runs"][f"{row['cell']}/ln_clip"]
        assert [run["seed"] for run in runs] == [4, 5, 6]
        seed_rows = [r for r in written["seed_rows"] if r["cell"] == row["cell"]]
        # The row is the median over the seeds of each run's statistics.
        for seed_row, run in zip(seed_rows, runs, strict=True):
            norms = np.array(run["grad_norms"], dtype=float)
            assert norms.shape == (6,) and np.all(np.isfinite(norms)) and np.all(norms > 0)
            assert seed_row["grad_norm_max"] == pytest.approx(norms.max())
            # 1.0 is the default --clip-norm.
            assert seed_row["steps_above_clip"] == int(np.sum(norms > 1.0))
            assert run["eval_steps"] == [3, 6]
            assert 0.0 <= seed_row["test_accuracy"] <= 1.0
        mses = [r["test_mse"] for r in seed_rows]
        assert row["test_mse"] == pytest.approx(np.median(mses))
        assert (row["test_mse_min"], row["test_mse_max"]) == (min(mses), max(mses))
        max_norms = [r["grad_norm_max"] for r in seed_rows]
        assert row["grad_norm_max"] == pytest.approx(np.median(max_norms))
        assert row["median_seed"] == seed_rows[int(np.argsort(mses)[1])]["seed"]
    # Different seeds train differently.
    assert len({r["test_mse"] for r in written["seed_rows"]}) == 6
    assert _is_png(tmp_path / "rnn_layernorm.png")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; tests/conftest.py")
@pytest.mark.parametrize(
    ("example", "flag"),
    [
        ("cnn_batchnorm", "--learning-rate"),
        ("data_parallel", "--learning-rate"),
        ("rnn_layernorm", "--learning-rate"),
        ("vanishing_gradients", "--learning-rate"),
        ("vanishing_gradients", "--lr"),  # its earlier name
    ],
)
def test_examples_share_the_learning_rate_flag(example, flag):
    args = _import_example(example).parse_args([flag, "0.125"])
    assert (args.lr if example == "vanishing_gradients" else args.learning_rate) == 0.125


def test_rnn_layernorm_counts_seeds_with_num_seeds(capsys):
    rnn = _import_example("rnn_layernorm")
    assert rnn.parse_args(["--num-seeds", "2"]).seeds == 2
    assert rnn.parse_args(["--seeds", "2"]).seeds == 2  # its earlier name
    with pytest.raises(SystemExit):
        rnn.parse_args(["--num-seeds", "0"])
    assert "--num-seeds must be at least 1, got 0" in capsys.readouterr().err


def test_data_parallel_matches_single_device(tmp_path):
    data_parallel = _import_example("data_parallel")
    rows = data_parallel.main(
        ["--steps", "3", "--batch-size", "64", "--hidden", "16", "--out", str(tmp_path)]
    )
    reference, synced, unsynced = rows
    assert reference["max_abs_diff_params"] == 0.0
    # Synchronized batch norm computes the whole batch's statistics: equal up to rounding.
    for key in ("max_abs_diff_params", "max_abs_diff_batch_mean", "max_abs_diff_batch_var"):
        assert synced[key] < 1e-5, (key, synced[key])
    # Per-device statistics are those of 8 images, not 64: the run measurably differs.
    assert unsynced["max_abs_diff_batch_var"] > 1e-3
    assert {r["count"] for r in rows} == {"3"}
    assert _is_png(tmp_path / "max_abs_difference.png")
