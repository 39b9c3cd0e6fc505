"""The bag-of-n-grams baseline the README sets `tiny` against: character 1-4-gram TF-IDF and
logistic regression, trained on NSMC's training set and scored on its test set.

    pip install scikit-learn
    python3 bench/tfidf_baseline.py                  # ../shared/data/nsmc, else data/nsmc

Prints the test accuracy and the seconds it took (reading, features, fitting, scoring).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _1_data import read_nsmc  # noqa: E402

SHARED_NSMC = os.path.join(os.path.dirname(ROOT), "shared", "data", "nsmc")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=SHARED_NSMC if os.path.isdir(SHARED_NSMC)
                   else os.path.join(ROOT, "data", "nsmc"), help="folder of ratings_*.txt")
    p.add_argument("--C", type=float, default=4.0, help="inverse regularisation strength")
    args = p.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    splits = read_nsmc(args.data_dir)
    (train_x, train_y), (test_x, test_y) = (zip(*splits[s]) for s in ("train", "test"))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), min_df=2, sublinear_tf=True)
    classifier = LogisticRegression(C=args.C, max_iter=2000)
    classifier.fit(vectorizer.fit_transform(train_x), train_y)
    accuracy = classifier.score(vectorizer.transform(test_x), test_y)
    print(f"char 1-4-gram TF-IDF + logistic regression: {len(train_x)} train, {len(test_x)} test, "
          f"test accuracy {accuracy:.4f}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
