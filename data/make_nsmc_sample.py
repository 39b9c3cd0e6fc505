"""Write data/nsmc_sample/: a seeded random sample of NSMC rows, copied byte for byte.

NSMC (https://github.com/e9t/nsmc) is CC0 1.0, so the sample may be shipped. Regenerate with
    python3 data/make_nsmc_sample.py ../shared/data/nsmc
"""
import os
import random
import sys

SIZES = {"ratings_train.txt": 10000, "ratings_test.txt": 2000}


def main(source):
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nsmc_sample")
    os.makedirs(out_dir, exist_ok=True)
    for name, n in SIZES.items():
        with open(os.path.join(source, name), "rb") as f:
            header, *rows = f.read().split(b"\n")  # NSMC rows have no embedded newlines
        rows = [r for r in rows if r]
        keep = sorted(random.Random(0).sample(range(len(rows)), n))
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(b"\n".join([header] + [rows[i] for i in keep]) + b"\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/nsmc")
