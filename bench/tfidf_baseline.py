"""The bag-of-n-grams baseline the README sets `tiny` against: character 1-4-gram TF-IDF and
logistic regression, trained on NSMC's training set and scored on its test set; or, with
--goemotions, one-vs-rest over GoEmotions-Korean's 28 labels under `_3_main.py --valid_ratio 0.1
--tune_threshold`'s protocol: 10% of train.tsv split off as `_3_main.py` splits it (same seed),
the threshold (0.05 ... 0.95, best macro-F1) chosen there, dev.tsv scored once.

    pip install scikit-learn
    python3 bench/tfidf_baseline.py                  # ../shared/data/nsmc, else data/nsmc
    python3 bench/tfidf_baseline.py --goemotions ../shared/data/goemotions_ko

Prints the test (dev) score and the seconds it took (reading, features, fitting, scoring).
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import read_nsmc, read_table, split_off  # noqa: E402
from metrics import per_class_report  # noqa: E402

SHARED_NSMC = os.path.join(os.path.dirname(ROOT), "shared", "data", "nsmc")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data_dir",
        default=SHARED_NSMC if os.path.isdir(SHARED_NSMC) else os.path.join(ROOT, "data", "nsmc"),
        help="folder of ratings_*.txt",
    )
    p.add_argument("--C", type=float, default=4.0, help="inverse regularisation strength")
    p.add_argument(
        "--goemotions",
        help="folder of GoEmotions-Korean's train.tsv, dev.tsv, "
        "label.txt: the multi-label protocol instead of NSMC",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the validation split")
    args = p.parse_args()
    if args.goemotions:
        return goemotions(args)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    splits = read_nsmc(args.data_dir)
    (train_x, train_y), (test_x, test_y) = (zip(*splits[s]) for s in ("train", "test"))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), min_df=2, sublinear_tf=True)
    classifier = LogisticRegression(C=args.C, max_iter=2000)
    classifier.fit(vectorizer.fit_transform(train_x), train_y)
    accuracy = classifier.score(vectorizer.transform(test_x), test_y)
    print(
        f"char 1-4-gram TF-IDF + logistic regression: {len(train_x)} train, {len(test_x)} test, "
        f"test accuracy {accuracy:.4f}, {time.perf_counter() - start:.0f} s"
    )


def goemotions(args):
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    start = time.perf_counter()
    folder = args.goemotions
    names = [line.strip() for line in open(os.path.join(folder, "label.txt"), encoding="utf-8")]

    def read(name):
        return read_table(os.path.join(folder, name), columns=["text", "labels"], label_sep=",")

    def multi_hot(examples):
        y = np.zeros((len(examples), len(names)), dtype=bool)
        for row, (_, labels) in enumerate(examples):
            y[row, [int(label) for label in labels]] = True
        return y

    train, valid = split_off(read("train.tsv"), 0.1, args.seed)  # as --valid_ratio 0.1 splits
    dev = read("dev.tsv")
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), min_df=2, sublinear_tf=True)
    classifier = OneVsRestClassifier(LogisticRegression(C=args.C, max_iter=2000), n_jobs=-1)
    classifier.fit(vectorizer.fit_transform([t for t, _ in train]), multi_hot(train))

    def macro_f1(examples, threshold):
        probs = classifier.predict_proba(vectorizer.transform([t for t, _ in examples]))
        report = per_class_report(multi_hot(examples), probs > threshold, names)
        return float(np.mean([r["f1"] for r in report.values()]))  # as score_logits counts

    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)  # metrics.tune_threshold's grid
    threshold = float(grid[int(np.argmax([macro_f1(valid, t) for t in grid]))])
    print(
        f"char 1-4-gram TF-IDF + one-vs-rest logistic regression: {len(train)} train, "
        f"{len(valid)} valid (threshold {threshold:.2f}), {len(dev)} dev, dev macro-F1 "
        f"{macro_f1(dev, threshold):.4f}, {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
