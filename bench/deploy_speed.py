"""The deployment table: float32 and int8, PyTorch and ONNX Runtime, side by side in one run.

    python3 export.py --model_dir CKPT --file HELD_OUT --onnx    # first, once per checkpoint
    python3 bench/deploy_speed.py --set CKPT,HELD_OUT [--set CKPT2,HELD_OUT2]

Per checkpoint and way of running (predict.py's flags): accuracy on the held-out file, texts per
second over it (one process, after a warm-up, predict.py's batches), the cold start of
`python predict.py "문장"` (a fresh process to its answer, median of --repeats), and the server
(`predict.py --serve`, bench/serve_speed.py's load generator: requests/s, p50 and p99 latency
for each number of concurrent clients, one distinct sentence per request).
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import label_ids, stream_texts  # noqa: E402
from common import ModelError  # noqa: E402
from inference import cpu_kind, cpu_name  # noqa: E402
from metrics import score_logits  # noqa: E402
from predict import Predictor  # noqa: E402
from serve_speed import ask, load, start_server  # noqa: E402

WAYS = {
    "PyTorch float32": [],
    "PyTorch int8": ["--quantize", "int8"],
    "ONNX Runtime float32": ["--onnx"],
    "ONNX Runtime int8": ["--onnx", "--quantize", "int8"],
}
SENTENCE = "이 영화 정말 재밌다"


def throughput(folder, file, flags):
    """(accuracy, texts/s) of predict.py's Predictor with flags over the labelled file."""
    predictor = Predictor(
        folder, "cpu", quantize="int8" if "int8" in flags else None, onnx="--onnx" in flags
    )
    examples = list(stream_texts(file))
    texts = [text for text, _ in examples]
    predictor.logits(texts[:256])  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    logits = predictor.logits(texts)
    seconds = time.perf_counter() - start
    labels = np.asarray(label_ids(examples, predictor.info["labels"], file))
    return score_logits(logits, labels, predictor.names)["accuracy"], len(texts) / seconds


def cold_start(folder, flags, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "predict.py", "--model_dir", folder, *flags, SENTENCE],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def serving(folder, flags, clients, seconds):
    proc, url = start_server(ROOT, folder, flags)
    try:
        for i in range(5):
            ask(url, f"warm-up {i}")
        return {n: load(url, n, 10_000, seconds, "".join(flags)) for n in clients}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--set",
        action="append",
        required=True,
        metavar="CKPT,FILE",
        help="a checkpoint exported by export.py --onnx and its held-out file",
    )
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated rows of the table")
    p.add_argument("--clients", default="1,32", help="server concurrency levels")
    p.add_argument("--seconds", type=float, default=10, help="time of each server level")
    p.add_argument("--repeats", type=int, default=3, help="cold starts per way")
    args = p.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    header = f"{'checkpoint':<14}{'way':<22}{'accuracy':>9}{'texts/s':>9}{'cold s':>8}" + "".join(
        f"{f'{n} cl. req/s':>13}{'p50':>7}{'p99':>7}" for n in clients
    )
    rows = []
    for spec in args.set:
        folder, file = spec.split(",")
        for way in args.ways.split(","):
            flags = WAYS[way]
            try:
                accuracy, speed = throughput(folder, file, flags)
            except ModelError as e:  # int8 export.py refused (slower or less accurate here)
                rows.append(f"{os.path.basename(folder.rstrip('/'))[:13]:<14}{way:<22}{e}")
                continue
            cold = cold_start(folder, flags, args.repeats)
            served = serving(folder, flags, clients, args.seconds)
            rows.append(
                f"{os.path.basename(folder.rstrip('/'))[:13]:<14}{way:<22}{accuracy:>9.4f}"
                f"{speed:>9.0f}{cold:>8.2f}"
                + "".join(
                    f"{rps:>13.1f}{p50:>7.0f}{p99:>7.0f}" for rps, p50, p99, _ in served.values()
                )
            )
            print(rows[-1], file=sys.stderr, flush=True)
    # int8's speed depends on the CPU's int8 units: every table names the CPU it was measured on
    print(f"CPU: {cpu_name(cpu_kind())}, {torch.get_num_threads()} threads")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
