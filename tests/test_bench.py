"""The benchmark scripts run end to end on tiny inputs the tests write (they print timings;
nothing here is timed): a 2-layer BERT 32 wide with MiniLM's vocabulary stands in for MiniLM,
the shipped NSMC sample for ../shared's corpora."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE

# test_bench_script_runs' cases: the script and its flags ({model}, {data}, {checkpoint} and
# {held_out} are the files below); each runs the script's whole path on a few texts
CASES = {
    "train_speed.py": "--model {model} --data_dir {data} --workloads nsmc --variants ours,notebook "
    "--nsmc_samples 48 --max_len 32 --batch_size 16",
    "predict_speed.py": "--model {model} --nsmc_dir {data}/nsmc --texts 8 --repeats 1",
    "step_ablation.py": "--model {model} --nsmc_dir {data}/nsmc --steps 1 --rounds 1 "
    "--batch_size 4 --max_len 32",
    "skewed_classes.py": "--data_dir {data}/nsmc --ratio 2 --train_majority 32 "
    "--test_majority 16 --epochs 1",
    "serve_speed.py": "--model_dir {checkpoint} --clients 1 --requests 3 --seconds 2",
    "deploy_speed.py": '--set {checkpoint},{held_out} --ways "PyTorch float32" --clients 1 '
    "--seconds 1 --repeats 1",
    "pretrain_pilots.py": "--arms mlm --pilot 48 --test 24 --epochs 1 --nsmc_dir {data}/nsmc",
}
GPU_SPEED = "--shape tiny --samples 32 --max_lens 32 --imdb_texts 16"  # its own test, below


@pytest.fixture(scope="module")
def files(minilm, tiny_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("bench")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data").mkdir()
    os.symlink(SAMPLE, root / "data" / "nsmc")  # train_speed.py reads <data>/nsmc
    with open(os.path.join(SAMPLE, "ratings_test.txt"), encoding="utf-8") as f:
        (root / "held_out.txt").write_text("".join(f.readlines()[:41]), encoding="utf-8")
    return {
        "model": root / "model",
        "data": root / "data",
        "checkpoint": tiny_checkpoint[0],
        "held_out": root / "held_out.txt",
    }


@pytest.mark.parametrize("script", [*CASES, "tfidf_baseline.py"])
def test_bench_script_runs(script, files):
    if script == "tfidf_baseline.py":
        pytest.importorskip("sklearn", reason="tfidf_baseline.py needs pip install scikit-learn")
        flags = f"--data_dir {SAMPLE}"
    else:
        flags = CASES[script].format(**files)
    result = subprocess.run(
        f"{sys.executable} {os.path.join(ROOT, 'bench', script)} {flags}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # every script ends with its table: at least one row with a number in it
    assert any(any(c.isdigit() for c in line) for line in result.stdout.splitlines()), result.stdout


def test_gpu_speed_runs_both_arms_on_a_cpu_with_a_tiny_shape():
    """The GPU benchmark as prepared for a lent GPU, on a toy shape: every arm prints a row."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_speed.py"), *GPU_SPEED.split()],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("max_len")]
    assert [row[-5] for row in rows] == ["ours", "grouped", "ours"]  # arm, samples/s, ..., MiB
    assert all(float(row[-4]) > 0 and float(row[-1]) > 0 for row in rows)


def test_training_flops_counts_real_tokens():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_speed import training_flops

    # 6 FLOPs per parameter and token, plus 12 * layers * hidden * length per token for attention
    assert training_flops([10], 1000, 2, 4) == 6 * 1000 * 10 + 12 * 2 * 4 * 10 * 10
    assert training_flops([3, 5], 100, 1, 8) == training_flops([3], 100, 1, 8) + training_flops(
        [5], 100, 1, 8
    )
