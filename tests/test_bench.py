"""The benchmark scripts import and parse their flags (they print timings; nothing here is timed)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("script", ["train_speed.py", "predict_speed.py", "step_ablation.py", "skewed_classes.py",
                                    "serve_speed.py", "deploy_speed.py", "tfidf_baseline.py",
                                    "pretrain_pilots.py"])
def test_bench_script_runs(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_training_flops_counts_real_tokens():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_speed import training_flops

    # 6 FLOPs per parameter and token, plus 12 * layers * hidden * length per token for attention
    assert training_flops([10], 1000, 2, 4) == 6 * 1000 * 10 + 12 * 2 * 4 * 10 * 10
    assert training_flops([3, 5], 100, 1, 8) == training_flops([3], 100, 1, 8) + training_flops([5], 100, 1, 8)
