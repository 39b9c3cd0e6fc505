"""The benchmark scripts run on tiny inputs (they print timings; nothing here is timed)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize(
    "script",
    [
        "train_speed.py",
        "predict_speed.py",
        "step_ablation.py",
        "skewed_classes.py",
        "serve_speed.py",
        "deploy_speed.py",
        "tfidf_baseline.py",
        "pretrain_pilots.py",
        "gpu_speed.py",
    ],
)
def test_bench_script_runs(script):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_training_flops_counts_real_tokens():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_speed import training_flops

    # 6 FLOPs per parameter and token, plus 12 * layers * hidden * length per token for attention
    assert training_flops([10], 1000, 2, 4) == 6 * 1000 * 10 + 12 * 2 * 4 * 10 * 10
    assert training_flops([3, 5], 100, 1, 8) == training_flops([3], 100, 1, 8) + training_flops(
        [5], 100, 1, 8
    )


def test_gpu_speed_runs_both_arms_on_a_cpu_with_a_tiny_shape():
    """The GPU benchmark as prepared for a lent GPU, on a toy shape: every arm prints a row."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_speed.py"),
            "--shape",
            "tiny",
            "--samples",
            "32",
            "--max_lens",
            "32",
            "--imdb_texts",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("max_len")]
    assert [row[-5] for row in rows] == ["ours", "grouped", "ours"]  # arm, samples/s, ..., MiB
    assert all(float(row[-4]) > 0 and float(row[-1]) > 0 for row in rows)
