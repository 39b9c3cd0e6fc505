"""Skewed classes: --class_weights none vs balanced on a 10:1 subset of NSMC, same seed and budget.

    python3 bench/skewed_classes.py                       # ../shared/data/nsmc, else the sample
    python3 bench/skewed_classes.py --ratio 20 --epochs 2

Both runs train `tiny` on the same seeded subset (negative reviews outnumber positive ones
`--ratio` to 1, in train and test alike) with the same flags but --class_weights, and keep the
last epoch (no selection). Printed: macro-F1, accuracy and the minority class's F1 on the test
subset, per run, and the macro-F1 difference.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import read_table  # noqa: E402

SHARED_NSMC = os.path.join(os.path.dirname(ROOT), "shared", "data", "nsmc")


def skewed(examples, n_majority, ratio, seed):
    """n_majority negative and n_majority // ratio positive reviews, seeded, shuffled."""
    rng = random.Random(seed)
    by_label = {y: [ex for ex in examples if ex[1] == y and ex[0].strip()] for y in ("0", "1")}
    chosen = rng.sample(by_label["0"], n_majority) + rng.sample(by_label["1"], n_majority // ratio)
    rng.shuffle(chosen)
    return chosen


def write_jsonl(path, examples):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in examples
        )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data_dir",
        default=(
            SHARED_NSMC if os.path.isdir(SHARED_NSMC) else os.path.join(ROOT, "data", "nsmc_sample")
        ),
        help="NSMC folder",
    )
    p.add_argument("--ratio", type=int, default=10, help="negative reviews per positive one")
    p.add_argument("--train_majority", type=int, default=10000, help="negative training reviews")
    p.add_argument("--test_majority", type=int, default=3000, help="negative test reviews")
    p.add_argument("--epochs", type=int, default=3, help="--total_epochs of both runs")
    p.add_argument("--seed", type=int, default=42, help="subset and training seed")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="skewed-")
    for split, n in (("train", args.train_majority), ("test", args.test_majority)):
        examples = read_table(
            os.path.join(args.data_dir, f"ratings_{split}.txt"), "document", "label"
        )
        write_jsonl(
            os.path.join(work, f"{split}.jsonl"), skewed(examples, n, args.ratio, args.seed)
        )
    results = {}
    for weights in ("none", "balanced"):
        out = os.path.join(work, weights)
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "_3_main.py"),
                "--model",
                "tiny",
                "--train_file",
                os.path.join(work, "train.jsonl"),
                "--test_file",
                os.path.join(work, "test.jsonl"),
                "--label_names",
                "부정,긍정",
                "--class_weights",
                weights,
                "--total_epochs",
                str(args.epochs),
                "--mlm_epochs",
                "0",
                "--max_len",
                "64",
                "--head_name",
                "cls",  # as README's row was measured (tiny's head then)
                "--seed",
                str(args.seed),
                "--output_dir",
                out,
                "--cache_dir",
                os.path.join(work, "cache"),
            ],
            check=True,
        )
        with open(os.path.join(out, "metrics.jsonl")) as f:
            results[weights] = [json.loads(line) for line in f][-1]
    print(
        f"\nNSMC {args.ratio}:1 (negative:positive), {args.train_majority} + "
        f"{args.train_majority // args.ratio} train, {args.test_majority} + "
        f"{args.test_majority // args.ratio} test, tiny, {args.epochs} epochs, seed {args.seed}"
    )
    print(f"{'class_weights':<14}{'macro_f1':>10}{'accuracy':>10}{'F1 긍정':>10}")
    for weights, row in results.items():
        print(
            f"{weights:<14}{row['test_macro_f1']:>10.4f}{row['test_accuracy']:>10.4f}"
            f"{row['test_per_class']['긍정']['f1']:>10.4f}"
        )
    gain = results["balanced"]["test_macro_f1"] - results["none"]["test_macro_f1"]
    print(f"balanced - none: macro-F1 {gain:+.4f}")


if __name__ == "__main__":
    main()
